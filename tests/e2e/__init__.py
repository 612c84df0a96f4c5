"""End-to-end tests: real gate processes and real peers on loopback (marker ``e2e``)."""
