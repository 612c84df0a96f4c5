"""wsgate: a WebSocket gateway built on Twisted and Autobahn."""

__version__ = "0.1.0"
