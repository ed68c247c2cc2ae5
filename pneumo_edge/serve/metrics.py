"""Prometheus metrics of one server (its own registry: several servers in one process
never share counters). Labels are fixed words, never a header value or a file name."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServeMetrics", "CONTENT_TYPE_LATEST"]


class ServeMetrics:
    def __init__(self) -> None:
        # no *_created series next to every counter: half the text, nothing lost
        from prometheus_client import disable_created_metrics
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pneumo_edge_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.instances = Counter("pneumo_edge_dicom_instances",
                                 "DICOM C-STORE instances by outcome (stored, duplicate, "
                                 "refused_busy, refused_invalid, error)", ["outcome"], registry=r)
        self.results = Counter("pneumo_edge_results", "Images finished by door and outcome "
                               "(done, failed)", ["door", "outcome"], registry=r)
        self.queue_depth = Gauge("pneumo_edge_queue_depth",
                                 "Images admitted and not yet finished", registry=r)
        self.batch_size = Histogram("pneumo_edge_batch_size", "Images per model run",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128),
                                    registry=r)
        self.latency = Histogram("pneumo_edge_latency_seconds",
                                 "From admission to result, per image, by door", ["door"],
                                 buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30),
                                 registry=r)
        self.model_seconds = Histogram("pneumo_edge_model_seconds", "Model time per batch",
                                       buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1),
                                       registry=r)
        self.forwarded = Counter("pneumo_edge_forwarded_reports",
                                 "Structured Reports by outcome (sent, retry, dead_letter)",
                                 ["outcome"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
