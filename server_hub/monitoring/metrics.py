"""Prometheus metrics of a running hub (prometheus_client), read from the fleet snapshot.

Gauges and counters are produced at scrape time from ``FleetObserver.snapshot`` (one
source of truth with the status page); the round-duration histogram is a real
``Histogram`` observed when a round ends. Device-reported figures are labelled by device.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server_hub.monitoring.results import RoundRecord
from server_hub.monitoring.snapshot import FleetObserver

ROUND_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600, float("inf"))
DEVICE_GAUGES = {  # reported name -> (metric, help)
    "train_seconds": ("gkt_device_train_seconds", "local training time of its last round"),
    "samples": ("gkt_device_samples", "training samples on the device"),
    "max_rss_bytes": ("gkt_device_max_rss_bytes", "peak resident memory of the device process"),
    "edge_accuracy": ("gkt_device_edge_accuracy", "test accuracy of its own local classifier"),
    "skipped_files": ("gkt_device_skipped_files", "own-data files it could not use"),
}


class FleetCollector(Collector):
    """Prometheus metrics computed from a fleet snapshot at each scrape."""

    def __init__(self, service, fleet: FleetObserver) -> None:
        self.service, self.fleet = service, fleet

    def collect(self):
        s = self.fleet.snapshot(self.service)

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=float("nan") if value is None else value)

        yield gauge("gkt_hub_devices_known", "devices that said hello", s["devices_known"])
        yield gauge("gkt_hub_devices_active", "known devices heard from recently (not silent)",
                    s["devices_active"])
        yield gauge("gkt_hub_round", "current round (-1 before the first)", s["round"])
        yield gauge("gkt_hub_rounds_target", "rounds the federation runs", s["rounds"])
        yield CounterMetricFamily("gkt_hub_rounds_completed", "rounds completed by this process",
                                  value=s["rounds_completed"])
        yield CounterMetricFamily("gkt_hub_received_bytes", "MQTT payload bytes received",
                                  value=s["bytes_received"])
        yield CounterMetricFamily("gkt_hub_sent_bytes", "MQTT payload bytes sent",
                                  value=s["bytes_sent"])
        for way in ("uplink", "downlink"):
            b = s[f"{way}_bytes"]
            yield gauge(f"gkt_hub_round_{way}_bytes", f"{way} bytes of the last completed round",
                        b["last_round"])
            yield CounterMetricFamily(f"gkt_hub_{way}_bytes", f"{way} bytes of completed rounds",
                                      value=b["total"])
        yield CounterMetricFamily("gkt_hub_samples_received", "samples in completed uploads",
                                  value=s["samples_received"])
        rejected = CounterMetricFamily("gkt_hub_rejected_messages", "messages rejected",
                                       labels=["reason"])
        for reason, n in sorted(s["rejected"].items()):
            rejected.add_metric([reason], n)
        yield rejected
        quarantined = CounterMetricFamily(
            "gkt_hub_quarantined_uploads", "uploads dropped for their round (training or "
            "journal replay could not use them)", labels=["reason"])
        for reason, n in sorted(s.get("quarantined", {}).items()):
            quarantined.add_metric([reason], n)
        yield quarantined
        last = s["history"][-1] if s["history"] else {}
        yield gauge("gkt_hub_test_accuracy", "test accuracy after the last round",
                    last.get("test_accuracy"))
        yield gauge("gkt_hub_edge_accuracy", "mean device-classifier accuracy, last round",
                    last.get("edge_accuracy"))
        per_device = {k: GaugeMetricFamily(name, doc, labels=["device"])
                      for k, (name, doc) in DEVICE_GAUGES.items()}
        up = CounterMetricFamily("gkt_device_sent_bytes", "bytes a device uploaded",
                                 labels=["device"])
        seen = GaugeMetricFamily("gkt_device_last_seen_seconds", "seconds since its last "
                                 "accepted message", labels=["device"])
        for d in s["devices"]:
            for k, fam in per_device.items():
                if d.get(k) is not None:
                    fam.add_metric([d["id"]], d[k])
            up.add_metric([d["id"]], d["bytes_up"])
            seen.add_metric([d["id"]], d["last_seen_s"])
        yield from per_device.values()
        yield up
        yield seen
        yield from self.async_metrics(s)

    @staticmethod
    def async_metrics(s: dict):
        """Async mode: the hub version and how stale each device's features in the bank are."""
        if s.get("mode") != "async":
            return
        yield GaugeMetricFamily("gkt_hub_version", "async: device uploads merged so far",
                                value=s["version"])
        state = GaugeMetricFamily("gkt_device_state", "1 for the state a device is in",
                                  labels=["device", "state"])
        stale = GaugeMetricFamily("gkt_device_staleness_versions", "async: hub versions since "
                                  "the device's features in the bank were merged",
                                  labels=["device"])
        since = GaugeMetricFamily("gkt_device_seconds_since_update", "async: seconds since "
                                  "the device's newest upload was merged", labels=["device"])
        for d in s["devices"]:
            state.add_metric([d["id"], d["state"]], 1)
            if d.get("staleness") is not None:
                stale.add_metric([d["id"]], d["staleness"])
            if d.get("last_update_s") is not None:
                since.add_metric([d["id"]], d["last_update_s"])
        yield from (state, stale, since)


class HubMetrics:
    """A registry for one hub; call ``on_round`` after each round, serve with ``serve``."""

    def __init__(self, service, fleet: FleetObserver) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(service, fleet))
        self.round_seconds = Histogram("gkt_hub_round_duration_seconds",
                                       "wall-clock time of a round", buckets=ROUND_BUCKETS,
                                       registry=self.registry)
        self._server = None
        self.port: int | None = None

    def on_round(self, rec: RoundRecord) -> None:
        self.round_seconds.observe(rec.seconds)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics in a daemon thread; returns the bound port (port 0 = any free)."""
        self._server, _ = start_http_server(port, host, registry=self.registry)
        self.port = self._server.server_port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
