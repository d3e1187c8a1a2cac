"""Where every benchmark's figures go: one JSON file, its folder made if needed."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: str | Path, out: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
