"""Tests of ``wsgate.process``: workers, their channel and the parent's view; systemd notify."""
