"""
``twistd wsgate``: command-line options and the service tree.

The only module that wires objects together: it reads the config, builds the :class:`Gateway`,
the backend connector and the listeners, and returns them as one ``MultiService``.  Listeners are
``strports`` services, so ports bind in ``privilegedStartService`` (before ``twistd --uid`` drops
root) and a busy port fails at startup.  It must not hold logic of its own.

Over 500 lines because it is the one place that shows everything a gate starts (listeners, TLS,
console, admin, control API, health, discovery, webhooks, fleet, workers) and what a reload swaps.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any, NoReturn

import txaio
from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger
from twisted.python import components, usage

import wsgate
from wsgate import config as configmod
from wsgate.control.discovery import DnsDiscovery
from wsgate.control.health import AutoRebalance, HealthChecker, Probes
from wsgate.control.sighup import reload_on_sighup
from wsgate.core.redact import redact_target
from wsgate.dataplane._compat import dispatch_directly, lazy_debug_arguments, raise_listen_errors
from wsgate.dataplane.bridge import ClientLegFactory
from wsgate.dataplane.gateway import Gateway
from wsgate.dataplane.webhooks import Webhooks
from wsgate.demo import EchoBackendFactory
from wsgate.net.proxy_protocol import proxy_protocol_endpoint
from wsgate.net.tls import (
    BackendConnector,
    ServerTLS,
    TLSLoadError,
    certificate_rows,
    redirect_site,
    tls_server_factory,
    unverified_servers,
)
from wsgate.ops.admin import admin_service
from wsgate.ops.console import Console, ConsoleError, console_service
from wsgate.ops.control import control_service
from wsgate.ops.logs import GateLog, twistd_log_file
from wsgate.ops.status import Sampler
from wsgate.ops.view import GateView, LocalView
from wsgate.process.pool import WorkerPool
from wsgate.process.sdnotify import Listening, Notifier, take_address
from wsgate.process.sockets import SharedSocketEndpoint

__all__ = ["Options", "makeService", "worker_service"]

DEMO_LISTEN = "tcp:8020"
DEMO_PORT = 8010


class Options(usage.Options):
    synopsis = (
        "[--config PATH | --listen ENDPOINT --backend URL [--backend URL ...] | "
        "--demo [--listen ENDPOINT] [--demo-port N]]"
    )
    longdesc = (
        "Run the wsgate WebSocket gateway.  Clients connect to the listeners; each session is "
        "bridged to a backend server chosen by its route's upstream.  Either from a TOML config "
        "file (--config; check one with `python -m wsgate check PATH`), or from --listen and "
        "--backend (one route / to a round-robin upstream), or as the self-contained demo "
        "(--demo: the gate on tcp:8020 and an echo backend on 127.0.0.1:8010)."
    )
    optFlags = [
        ["demo", None, "Run the demo: a built-in echo backend and the gate in front of it."],
    ]
    optParameters = [
        ["config", "c", None, "Path of a TOML config file (see etc/wsgate.toml)."],
        ["demo-port", None, DEMO_PORT, "Port of the demo echo backend on 127.0.0.1.", int],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["backend"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this Twisted server endpoint, e.g. tcp:8020 or tcp:8020:interface=127.0.0.1
        (repeatable)."""
        self["listen"].append(endpoint)

    def opt_backend(self, url: str) -> None:
        """Bridge sessions to this ws:// or wss:// server (repeatable: balanced round robin)."""
        self["backend"].append(url)

    def opt_version(self) -> NoReturn:
        """Display wsgate's version and exit."""
        print(f"wsgate {wsgate.__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        modes = [bool(self["config"]), bool(self["backend"]), bool(self["demo"])]
        if sum(modes) != 1:
            raise usage.UsageError("give exactly one of --config, --backend or --demo")
        try:
            if self["config"]:
                if self["listen"]:
                    raise usage.UsageError("--listen goes with --backend or --demo, not --config")
                self["gate_config"] = configmod.load(self["config"])
            elif self["demo"]:
                backend = f"ws://127.0.0.1:{self['demo-port']}"
                self["gate_config"] = configmod.from_arguments(
                    self["listen"] or [DEMO_LISTEN], [backend]
                )
            else:
                if not self["listen"]:
                    raise usage.UsageError("--backend needs at least one --listen ENDPOINT")
                self["gate_config"] = configmod.from_arguments(self["listen"], self["backend"])
        except configmod.ConfigError as e:
            raise usage.UsageError(f"invalid configuration:\n{e}") from None


class _Gate(service.MultiService):
    """
    The top of the service tree.  Under twistd it also hands the application the gate's log
    observer as its ``ILogObserver`` component, which twistd's ``AppLogger`` then installs instead
    of the one it would make (same destination: stdout or ``--logfile``), so that ``[log]`` level
    and format apply to every line, twistd's own included.
    """

    log_observer: GateLog | None = None

    def setServiceParent(self, parent: Any) -> None:
        if self.log_observer is not None and isinstance(parent, components.Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)


def _gate_log(options: Options | dict[str, Any], current: Any) -> GateLog | None:
    """
    The gate's log observer when running under twistd (whose ``ServerOptions`` are the parent
    of ours), writing where twistd would; None otherwise (tests, workers) or when twistd logs
    elsewhere (``--syslog``, ``--logger``).
    """
    twistd_options = getattr(options, "parent", None)
    if twistd_options is None:
        return None
    out = twistd_log_file(twistd_options)
    return None if out is None else GateLog(out, current)


class _Announcement(service.Service):
    """Logs a line once the service tree is running (e.g. how to connect to the demo)."""

    log = Logger()

    def __init__(self, text: str) -> None:
        self.text = text

    def startService(self) -> None:
        super().startService()
        self.log.info("{text}", text=self.text)


class _UnverifiedWarning(service.Service):
    """Warns at every start about each wss:// server whose certificate is not checked."""

    log = Logger()

    def __init__(self, servers: list[str]) -> None:
        self.servers = servers

    def startService(self) -> None:
        super().startService()
        for server in self.servers:
            self.log.warn(
                "tls_unverified {server}: verify = false, its certificate is NOT checked "
                "(anyone on the path can impersonate it)",
                server=server,
            )


class _Reload(service.Service):
    """
    Reloads the config file on SIGHUP and when the console asks (``top.reload``).  A valid file
    replaces routes, upstreams and limits for new sessions at once (``Gateway.reload``) and the
    certificates of every TLS listener (matched by endpoint) and the backends' CA bundles and
    client certificates, and starts or stops the upstreams' health checks, discovery and rebalance
    (``_UpstreamServices``); live sessions keep running untouched.  A file that does not validate
    is refused with every problem logged, and the running config stays.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        gateway: Gateway,
        factory: ClientLegFactory,
        listeners: dict[str, ServerTLS],
        connector: BackendConnector,
        upstream_services: _UpstreamServices,
        reactor: Any,
        listening: Listening | None = None,
    ) -> None:
        self.path = path
        self.gateway = gateway
        self.factory = factory
        self.listeners = listeners
        self.connector = connector
        self.upstream_services = upstream_services
        self.reactor = reactor
        self.listening = listening
        self._restore_sighup: Any = None

    def startService(self) -> None:
        super().startService()
        self._restore_sighup = reload_on_sighup(self.reactor, self.announced_reload, self.log)

    def stopService(self) -> Any:
        if self._restore_sighup is not None:
            self._restore_sighup()
            self._restore_sighup = None
        return super().stopService()

    def announced_reload(self) -> list[str]:
        """
        :meth:`reload` as an operator asks for it (SIGHUP, the control API, the console):
        systemd hears ``RELOADING=1`` ... ``READY=1`` around it.
        """
        if self.listening is None:
            return self.reload()
        return self.listening.reloading(self.reload)()

    def reload(self) -> list[str]:
        """Reload now; returns what changed, or raises ConfigError naming every problem."""
        try:
            new = configmod.load(self.path)
        except configmod.ConfigError:
            self.gateway.reloads.record(False, self.reactor.seconds())
            raise
        certificates_kept = False
        changes = self.gateway.reload(new)
        self.upstream_services.update()
        self.factory.setProtocolOptions(
            openHandshakeTimeout=new.limits.handshake_timeout,
            closeHandshakeTimeout=new.limits.close_timeout,
        )
        self.factory.backend_legs.setProtocolOptions(closeHandshakeTimeout=new.limits.close_timeout)
        for listener in new.listeners:
            current = self.listeners.get(listener.endpoint)
            if current is None or listener.tls is None:
                continue
            try:
                current.reload(listener.tls)
            except TLSLoadError as e:
                certificates_kept = True
                for problem in e.problems:
                    changes.append(f"{listener.endpoint}: certificates kept: {problem}")
                    self.log.error(
                        "tls_reload_failed {endpoint}: {problem}; keeping its current certificates",
                        endpoint=listener.endpoint,
                        problem=problem,
                    )
            else:
                self.log.info(
                    "tls_reloaded {endpoint} sni={names}",
                    endpoint=listener.endpoint,
                    names=",".join(current.names()) or "-",
                )
        self.connector.forget()
        self.gateway.reloads.record(not certificates_kept, self.reactor.seconds())
        return changes


class _GracefulStop(service.Service):
    """On stop (SIGTERM), closes every session with 1001 and waits for them, up to the grace."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def stopService(self) -> Any:
        super().stopService()
        return self.gateway.shutdown()


class _WebhookStop(service.Service):
    """
    On stop, gives the ``on_disconnect`` records of the sessions the shutdown closes time to go:
    until no session is left and every queue is empty, within the same ``shutdown_grace``.
    """

    def __init__(self, gateway: Gateway, webhooks: Webhooks) -> None:
        self.gateway = gateway
        self.webhooks = webhooks

    def stopService(self) -> Any:
        super().stopService()
        grace = self.gateway.config.limits.shutdown_grace
        return self.webhooks.drain(lambda: not self.gateway.sessions, grace)


def tune_gc() -> None:
    """
    Set the cycle collector for a process that holds many long-lived sessions.  Sessions free
    themselves by reference counting (``Session._forget``), so the collector finds little; but
    with Python's defaults it ran a full collection, which visits every live object, each time the
    heap grew by a quarter: W5 (9,000 sessions opened, 200 at a time) spent a third of the gate's
    CPU in the collector and paused up to 140 ms at a time.  The objects made at start-up are
    frozen out of collections, and collections run ten times less often; a full one then still
    runs after every 10 million or so allocations, for the cycles libraries make.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _no_reload() -> list[str]:
    raise configmod.ConfigError(["nothing to reload: wsgate was started without --config"])


def _listening(reactor: Any, listener: configmod.Listener, endpoint: Any = None) -> Any:
    """
    The listener's endpoint (its socket's, unless a worker inherited ``endpoint``), speaking the
    PROXY protocol when asked.
    """
    if endpoint is None:
        endpoint = serverFromString(reactor, listener.socket_endpoint)
    return proxy_protocol_endpoint(endpoint) if listener.behind_proxy else endpoint


def _listener_service(endpoint: Any, factory: Any) -> StreamServerEndpointService:
    """A listener's service: binds in privilegedStartService; a busy port fails the start."""
    return raise_listen_errors(StreamServerEndpointService(endpoint, factory))


