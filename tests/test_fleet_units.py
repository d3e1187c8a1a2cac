"""Fleet snapshot pieces that need no network: untrusted device reports, the plot."""

from __future__ import annotations

from server_hub.monitoring.snapshot import clean_report
from server_hub.monitoring.status_page import accuracy_svg, render_html


def test_device_reports_keep_only_known_finite_numbers():
    meta = {"device_metrics": {"train_seconds": 1.5, "samples": 360, "max_rss_bytes": "9e9",
                               "edge_accuracy": float("nan"), "evil": 1, "__class__": 2}}
    assert clean_report(meta) == {"train_seconds": 1.5, "samples": 360}
    assert clean_report({"device_metrics": {"samples": True}}) == {}
    assert clean_report({"device_metrics": [1, 2]}) == {} and clean_report({}) == {}


def test_plot_and_page_escape_and_cope_with_nothing_yet():
    assert "no round finished yet" in accuracy_svg([])
    hist = [{"round": r, "test_accuracy": 0.1 * r, "edge_accuracy": None, "seconds": 1.0}
            for r in range(3)]
    svg = accuracy_svg(hist)
    assert svg.count("<polyline") == 1 and svg.count("<circle") == 3
    snap = {"round": 2, "rounds": 5, "phase": "collect", "rounds_completed": 2,
            "samples_received": 10, "devices_known": 1, "devices_active": 1,
            "bytes_received": 1, "bytes_sent": 2, "uptime_s": 3.0, "history": hist,
            "rejected": {"<b>": 1},
            "devices": [{"id": "<script>x</script>", "state": "uploading", "samples": 5,
                         "codec": "q8", "last_round": 2, "bytes_up": 10, "last_seen_s": 0.5}]}
    html = render_html(snap)
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;" in html


def test_async_device_states_updates_and_staleness(tmp_path):
    """An async hub (fake link) reports per device: uploading, waiting for logits, training,
    gone, finished; which update is in the bank, merged at which version, how stale."""
    from prometheus_client.core import Metric
    from test_async_service import hello, send, service, upload

    from server_hub.monitoring.endpoints import format_status
    from server_hub.monitoring.metrics import FleetCollector
    from server_hub.monitoring.snapshot import FleetObserver

    svc, link = service(tmp_path)
    link.bytes_received = link.bytes_sent = 0
    now = [100.0]
    fleet = FleetObserver(clock=lambda: now[0])
    svc.add_observer(fleet)

    def rows() -> dict:
        return {d["id"]: d for d in fleet.snapshot(svc)["devices"]}

    send(svc, "d", [hello("d")])
    send(svc, "e", [hello("e")])
    assert rows()["d"]["state"] == "training" and rows()["d"]["update"] is None  # round 0
    first = upload("d", 0)
    send(svc, "d", first[:1])
    assert rows()["d"]["state"] == "uploading"
    now[0] = 105.0
    send(svc, "d", first[1:])
    d = rows()["d"]
    assert d["state"] == "waiting for logits" and d["last_update_s"] == 0.0
    assert (d["update"], d["version"], d["staleness"], d["weight"], d["bank_samples"]) == \
        (0, 1, 0, 1.0, 6)
    svc.send_logits("d")  # trained on: its logits go out, it trains its next round
    now[0] = 108.0
    send(svc, "e", upload("e", 0, seed=2))
    d, e = rows()["d"], rows()["e"]
    assert d["state"] == "training" and d["last_update_s"] == 3.0
    assert (d["staleness"], d["weight"]) == (1, 0.95) and e["state"] == "waiting for logits"
    snap = fleet.snapshot(svc)
    assert (snap["mode"], snap["version"], snap["max_updates"]) == ("async", 2, 5)
    text = format_status(snap)
    assert "async: 2/5 uploads merged" in text and "waiting for logits" in text
    assert "updates merged" in render_html(snap) and "<td>0.95</td>" in render_html(snap)
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in FleetCollector(svc, fleet).collect() if isinstance(fam, Metric)
               for s in fam.samples}
    assert metrics[("gkt_hub_version", ())] == 2
    assert metrics[("gkt_device_staleness_versions", (("device", "d"),))] == 1
    assert metrics[("gkt_device_state", (("device", "e"), ("state", "waiting for logits")))] == 1
    now[0] += 2 * svc.cfg.round_deadline + 1  # silent that long: gone, and not active
    assert {x["state"] for x in rows().values()} == {"gone"}
    assert fleet.snapshot(svc)["devices_active"] == 0
    svc.intake.phase = "done"
    assert {x["state"] for x in rows().values()} == {"finished"}
