"""The report's figures as PNG bytes (matplotlib's object API: no pyplot, no global backend)."""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.transforms import Bbox

# where a point's label may go, as (x, y) multiples of the marker's radius (+ a gap) and
# alignment: lower right, upper right, lower left, upper left, then further out
_LABEL_SPOTS = ((0.7, -1.2, "left"), (0.7, 0.7, "left"), (-0.7, -1.2, "right"),
                (-0.7, 0.7, "right"), (0.7, -2.2, "left"), (0.7, 1.7, "left"))

GKT_COLOR, F56_COLOR, F110_COLOR = "#2a7ab0", "#e39c37", "#c2452d"
MEMORY_PARTS = (("os", "OS", "#9e9e9e"), ("runtime", "python + torch", "#7fa7c9"),
                ("dataset", "dataset", "#b4d3a5"), ("model_states", "weights+grads+Adam",
                                                    "#f2c46d"),
                ("batch", "activations (batch)", "#d9764a"),
                ("overhead", "malloc + oneDNN overhead", "#b58db6"))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _label(e: dict[str, Any]) -> str:
    return f"{e['device']} ({e['target'].upper()})"


def epoch_times(report: dict[str, Any]) -> bytes:
    """Seconds per local epoch on every device: GKT edge model against FedAvg's models."""
    gkt = report["estimates"]
    series = [("GKT ResNet-8", gkt, GKT_COLOR)]
    for name, color in (("resnet56", F56_COLOR), ("resnet110", F110_COLOR)):
        if name in report["fedavg_estimates"]:
            series.append((f"FedAvg {name.replace('resnet', 'ResNet-')}",
                           report["fedavg_estimates"][name], color))
    n = len(gkt)
    fig = Figure(figsize=(7, 0.3 * n * len(series) / 2 + 1.8))
    ax = fig.add_subplot()
    height = 0.8 / len(series)
    for k, (title, rows, color) in enumerate(series):
        ys = [i + (k - (len(series) - 1) / 2) * height for i in range(n)]
        xs = [r["epoch_seconds"] for r in rows]
        bars = ax.barh(ys, xs, height=height, color=color, label=title)
        for bar, r in zip(bars, rows):
            if not r["fits"]:
                bar.set_hatch("///")
                bar.set_alpha(0.45)
                ax.text(bar.get_width() * 1.05, bar.get_y() + height / 2,
                        "does not fit", va="center", fontsize=7, color="#555")
    ax.set_yticks(range(n), [_label(e) for e in gkt], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    longest = max(r["epoch_seconds"] for _t, rows, _c in series for r in rows)
    ax.set_xlim(right=longest * 6)  # room for the "does not fit" labels
    ax.set_xlabel(f"seconds per local epoch ({report['settings']['samples']} samples, "
                  f"batch {report['settings']['batch']}; log scale)")
    ax.grid(axis="x", which="both", alpha=0.3)
    handles = [Patch(color=color, label=title) for title, _rows, color in series]
    handles.append(Patch(facecolor="white", edgecolor="#555", hatch="///",
                         label="exceeds the device's RAM"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.06 * 24 / n),
              ncols=2, fontsize=8, frameon=False)
    ax.set_title("Time per local epoch: GKT edge model vs FedAvg")
    return _png(fig)


def memory(report: dict[str, Any]) -> bytes:
    """Where each device's RAM goes when training the edge model, as % of its RAM."""
    rows = report["estimates"]
    fig = Figure(figsize=(9, 0.36 * len(rows) + 1.5))
    ax = fig.add_subplot()
    for i, e in enumerate(rows):
        m, left = e["memory"], 0.0
        for key, title, color in MEMORY_PARTS:
            width = 100 * m[key] / m["ram"]
            ax.barh(i, width, left=left, color=color, label=title if i == 0 else None)
            left += width
        ax.text(min(left, 100) + 1, i, f"{m['total'] / 2**30:.2f} of {m['ram'] / 2**30:.0f} GiB",
                va="center", fontsize=7)
    ax.axvline(100, color="#c2452d", lw=1.2, ls="--")
    ax.set_yticks(range(len(rows)), [_label(e) for e in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 125)
    ax.set_xlabel("% of the device's RAM (dashed line: all of it)")
    ax.legend(loc="lower right", fontsize=7, ncols=2)
    ax.set_title(f"Memory when training ResNet-8 at batch {report['settings']['batch']}")
    return _png(fig)


def gkt_vs_fedavg(report: dict[str, Any]) -> bytes:
    """How much less a GKT device computes and stores than a FedAvg device."""
    comp = report["comparison"]
    names = list(comp)
    metrics = (("forward_macs_ratio", "forward multiply-adds"),
               ("train_flops_ratio", "training FLOPs (fwd+bwd)"), ("params_ratio", "parameters"))
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.add_subplot()
    width = 0.8 / len(metrics)
    colors = ("#2a7ab0", "#6aa84f", "#e39c37")
    for k, ((key, title), color) in enumerate(zip(metrics, colors)):
        xs = [i + (k - 1) * width for i in range(len(names))]
        vals = [comp[n][key] for n in names]
        bars = ax.bar(xs, vals, width=width, color=color, label=title)
        for bar, v in zip(bars, vals):
            ax.text(bar.get_x() + width / 2, v * 1.08, f"{v:.1f}x", ha="center", fontsize=8)
    for i, n in enumerate(names):
        paper = comp[n]["paper"]
        ax.plot([i - 1.5 * width, i - 0.5 * width], [paper["flops"]] * 2, color="k", lw=1)
        ax.plot([i + 0.5 * width, i + 1.5 * width], [paper["params"]] * 2, color="k", lw=1)
    ax.plot([], [], color="k", lw=1, label="paper's headline")
    ax.set_yscale("log")
    ax.set_ylim(1, max(comp[n]["params_ratio"] for n in names) * 2.5)
    ax.set_xticks(range(len(names)), [f"FedAvg {n.replace('resnet', 'ResNet-')} / GKT ResNet-8"
                                      for n in names])
    ax.set_ylabel("ratio (log scale)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("What a device saves with GKT instead of FedAvg")
    return _png(fig)


def value(report: dict[str, Any]) -> bytes:
    """Training throughput against price; marker size ~ samples per joule."""
    rows = [e for e in report["estimates"] if e["price_usd"] and e["fits"]]
    fig = Figure(figsize=(8, 5.2))
    ax = fig.add_subplot()
    best = max((e["samples_per_joule"] or 0 for e in rows), default=1) or 1
    renderer = FigureCanvasAgg(fig).get_renderer()
    placed: list[Any] = []  # label boxes so far, in pixels

    def place(text: str, xy: tuple[float, float], radius: float) -> None:
        """The first spot where the label overlaps no marker or earlier label (else the
        first spot). ``radius``: the marker's, in points."""
        spots = [((radius + 2) * fx, (radius + 2) * fy, ha) for fx, fy, ha in _LABEL_SPOTS]
        for dx, dy, ha in spots:
            label = ax.annotate(text, xy, fontsize=7, xytext=(dx, dy), ha=ha,
                                textcoords="offset points")
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed):
                placed.append(box)
                return
            label.remove()
        dx, dy, ha = spots[0]
        ax.annotate(text, xy, fontsize=7, xytext=(dx, dy), ha=ha, textcoords="offset points")

    # RAM variants of one board have the same speed: label each such group once
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for e in rows:
        key = (e["device"].split("-")[0], e["target"], round(e["samples_per_second"], 1))
        groups.setdefault(key, []).append(e)
    sizes = {}
    for members in groups.values():
        for e in members:
            size = 30 + 300 * math.sqrt((e["samples_per_joule"] or 0) / best)
            color = "#6aa84f" if e["target"] == "gpu" else "#2a7ab0"
            ax.scatter(e["price_usd"], e["samples_per_second"], s=size, color=color,
                       alpha=0.7, edgecolor="k", lw=0.5)
            sizes[(e["price_usd"], e["samples_per_second"])] = size
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.margins(x=0.2, y=0.15)  # room for the labels of the outermost points
    for (x, y), size in sizes.items():  # labels keep off the markers too
        cx, cy = ax.transData.transform((x, y))
        r = math.sqrt(size) / 2 * fig.dpi / 72
        placed.append(Bbox([[cx - r, cy - r], [cx + r, cy + r]]))
    for members in groups.values():  # after the axes are final, so boxes are where drawn
        first = min(members, key=lambda e: e["price_usd"])
        label = first["device"] if len(members) == 1 else (
            f"{first['device']} .. {members[-1]['device'].split('-')[-1]}")
        xy = (first["price_usd"], first["samples_per_second"])
        place(label, xy, math.sqrt(sizes[xy]) / 2)
    ax.scatter([], [], color="#2a7ab0", label="CPU")
    ax.scatter([], [], color="#6aa84f", label="GPU")
    ax.set_xlabel("price (USD, log scale)")
    ax.set_ylabel("training samples / s (log scale)")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Most for the money (up and left is better; bigger = more samples per joule)")
    return _png(fig)


FIGURES = {"epoch_times": epoch_times, "memory": memory, "gkt_vs_fedavg": gkt_vs_fedavg,
           "value": value}


def render_all(report: dict[str, Any]) -> dict[str, bytes]:
    return {name: fn(report) for name, fn in FIGURES.items()}