def _add_monitoring(
    config: configmod.Config,
    view: GateView,
    top: service.MultiService,
    reactor: Any,
    listening: Listening,
) -> None:
    """The sampler, the SSH console, the admin listener and the control API, each only when
    configured; all of them read and act through ``view``."""
    if config.console is None and config.admin is None and config.control is None:
        return
    sampler = Sampler(view, reactor)
    sampler.setServiceParent(top)
    top.sampler = sampler  # type: ignore[attr-defined]
    if config.console is not None:
        console = Console(view, reactor, sampler)
        try:
            console_service(config.console, console, reactor).setServiceParent(top)
        except ConsoleError as e:
            raise usage.UsageError(f"cannot start the console:\n{e}") from None
        top.console = console  # type: ignore[attr-defined]
    if config.admin is not None:
        admin_service(config.admin, view, sampler, listening).setServiceParent(top)
    if config.control is not None:
        try:
            control_service(config.control, view, sampler).setServiceParent(top)
        except OSError as e:
            raise usage.UsageError(f"cannot start the control API: {e}") from None


def _local_view(gateway: Gateway, top: service.MultiService) -> LocalView:
    """The operations view of this process; its reload is looked up at call time (the reload
    service is added after the monitoring)."""

    def reload() -> list[str]:
        return list(top.reload())  # type: ignore[attr-defined]

    return LocalView(gateway, reload)


