"""``gkt-profile`` end to end through ``main(argv)``."""

from __future__ import annotations

import json

import pytest

from device_profiles import cli
from device_profiles.calibration import load_calibration


def test_models_json(capsys):
    assert cli.main(["models", "--json", "--models", "resnet8"]) == 0
    out = json.loads(capsys.readouterr().out)
    (edge,) = out["models"]
    assert edge["params"] == 10_586 and edge["conv_linear_macs"] == 9_618_048
    assert "1 flop = 1 multiply-add" in edge["conventions"]["forward_macs"]
    assert "2 flops per multiply-add" in edge["conventions"]["train_flops_per_sample"]


def test_calibrate_writes_state_used_by_estimates(tmp_path, capsys):
    state = tmp_path / "cal.json"
    rc = cli.main(["-q", "calibrate", "--steps", "2", "--batches", "8", "--state", str(state)])
    assert rc == 0
    assert "saved to" in capsys.readouterr().out
    cal = load_calibration(state)
    (pt,) = cal.points
    assert (pt.model, pt.batch, pt.steps) == ("resnet8", 8, 2)
    assert 0 < pt.efficiency < 1.5 and pt.step_seconds > 0
    assert 0 < cal.matmul_gflops <= cal.peak_gflops  # a faster matmul raises the peak


def test_format_follows_the_suffix():
    parse = cli.build_parser().parse_args
    assert cli._format(parse(["report", "--out", "r.html"])) == "html"
    assert cli._format(parse(["report", "--out", "r.json"])) == "json"
    assert cli._format(parse(["report"])) == "md"
    assert cli._format(parse(["report", "--out", "r.html", "--format", "json"])) == "json"


def test_unknown_device_is_a_usage_error(capsys):
    assert cli.main(["report", "--devices", "pdp-11", "--no-measure"]) == 2
    assert "unknown device 'pdp-11'" in capsys.readouterr().err


@pytest.mark.slow
def test_report_html_end_to_end(tmp_path, capsys):
    out = tmp_path / "r.html"
    rc = cli.main(["report", "--devices", "rpi4b-4gb,this-machine", "--no-measure",
                   "--out", str(out), "--state", str(tmp_path / "none.json")])
    assert rc == 0
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "Raspberry Pi 4 Model B (4 GB)" in page and "This machine" in page
    assert "profiling resnet110" in capsys.readouterr().err  # progress on stderr
