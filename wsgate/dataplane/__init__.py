"""
Where a byte goes: the client and backend legs (Autobahn protocols), the session that pairs them,
the relay that drives ``wsgate.core.frames`` between two transports, the plain-HTTP proxy for
``http = true`` routes, and the gateway's registry of live sessions.  ``_compat`` holds the
reach-ins into Twisted's private API.  Imports ``config``, ``core`` and ``net``.
"""
