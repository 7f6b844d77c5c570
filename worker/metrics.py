"""Prometheus metrics of the worker, on a registry of its own."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Latency buckets in seconds: from 1 ms (a warm batch) to 10 s (a rebalance).
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class WorkerMetrics:
    """Counters and histograms the loop updates once per batch."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Counter("refold_events_in", "Rating events decoded", registry=r)
        self.events_applied = Counter("refold_events_applied", "Events applied", registry=r)
        self.duplicates = Counter("refold_events_duplicate", "Events skipped as dups", registry=r)
        self.replayed = Counter(
            "refold_events_replayed",
            "Events re-read after a restart that the restored state already reflects",
            registry=r,
        )
        self.videos_in = Counter("refold_videos_in", "Video events registered", registry=r)
        self.lists_out = Counter("refold_lists_out", "Lists published", ["strategy"], registry=r)
        self.dead_letters = Counter(
            "refold_dead_letters", "Messages sent to the DLQ", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "refold_batch_size", "Records per polled batch", buckets=_BATCH, registry=r
        )
        self.fold_in_seconds = Histogram(
            "refold_fold_in_seconds", "Fold-in + top-k time per batch", buckets=_LATENCY, registry=r
        )
        self.batch_seconds = Histogram(
            "refold_batch_seconds", "Whole batch time incl. publish", buckets=_LATENCY, registry=r
        )
        # The end-to-end latency in parts: before the worker (producer linger, brokers, the
        # consumer's fetch and queue), then the batch itself (batch_seconds), of which the
        # wait for the brokers' acknowledgements is publish_confirm_seconds.
        self.event_wait = Histogram(
            "refold_event_wait_seconds",
            "Kafka timestamp of an event to the poll that handed it to the worker",
            buckets=_LATENCY,
            registry=r,
        )
        self.publish_confirm_seconds = Histogram(
            "refold_publish_confirm_seconds",
            "Wait for the brokers to acknowledge a batch's lists, dead letters and state",
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "refold_end_to_end_latency_seconds",
            "Kafka timestamp of the event to list acknowledged",
            buckets=_LATENCY,
            registry=r,
        )
        self.lag = Gauge("refold_consumer_lag", "Records behind the high watermark", registry=r)
        self.users = Gauge("refold_users_in_memory", "Users with live state", registry=r)
        self.model_info = Gauge(
            "refold_model_loaded", "1 for the model version in use", ["version"], registry=r
        )
        self.heartbeat = Gauge(
            "refold_loop_heartbeat_timestamp_seconds", "Last loop iteration (unix time)", registry=r
        )
        self.restored = Counter("refold_state_restored_users", "Users restored", registry=r)
        self.item_contributions_out = Counter(
            "refold_item_contributions_out", "Contributions sent to new videos' owners", registry=r
        )
        self.item_updates_out = Counter(
            "refold_item_updates_out", "New-video solves published as their owner", registry=r
        )
        self.item_updates_in = Counter(
            "refold_item_updates_in", "New-video factors installed from owners", registry=r
        )
        self.popularity_pairs_out = Counter(
            "refold_popularity_pairs_out", "Pair records sent to videos' owners", registry=r
        )
        self.popularity_updates_out = Counter(
            "refold_popularity_updates_out", "Popularity counts published as owner", registry=r
        )
        self.popularity_updates_in = Counter(
            "refold_popularity_updates_in", "Popularity counts installed from owners", registry=r
        )
        self.new_videos_owned = Gauge(
            "refold_new_videos_owned", "New videos this worker owns (solves)", registry=r
        )

    def beat(self) -> None:
        self.heartbeat.set(time.time())

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics (any path answers) on host:port."""
        start_http_server(port, addr=host, registry=self.registry)
