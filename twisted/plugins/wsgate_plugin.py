"""The ``twistd wsgate`` plugin: a single ServiceMaker, nothing imported eagerly."""

from twisted.application.service import ServiceMaker

wsgate = ServiceMaker(
    "wsgate",
    "wsgate.service",
    "WebSocket gateway: bridges client sessions to backend servers through Autobahn.",
    "wsgate",
)
