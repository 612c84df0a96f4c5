"""
How the gate is operated: the SSH console, the admin HTTP listener (``/metrics``, ``/status.json``,
``/ready``, the status page in ``static/``), the snapshots all of them show, the log observer and
``check``'s preflight.  Imports every layer below; nothing below imports it.
"""
