"""Render the report dict as Markdown, a self-contained HTML page, or JSON.

HTML embeds its figures as base64 PNG and has no scripts or external links, so it opens
offline. Markdown links figures written next to it (``write_markdown``).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from device_profiles.tables import METHOD, Table, all_tables, source_rows, summary

FIGURE_TITLES = {
    "epoch_times": "Time per local epoch on each device",
    "gkt_vs_fedavg": "GKT vs FedAvg: FLOPs and parameters",
    "memory": "Where the RAM goes",
    "value": "Throughput against price",
}


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1, sort_keys=False) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    align = ["---:" if i in t.numeric else "---" for i in range(len(t.headers))]
    lines = [f"### {t.title}", "",
             "| " + " | ".join(_md_cell(h) for h in t.headers) + " |",
             "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"_{t.note}_"]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], figures: dict[str, str] | None = None) -> str:
    """``figures`` maps figure name -> relative path of its PNG (omitted if None)."""
    out = [f"# {report['title']}", "",
           f"Generated {report['generated']} on {report['host']}.", ""]
    out += [f"- {line}" for line in summary(report)] + [""]
    for name, path in (figures or {}).items():
        out += [f"![{FIGURE_TITLES.get(name, name)}]({path})", ""]
    out += ["\n\n".join(_md_table(t) for t in all_tables(report)), "", "## How the numbers "
            "are made", ""]
    out += [f"- {m}" for m in METHOD] + ["", "## Device specifications and sources", ""]
    for d in report["devices"]:
        out += [f"**{d['name']}** (`{d['id']}`, {d['cpu']}"
                + (f"; GPU {d['gpu']}" if d["gpu"] else "") + f"; from {d['file']})", ""]
        out += [f"- {k} = {v}: {src}" for k, v, src in source_rows(d)] + [""]
    return "\n".join(out)


def write_markdown(report: dict[str, Any], figures: dict[str, bytes], out: Path) -> list[Path]:
    """Write ``out`` and its PNGs in ``<stem>_files/``; returns every path written."""
    folder = out.parent / f"{out.stem}_files"
    folder.mkdir(parents=True, exist_ok=True)
    written, links = [], {}
    for name, png in figures.items():
        path = folder / f"{name}.png"
        path.write_bytes(png)
        written.append(path)
        links[name] = f"{folder.name}/{name}.png"
    out.write_text(render_markdown(report, links), encoding="utf-8")
    return [out, *written]


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1220px;color:#222;line-height:1.4;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
h3{font-size:1.02em;margin:1.4em 0 .4em}
table{border-collapse:collapse;font-size:12.5px;margin:.3em 0 .2em;width:100%}
th,td{border:1px solid #d4d4d4;padding:3px 6px;vertical-align:top}
th{background:#f1f4f8;text-align:left}td.num{text-align:right;white-space:nowrap}
tr:nth-child(even) td{background:#fafafa}td.bad{color:#b3261e;font-weight:600}
.note{color:#555;font-size:12px;margin:.2em 0 1em}.meta{color:#666;font-size:13px}
ul.summary li{margin:.25em 0}figure{margin:10px 0 18px}figure img{max-width:100%;
border:1px solid #e3e3e3}figcaption{font-size:12px;color:#555}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}
details{margin:.3em 0}summary{cursor:pointer;font-weight:600}.est{color:#9a5b00}
"""


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = []
    for row in t.rows:
        cells = []
        for i, c in enumerate(row):
            cls = ["num"] if i in t.numeric else []
            if c.startswith("NO"):
                cls.append("bad")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{html.escape(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return (f"<h3>{html.escape(t.title)}</h3><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>{note}")


def _figure(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    title = html.escape(FIGURE_TITLES.get(name, name))
    return (f'<figure><img alt="{title}" src="data:image/png;base64,{data}">'
            f"<figcaption>{title}</figcaption></figure>")


def _source_row(field: str, value: str, source: str) -> str:
    cls = ' class="est"' if source.startswith("ESTIMATE") else ""
    return (f'<tr><td>{html.escape(field)}</td><td class="num">{html.escape(value)}</td>'
            f"<td{cls}>{html.escape(source)}</td></tr>")


def render_html(report: dict[str, Any], figures: dict[str, bytes]) -> str:
    tables = all_tables(report)
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{html.escape(report['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(report['title'])}</h1>",
        f"<p class=\"meta\">Generated {html.escape(report['generated'])} on "
        f"{html.escape(report['host'])}.</p>",
        "<ul class=\"summary\">" + "".join(f"<li>{html.escape(s)}</li>"
                                           for s in summary(report)) + "</ul>",
    ]
    # all plots first, two columns: the tall per-device chart beside the three others
    left = [_figure(n, figures[n]) for n in ("epoch_times",) if n in figures]
    right = [_figure(n, figures[n]) for n in ("value", "gkt_vs_fedavg", "memory")
             if n in figures]
    if figures:
        parts.append(f'<div class="grid"><div>{"".join(left)}</div>'
                     f'<div>{"".join(right)}</div></div>')
    parts.append("<h2>Devices</h2>" + _html_table(tables[0]))
    parts += ["<h2>GKT against FedAvg</h2>", _html_table(tables[2]), _html_table(tables[1]),
              "<h2>Models and measurements</h2>"]
    parts += [_html_table(t) for t in tables[3:]]
    parts.append("<h2>How the numbers are made</h2><ul>"
                 + "".join(f"<li>{html.escape(m)}</li>" for m in METHOD) + "</ul>")
    parts.append("<h2>Device specifications and sources</h2>")
    for d in report["devices"]:
        rows = "".join(_source_row(k, v, src) for k, v, src in source_rows(d))
        gpu = f"; GPU {d['gpu']}" if d["gpu"] else ""
        parts.append(f"<details><summary>{html.escape(d['name'])}</summary><p class=\"note\">"
                     f"{html.escape(d['cpu'] + gpu)}; from {html.escape(d['file'])}. "
                     f"{html.escape(d['notes'])}</p><table><thead><tr><th>field</th>"
                     f"<th>value</th><th>source</th></tr></thead><tbody>{rows}</tbody></table>"
                     "</details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
