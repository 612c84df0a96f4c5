"""
The gate's decisions without I/O: objects that take events or bytes and return commands or bytes.

Nothing here imports ``twisted.internet`` or Autobahn's protocol machinery; the frame engine uses
only Autobahn's C XOR masker, a pure function.
"""
