"""The gateway's Prometheus metrics: one ``Metrics`` per running gateway, on a registry of its own.

Defined at the base layer so that every layer reports what it sees without importing the HTTP
layer: the storage its commit batches and failures, the Kubo client its calls, the record service
its appends and conflicts, the HTTP app its requests (``gateway.http.metrics``, which also serves
``/metrics``). A registry per gateway, not prometheus_client's global one, keeps several gateways
in one process (the test suite's) from mixing their numbers.

With ``server.workers`` > 1 each worker is a process of its own: the supervisor gives them one
directory (prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), each writes its
values there, and ``/metrics`` — whichever worker answers — shows the sums over every worker
(in-flight requests of the live ones), and each worker's ``process_*`` metrics labelled
``worker``.

Every label value comes from a bounded set — surfaces, command names of the command table, route
templates, status codes, store names — never a path, a CID, a query or an identifier: unbounded
label values would grow the scrape without end and could carry patient identifiers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The metric objects of one gateway, and the narrow calls the lower layers make on them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        shared = shared_dir()
        # What /metrics shows: this registry, or with workers every worker's values summed.
        self.exposed = r if shared is None else workers_registry(shared)
        if shared is None:
            ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes…
        self.requests = Counter(
            "medicon_http_requests", "HTTP requests answered, by surface, route (a command of the "
            "command table or a route template), method and status code",
            ["surface", "route", "method", "status"], registry=r)
        self.request_duration = Histogram(
            "medicon_http_request_duration_seconds", "Time from a request's arrival to the end of "
            "its answer (streamed bodies included), by surface and route",
            ["surface", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("medicon_http_requests_in_flight", "HTTP requests being served", registry=r,
                               multiprocess_mode="livesum")
        self.appends = Counter(
            "medicon_record_appends", "Records appended: created, or replayed (a retried append "
            "answered with the record it already wrote)", ["outcome"], registry=r)
        self.conflicts = Counter(
            "medicon_record_conflicts", "Appends refused because they do not fit the episode's "
            "head (chain conflicts, answered 409)", registry=r)
        self.relinks = Counter(
            "medicon_record_relinks", "Appends that named no position linked again to their "
            "episode's new head: their head move was lost to another process (another worker or "
            "site), or the record they were chained on did not commit", registry=r)
        self.append_paths = Counter(
            "medicon_record_append_paths", "Appends with records.pipeline on, by the way they went: "
            "serial (nothing of the episode in flight, no append waiting: one Kubo round trip under "
            "the episode's lock) or pipelined (chained on appends in flight)", ["path"], registry=r)
        self.kubo_duration = Histogram(
            "medicon_kubo_call_duration_seconds", "Kubo calls: the gateway's own until Kubo's whole "
            "answer is read; relayed ones until Kubo's headers arrive", ["command"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.kubo_errors = Counter(
            "medicon_kubo_call_errors", "Kubo calls that failed, by command and kind: refused "
            "(Kubo answered an error), timeout, unreachable", ["command", "kind"], registry=r)
        self.commit_batch = Histogram(
            "medicon_storage_commit_batch_size", "Writes committed together in one transaction "
            "(one fsync) by a store's group-commit writer", ["store"], buckets=BATCH_BUCKETS, registry=r)
        self.storage_errors = Counter(
            "medicon_storage_errors", "Reads and writes the gateway's stores failed, by store, "
            "operation and kind: full (no space), failed (any other storage error)",
            ["store", "operation", "kind"], registry=r)

    # --- what the lower layers call ----------------------------------------------------------

    def kubo_call(self, command: str, seconds: float, error: str | None = None) -> None:
        """A Kubo call that took ``seconds``; ``error`` its kind if it failed."""
        self.kubo_duration.labels(command).observe(seconds)
        if error is not None:
            self.kubo_errors.labels(command, error).inc()

    def commit_batch_observer(self, store: str) -> Callable[[int], None]:
        """What a group-commit writer calls with the size of each batch it commits (from its
        own thread: prometheus_client's metrics are thread-safe)."""
        return self.commit_batch.labels(store).observe

    def storage_error(self, store: str, operation: str, kind: str) -> None:
        self.storage_errors.labels(store, operation, kind).inc()

    def record_appended(self, created: bool) -> None:
        self.appends.labels("created" if created else "replayed").inc()

    def record_conflict(self) -> None:
        self.conflicts.inc()

    def record_relinked(self) -> None:
        self.relinks.inc()

    def record_append_path(self, path: str) -> None:
        self.append_paths.labels(path).inc()


# --- several worker processes ---------------------------------------------------------------------

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported


def shared_dir() -> Path | None:
    """The directory the workers of one gateway write their values to (set by the supervisor
    before a worker starts), or None for a gateway of one process."""
    value = os.environ.get(MULTIPROCESS_ENV)
    return Path(value) if value else None


def register_worker(number: int) -> None:
    """Say which process is worker ``number``, for its ``process_*`` metrics."""
    shared = shared_dir()
    if shared is not None:
        (shared / f"worker-{number}.pid").write_text(str(os.getpid()))


def workers_registry(shared: Path) -> CollectorRegistry:
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(shared))
    registry.register(WorkerProcesses(shared))
    return registry


class WorkerProcesses:
    """``process_*`` of every live worker, labelled ``worker`` (its number: a bounded set)."""

    def __init__(self, shared: Path) -> None:
        self._shared = shared

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for file in sorted(self._shared.glob("worker-*.pid")):
            number = file.stem.removeprefix("worker-")
            try:
                pid = int(file.read_text())
            except (OSError, ValueError):
                continue
            if not Path(f"/proc/{pid}").exists():
                continue
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": number}, sample.value)
        return list(families.values())
