"""--log-format: readable text by default, one JSON object per line with json."""

from __future__ import annotations

import io
import json
import logging

import pytest

from edge_runtime.ops.logs import setup_logging


@pytest.fixture
def restore_root():
    root, gkt = logging.getLogger(), logging.getLogger("gkt")
    handlers, level, gkt_level = list(root.handlers), root.level, gkt.level
    gkt.setLevel(logging.NOTSET)  # `gkt-export --quiet` run in-process by other tests sets it
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    gkt.setLevel(gkt_level)


def test_json_lines(restore_root):
    out = io.StringIO()
    setup_logging("json", "info", stream=out)
    log = logging.getLogger("gkt.edge")
    log.info("round %d complete", 3, extra={"device": "pi-1"})
    log.debug("not shown at info")
    try:
        raise ValueError("bad \"quoted\"\nvalue")
    except ValueError:
        log.exception("failed")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]  # every line parses
    assert len(lines) == 2
    first, second = lines
    assert (first["level"], first["logger"], first["msg"], first["device"]) == \
        ("INFO", "gkt.edge", "round 3 complete", "pi-1")
    assert first["ts"].endswith("+00:00") and "T" in first["ts"]
    assert second["level"] == "ERROR" and 'ValueError: bad "quoted"' in second["exc"]


def test_text_is_the_default(restore_root):
    out = io.StringIO()
    setup_logging(stream=out)
    logging.getLogger("gkt.hub").warning("round %d deadline", 2)
    line = out.getvalue().strip()
    assert line.endswith("WARNING gkt.hub: round 2 deadline") and not line.startswith("{")
