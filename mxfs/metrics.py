"""Prometheus metric definitions (DESIGN section 9): the events every part counts where they happen.

Downloads, Hub requests, evictions, registry errors and inodes are counted by one call into this
module, in :data:`EVENTS`: a registry of our own, not ``prometheus_client``'s global one, so
nothing else in the process can collide with it.  This module imports nothing of mxfs, so every
part may record into it without an import reaching back up; what the daemon's state says at
scrape time (entries by status, cache bytes, open handles) and the ``/metrics`` server are
:mod:`mxfs.exporter`'s; the hand-off's gauges are defined here (:func:`handoff_families`) and
filled by the exporter from what the daemon hands it.  Label values are fixed words (request
kind, eviction reason): no model name, URL or token can end up in a scrape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.context_managers import Timer
from prometheus_client.metrics_core import GaugeMetricFamily

EVENTS = CollectorRegistry()

DOWNLOADS_STARTED = Counter(
    "mxfs_downloads_started_total", "Entry downloads this node began as the claim owner.", registry=EVENTS
)
DOWNLOADS_FINISHED = Counter(
    "mxfs_downloads_finished_total", "Entry downloads this node completed (every file verified).", registry=EVENTS
)
DOWNLOADS_FAILED = Counter(
    "mxfs_downloads_failed_total",
    "Entry downloads this node stopped before completion: an error, or the lease lost to another node.",
    registry=EVENTS,
)
DOWNLOADED_BYTES = Counter(
    "mxfs_downloaded_bytes_total",
    "Bytes received into the cache: from the Hub, and from peers (also in mxfs_peer_fetched_bytes_total).",
    registry=EVENTS,
)
PEER_FETCHED_BYTES = Counter(
    "mxfs_peer_fetched_bytes_total", "Bytes received from peers into the cache (issue 16: peers).", registry=EVENTS
)
PEER_SERVED_BYTES = Counter("mxfs_peer_served_bytes_total", "Bytes this node served to its peers.", registry=EVENTS)
PEER_RANGES = Counter(
    "mxfs_peer_ranges_total",
    "Range requests of downloads that may use peers, by outcome: served by a peer, failed at a peer, "
    "or asked of the Hub (no usable peer).",
    ["source"],
    registry=EVENTS,
)

HUB_KINDS = ("resolve", "tree", "range")
HUB_REQUEST_SECONDS = Histogram(
    "mxfs_hub_request_duration_seconds",
    "Hub request latency by kind: resolve a revision, list a tree, or a range request up to its response headers.",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=EVENTS,
)

# Labelled by mxfs.evict.Reason, which creates a series for each of its reasons (start_series).
EVICTIONS = Counter("mxfs_evictions_total", "Entries evicted from the cache, by reason.", ["reason"], registry=EVENTS)
EVICTED_BYTES = Counter(
    "mxfs_evicted_bytes_total", "Bytes freed in the cache by eviction, by reason.", ["reason"], registry=EVENTS
)
EVICTION_CYCLES = Counter(
    "mxfs_eviction_cycles_total", "Eviction sweeps this node ran (timer, full disk).", registry=EVENTS
)
REGISTRY_ERRORS = Counter(
    "mxfs_registry_errors_total", "Registry calls that failed (unreachable, or an error answer).", registry=EVENTS
)
INODES = Gauge("mxfs_inodes", "Inodes the mount keeps: those the kernel holds, plus the root.", registry=EVENTS)


@dataclass(frozen=True)
class HandOffState:
    """The hand-off of complete models to the kernel (mxfs.handoff) as a scrape shows it: state,
    not events, so the exporter reads it from the daemon at scrape time (``ScrapeSources``)."""

    enabled: bool  # handoff = true, and the daemon may mount: complete models leave FUSE
    model_dirs: int  # model directories (``org/name``, ``org/name@rev``) the kernel serves now


HANDOFF_OFF = HandOffState(enabled=False, model_dirs=0)


def handoff_families(state: HandOffState) -> Iterator[GaugeMetricFamily]:
    """The hand-off's gauges for one scrape."""
    yield GaugeMetricFamily(
        "mxfs_handoff_enabled",
        "1 if complete models are handed to the kernel (handoff = true and the daemon may mount), else 0.",
        value=int(state.enabled),
    )
    yield GaugeMetricFamily(
        "mxfs_handoff_model_dirs",
        "Model directories the kernel serves now (a read-only bind of hard links to the blobs), not FUSE.",
        value=state.model_dirs,
    )


def start_series(metric: Counter | Histogram, label: str, values: Iterable[str]) -> None:
    """Create ``metric``'s series for every label value now, at zero.

    A series that first appears with its first event makes a ``rate()`` over it miss that step.
    """
    for value in values:
        metric.labels(**{label: value})


start_series(HUB_REQUEST_SECONDS, "kind", HUB_KINDS)
start_series(PEER_RANGES, "source", ("peer", "failed", "hub"))


def hub_request(kind: str) -> Timer:
    """``with metrics.hub_request("tree"): ...`` observes the request's latency, failed or not."""
    return HUB_REQUEST_SECONDS.labels(kind=kind).time()


__all__ = [
    "DOWNLOADED_BYTES",
    "DOWNLOADS_FAILED",
    "DOWNLOADS_FINISHED",
    "DOWNLOADS_STARTED",
    "EVENTS",
    "EVICTED_BYTES",
    "EVICTIONS",
    "EVICTION_CYCLES",
    "HANDOFF_OFF",
    "HUB_KINDS",
    "INODES",
    "PEER_FETCHED_BYTES",
    "PEER_RANGES",
    "PEER_SERVED_BYTES",
    "REGISTRY_ERRORS",
    "HandOffState",
    "handoff_families",
    "hub_request",
    "start_series",
]
