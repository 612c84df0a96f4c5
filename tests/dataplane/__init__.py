"""Tests of ``wsgate.dataplane``: sessions through a gate wired in memory on a fake clock."""
