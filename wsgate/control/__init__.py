"""
What changes the gate's picture of its backends over time: active health checks and rebalancing,
DNS discovery of servers, and reloading the config on SIGHUP.  Imports the layers below it
(``config``, ``core``, ``net``, ``dataplane``).
"""
