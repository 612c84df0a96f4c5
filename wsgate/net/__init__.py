"""
The network edge, below the data plane: TLS for the front door and for ``wss://`` backends
(contexts, reloads, SNI, backend identity), and the PROXY protocol on listeners.  Imports only
``wsgate.config`` and ``wsgate.core``.
"""