class _UpstreamServices(service.MultiService):
    """
    Per upstream, as configured: active health checks, DNS discovery, automatic rebalance.  Each
    looks its upstream up by name every round, so a reload's new spec applies; ``update`` starts
    the ones a reload adds (a new upstream, a health check switched on) and stops the ones it
    removes.
    """

    def __init__(self, gateway: Gateway, connector: Any, reactor: Any) -> None:
        super().__init__()
        self.gateway = gateway
        self.connector = connector
        self.reactor = reactor
        self._resolver: Any = None
        self._by_key: dict[tuple[str, str], service.Service] = {}
        self.update()

    def update(self) -> None:
        wanted = {
            (name, kind)
            for name, upstream in self.gateway.upstreams.items()
            for kind, on in (
                ("health", upstream.spec.health is not None),
                ("discovery", any(s.resolve for s in upstream.spec.servers)),
                ("rebalance", upstream.spec.rebalance_threshold > 0),
            )
            if on
        }
        for key in sorted(self._by_key.keys() - wanted):
            self._by_key.pop(key).disownServiceParent()  # stops it when running
        for key in sorted(wanted - self._by_key.keys()):
            child = self._by_key[key] = self._make(*key)
            child.setServiceParent(self)  # starts it when running

    def _make(self, name: str, kind: str) -> service.Service:
        gateway = self.gateway

        def find() -> Any:
            return gateway.upstreams.get(name)

        if kind == "health":
            return HealthChecker(find, Probes(self.connector), self.reactor)
        if kind == "discovery":
            if self._resolver is None:
                from twisted.names import client

                self._resolver = client.createResolver()
            return DnsDiscovery(find, self._resolver, self.reactor)
        return AutoRebalance(name, find, gateway.rebalance, self.reactor)


