"""
Process metrics for ``/metrics``: the standard ``process_*`` families (CPU seconds, resident and
virtual memory, open and maximum file descriptors, start time) from prometheus_client's
``ProcessCollector``, in the same text format as the rest of the page.

Owns which processes are reported.  A single process reports itself, without labels, as every
Prometheus client library does.  The parent of ``workers = N`` reports itself with
``worker="parent"`` and each worker with ``worker="N"``, reading the worker's ``/proc/PID`` (the
workers run as the parent's user, so it may), so one scrape of the parent covers the whole gate.
``/proc`` is Linux's: elsewhere the families are simply absent.  Must not use prometheus_client's
global registry (nor register anything in it): each scrape collects into a registry of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector

__all__ = ["PARENT", "gate_processes", "process_text"]

PARENT = "parent"

Process = tuple[str | None, int | str]
"""A process to report: its ``worker`` label (None: no label) and its pid (``"self"``: this one)."""


def gate_processes(workers: Callable[[], list[dict[str, Any]]] | None) -> list[Process]:
    """
    The processes of a gate: this one alone, or with ``workers`` (rows with ``worker`` and
    ``pid``, as :meth:`wsgate.process.aggregate.Aggregate.workers` lists them) this one as the
    parent and every worker.
    """
    if workers is None:
        return [(None, "self")]
    return [(PARENT, "self"), *((str(row["worker"]), row["pid"]) for row in workers())]


class _Processes:
    """A prometheus_client collector: the process families of several processes, merged."""

    def __init__(self, processes: Sequence[Process]) -> None:
        self.processes = processes

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for worker, pid in self.processes:
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in collector.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type
                    )
                for sample in family.samples:
                    labels = dict(sample.labels)
                    if worker is not None:
                        labels["worker"] = worker
                    merged.add_sample(sample.name, labels, sample.value)
        return list(families.values())


def process_text(processes: Sequence[Process]) -> str:
    """The ``process_*`` families of ``processes`` in the Prometheus text format (0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Processes(processes))  # type: ignore[arg-type]
    return generate_latest(registry).decode("utf-8")
