"""The live status page: one HTML page (tables + an inline SVG plot, no JavaScript) and
its data as /status.json, served by the standard library in a daemon thread."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from server_hub.monitoring.class_table import class_tables

REFRESH_S = 5
ASYNC_HEAD = ("<th>update</th><th title='hub versions since it was merged'>age</th>"
              "<th>weight</th><th>in bank</th><th>merged</th>")
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:15px;margin:20px 0 6px}
.sub{color:#666;margin-bottom:12px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}
table{border-collapse:collapse;background:#fff;border:1px solid #ddd}
th,td{padding:4px 10px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child,td.s{text-align:left}
.st-uploaded,.st-finished{color:#1a7f37} .st-silent,.st-gone{color:#c62828}
.st-uploading,.st-waiting{color:#b26a00}
svg{background:#fff;border:1px solid #ddd}
"""


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return escape(str(v))


def accuracy_svg(history: list[dict], width: int = 560, height: int = 220) -> str:
    """Test accuracy (and the devices' own) per round as an SVG line plot, y from 0 to 1."""
    left, right, top, bottom = 44, 16, 12, 34
    w, h = width - left - right, height - top - bottom
    n = len(history)
    last = max(n - 1, 1)

    def xy(i: int, acc: float) -> tuple[str, str]:
        return f"{left + w * i / last:.1f}", f"{top + h * (1 - acc):.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="accuracy per round">']
    for k in range(6):
        y = top + h * k / 5
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + w}" y2="{y:.1f}" '
                     f'stroke="#eee"/><text x="{left - 6}" y="{y + 4:.1f}" font-size="11" '
                     f'text-anchor="end" fill="#666">{1 - k / 5:.1f}</text>')
    step = max(1, -(-n // 10))  # at most ~10 round labels on the x axis
    for i in range(0, n, step):
        parts.append(f'<text x="{xy(i, 0)[0]}" y="{top + h + 14}" font-size="11" '
                     f'text-anchor="middle" fill="#666">{history[i]["round"]}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 2}" font-size="11" '
                 f'text-anchor="middle" fill="#666">round</text>')
    for key, color, label in (("test_accuracy", "#1565c0", "hub test accuracy"),
                              ("edge_accuracy", "#ef6c00", "device classifiers")):
        pts = [(i, r[key]) for i, r in enumerate(history) if r.get(key) is not None]
        if pts:
            coords = [xy(i, a) for i, a in pts]
            path = " ".join(f"{x},{y}" for x, y in coords)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                         f'points="{path}"/>')
            if len(coords) <= 50:  # dots only while they stay readable
                parts += [f'<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>'
                          for x, y in coords]
        ly = top + 14 + 16 * (key == "edge_accuracy")
        parts.append(f'<rect x="{left + 10}" y="{ly - 9}" width="10" height="10" '
                     f'fill="{color}"/><text x="{left + 26}" y="{ly}" font-size="12">'
                     f'{label}</text>')
    if not history:
        parts.append(f'<text x="{left + w / 2}" y="{top + h / 2}" text-anchor="middle" '
                     f'fill="#999">no round finished yet</text>')
    parts.append("</svg>")
    return "".join(parts)


def _td(v: object, digits: int = 3) -> str:
    return f"<td>{_fmt(v, digits)}</td>"


def _async_cells(d: dict) -> str:
    """Async rows: which update of the device the bank holds and how stale it is."""
    last = d.get("last_update_s")
    return (f"{_td(d.get('update'))}{_td(d.get('staleness'))}"
            f"{_td(d.get('weight'), 2)}{_td(d.get('bank_samples'))}"
            f"<td>{'-' if last is None else f'{last:.0f} s'}</td>")


def render_html(s: dict) -> str:
    last = s["history"][-1] if s["history"] else {}
    is_async = s.get("mode") == "async"
    progress = ([("updates merged", f"{s['version']} / {s['max_updates'] or '-'}"),
                 ("evaluations", str(s["rounds_completed"])), ("now", s["phase"])]
                if is_async else
                [("rounds done", f"{s['rounds_completed']} / {s['rounds']}"),
                 ("now", f"{s['phase']}, round {s['round']}" if s["round"] >= 0
                  else s["phase"])])
    cards = [*progress,
             ("devices", f"{s['devices_active']} active / {s['devices_known']}"),
             ("test accuracy", _fmt(last.get("test_accuracy"))),
             ("received", _mb(s["bytes_received"])), ("sent", _mb(s["bytes_sent"])),
             *[(f"{way} (last round / total)",
                f"{_mb(s[f'{way}_bytes']['last_round'] or 0)} / {_mb(s[f'{way}_bytes']['total'])}")
               for way in ("uplink", "downlink") if f"{way}_bytes" in s],
             ("samples", f"{s['samples_received']:,}"),
             ("rejected", str(sum(s["rejected"].values()))),
             ("quarantined", str(sum(s.get("quarantined", {}).values())))]
    rows = "".join(
        f"<tr><td>{escape(d['id'])}</td><td class='s st-{escape(d['state'].split()[0])}'>"
        f"{escape(d['state'])}</td><td>{_fmt(d.get('samples'))}</td>"
        f"<td>{_fmt(d.get('codec'))}</td>"
        f"{_async_cells(d) if is_async else _td(d['last_round'])}"
        f"<td>{_mb(d['bytes_up'])}</td><td>{_fmt(d.get('train_seconds'), 2)}</td>"
        f"<td>{_fmt(d.get('edge_accuracy'))}</td><td>{_fmt(d.get('skipped_files'))}</td>"
        f"<td>{_fmt((d.get('max_rss_bytes') or 0) / 1e6, 0) if d.get('max_rss_bytes') else '-'}"
        f"</td><td>{d['last_seen_s']:.0f} s</td></tr>" for d in s["devices"])
    rejected = "".join(f"<tr><td>{escape(k)}</td><td>{v}</td></tr>"
                       for k, v in sorted(s["rejected"].items())) or \
        "<tr><td colspan=2>none</td></tr>"
    quarantined = "".join(f"<tr><td>{escape(k)}</td><td>{v}</td></tr>"
                          for k, v in sorted(s.get("quarantined", {}).items())) or \
        "<tr><td colspan=2>none</td></tr>"
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}"><title>gkt-hub: round {s['round']}</title>
<style>{CSS}</style></head><body>
<h1>gkt-hub</h1><div class="sub">up {s['uptime_s']:.0f} s; refreshes every {REFRESH_S} s;
data as <a href="status.json">status.json</a></div>
<div class="cards">{''.join(f'<div class="card">{k}<b>{v}</b></div>' for k, v in cards)}</div>
<h2>Devices</h2><table><tr><th>device</th><th>state</th><th>samples</th><th>codec</th>
{ASYNC_HEAD if is_async else "<th>last round</th>"}<th>uploaded</th><th>train s</th>
<th>own acc.</th><th>skipped files</th><th>peak MB</th><th>last seen</th></tr>
{rows or "<tr><td colspan=14>no device yet</td></tr>"}</table>
<h2>Accuracy per round</h2>{accuracy_svg(s['history'])}
{class_tables(s.get("class_report"))}
<h2>Rejected messages</h2><table><tr><th>reason</th><th>count</th></tr>{rejected}</table>
<h2>Quarantined uploads</h2><table><tr><th>reason</th><th>count</th></tr>{quarantined}</table>
</body></html>"""


class StatusServer:
    """GET / (HTML), /status.json; everything else 404. ``port=0`` picks a free port."""

    def __init__(self, snapshot: Callable[[], dict], port: int, host: str = "127.0.0.1"):
        self.snapshot = snapshot
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/status.json":
                    body, kind = json.dumps(outer.snapshot()).encode(), "application/json"
                elif path in ("/", "/index.html"):
                    body, kind = render_html(outer.snapshot()).encode(), "text/html"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", f"{kind}; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every few seconds: not news
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="gkt-status",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