def _add_cluster(
    spec: configmod.ClusterSpec, gateway: Gateway, top: service.MultiService, reactor: Any
) -> None:
    """The gate's membership of a fleet sharing Redis; imported only with ``[cluster]``."""
    from wsgate.control.cluster import cluster_service

    try:
        cluster = cluster_service(spec, gateway, reactor)
    except OSError as e:
        raise usage.UsageError(f"cannot join the cluster: {e}") from None
    cluster.setServiceParent(top)
    top.cluster = cluster  # type: ignore[attr-defined]


def _adopted(reactor: Any, listener: configmod.Listener, adopted: dict[str, Any]) -> Any:
    """A worker's endpoint for a listener: the socket its parent bound, inherited as a descriptor."""
    return _listening(
        reactor, listener, SharedSocketEndpoint(reactor, adopted["fd"], adopted["family"])
    )


def _ready_marker(config: configmod.Config, notify_address: str | None) -> Listening:
    """
    The marker added after the listeners: ``/ready`` reads it, and it tells systemd (Type=notify)
    when the gate listens, reloads and stops.
    """
    endpoints = [listener.endpoint for listener in config.listeners]
    endpoints += [redirect.endpoint for redirect in config.redirects]
    return Listening(Notifier(notify_address), "listening on " + ", ".join(endpoints))


def _parent_service(
    options: Options | dict[str, Any],
    config: configmod.Config,
    reactor: Any,
    notify_address: str | None,
) -> service.MultiService:
    """``workers`` > 1: the parent binds the listeners, supervises the workers, aggregates."""
    top = _Gate()
    pool = WorkerPool(
        config,
        options["config"],
        reactor,
        rows=any(x is not None for x in (config.console, config.admin, config.control)),
    )
    top.log_observer = _gate_log(options, lambda: pool.config.log)
    pool.setServiceParent(top)
    top.workers = pool  # type: ignore[attr-defined]
    top.reload = pool.reload  # type: ignore[attr-defined]
    listening = pool.listening = _ready_marker(config, notify_address)
    _add_monitoring(config, pool.aggregate, top, reactor, listening)
    for redirect in config.redirects:
        StreamServerEndpointService(
            serverFromString(reactor, redirect.endpoint),
            redirect_site(
                redirect.https_port, lambda target: redact_target(target, pool.config.log)
            ),
        ).setServiceParent(top)
    listening.setServiceParent(top)  # last: started once the workers are spawned, stopped first
    top.listening = listening  # type: ignore[attr-defined]
    return top


def worker_service(
    config: configmod.Config, path: str, listeners: list[dict[str, Any]], reactor: Any
) -> service.MultiService:
    """
    One worker of ``workers = N``: the gate on the sockets its parent bound (``listeners``: fd,
    address family and endpoint of each, in config order), without console, admin or redirects.
    """
    by_endpoint = {entry["endpoint"]: entry for entry in listeners}
    adopted = {
        listener.endpoint: by_endpoint.get(listener.endpoint, entry)
        for listener, entry in zip(config.listeners, listeners, strict=False)
    }
    tune_gc()
    dispatch_directly(reactor)
    return makeService({"gate_config": config, "config": path, "adopted": adopted}, reactor)


