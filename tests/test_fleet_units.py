"""Fleet snapshot pieces that need no network: untrusted device reports, the plot."""

from __future__ import annotations

from server_hub.fleet import clean_report
from server_hub.status_page import accuracy_svg, render_html


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
