"""
How many processes there are: the worker pool (``workers = N``: the parent's channel to each
worker, the shared listening sockets, the fleet's merged figures) and systemd's readiness
notification.  The highest layer below the application assembly in ``wsgate.service``.
"""