def makeService(options: Options | dict[str, Any], reactor: Any = None) -> service.MultiService:
    notify_address = None
    if reactor is None:  # the process's own gate (twistd), not a test's
        from twisted.internet import reactor

        tune_gc()
        dispatch_directly(reactor)
        notify_address = take_address(os.environ)  # systemd's Type=notify; workers never see it
    config: configmod.Config = options["gate_config"]
    # Autobahn logs every frame at debug level through txaio; twistd would format them all.
    txaio.set_global_log_level("info")  # type: ignore[attr-defined]
    lazy_debug_arguments()  # ... and formats their arguments all the same
    adopted: dict[str, Any] | None = options.get("adopted")
    if config.workers > 1 and adopted is None:
        return _parent_service(options, config, reactor, notify_address)
    top = _Gate()
    gateway = Gateway(config, reactor)
    top.gateway = gateway  # type: ignore[attr-defined]
    gateway.webhooks = Webhooks(reactor, gateway.counters, gateway.warnings)
    _WebhookStop(gateway, gateway.webhooks).setServiceParent(top)
    top.log_observer = _gate_log(options, lambda: gateway.config.log)
    listening = _ready_marker(config, notify_address)
    if adopted is None:
        _add_monitoring(config, _local_view(gateway, top), top, reactor, listening)
    if options.get("demo"):
        demo: Any = EchoBackendFactory()
        strports.service(f"tcp:{options['demo-port']}:interface=127.0.0.1", demo).setServiceParent(
            top
        )
    connector = BackendConnector(reactor)
    upstream_services = _UpstreamServices(gateway, connector, reactor)
    upstream_services.setServiceParent(top)
    factory: Any = ClientLegFactory(gateway, connector)
    factory.auth.setServiceParent(top)  # [route.auth]: key refresh timers, HTTP connections
    unverified = unverified_servers(config)
    if unverified:
        _UnverifiedWarning(unverified).setServiceParent(top)
    tls_listeners: dict[str, ServerTLS] = {}
    gateway.certificates = lambda: certificate_rows(tls_listeners, connector, gateway.config)
    for listener in config.listeners:
        if adopted is not None:
            if listener.endpoint not in adopted:
                continue
            endpoint = _adopted(reactor, listener, adopted[listener.endpoint])
        else:
            endpoint = _listening(reactor, listener)
        if listener.tls is None:
            _listener_service(endpoint, factory).setServiceParent(top)
            continue
        try:
            server_tls = tls_listeners[listener.endpoint] = ServerTLS(listener.tls)
        except TLSLoadError as e:
            raise usage.UsageError(
                f"invalid TLS certificates for {listener.endpoint}:\n{e}"
            ) from None
        _listener_service(
            endpoint, tls_server_factory(server_tls, factory, reactor)
        ).setServiceParent(top)
    for redirect in config.redirects if adopted is None else ():
        StreamServerEndpointService(
            serverFromString(reactor, redirect.endpoint),
            redirect_site(
                redirect.https_port, lambda target: redact_target(target, gateway.config.log)
            ),
        ).setServiceParent(top)
    if config.cluster is not None:
        _add_cluster(config.cluster, gateway, top, reactor)
    _GracefulStop(gateway).setServiceParent(top)
    top.reload = _no_reload  # type: ignore[attr-defined]
    if options.get("config"):
        reloader = _Reload(
            options["config"],
            gateway,
            factory,
            tls_listeners,
            connector,
            upstream_services,
            reactor,
            listening,
        )
        reloader.setServiceParent(top)
        top.reload = reloader.announced_reload  # type: ignore[attr-defined]
    top.tls_listeners = tls_listeners  # type: ignore[attr-defined]
    listening.setServiceParent(top)  # after the listeners: started last, stopped first
    top.listening = listening  # type: ignore[attr-defined]
    if options.get("demo"):
        port = config.listeners[0].endpoint.split(":")[1]
        _Announcement(
            f"wsgate demo running: connect with `wscat --connect ws://127.0.0.1:{port}`, "
            "type a message, and the demo backend answers "
            "'Server received from client: <message>'"
        ).setServiceParent(top)
    return top
