"""
The gate's decisions without I/O: objects and functions that take events, requests or bytes and
return choices, commands or bytes.  The frame engine (``frames``), routing, the upstreams and their
balancers, admission limits, redaction and the metric types.

Nothing here imports ``twisted.internet`` or Autobahn's protocol machinery (``twisted.logger`` is
allowed); the frame engine uses only Autobahn's C XOR masker, a pure function.  Imports
``wsgate.config`` (the schema) and nothing else of wsgate.
"""
