"""Tests of ``wsgate.config``: the schema, its defaults, the readers and the shipped examples."""
