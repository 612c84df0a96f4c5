"""Tests of ``wsgate.core``, the decisions without I/O: tables and hypothesis, no sockets."""
