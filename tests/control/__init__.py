"""Tests of ``wsgate.control`` in memory: health checks and the fleet over a fake Redis."""
