"""Tests of ``wsgate.net`` in memory: TLS and the PROXY protocol at the front door."""
