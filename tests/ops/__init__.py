"""Tests of ``wsgate.ops`` in memory: the operations view, console, admin, control API and logs."""
