"""
How many processes there are: one, or a parent and ``workers = N`` children sharing each listening
socket, and systemd's readiness notification.  The highest layer below the application assembly
in ``wsgate.service``.

- ``pool.py``: the parent: binds the shared sockets, spawns, supervises, restarts, reloads and
  stops the workers.
- ``aggregate.py``: the parent's operations view over the workers' snapshots.
- ``worker.py``: what runs in a worker (``python -m wsgate.worker``): answering the parent.
- ``channel.py``: the newline-delimited JSON channel between the two.
- ``sockets.py``: the listening sockets the parent binds and the workers adopt.
- ``sdnotify.py``: readiness and reload notification to systemd.
"""
