"""The report's tables as plain rows of text, shared by the Markdown and HTML renderers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from device_profiles.estimate import human_bytes, human_seconds


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    numeric: tuple[int, ...] = ()  # columns to right-align


def _m(n: float) -> str:
    return f"{n / 1e6:,.2f} M"


def _fits(e: dict[str, Any]) -> str:
    m = e["memory"]
    pct = 100 * m["total"] / m["ram"]
    return f"{'yes' if e['fits'] else 'NO'} ({pct:.0f}% of {m['ram'] / 2**30:.0f} GiB)"


def _opt(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _device(e: dict[str, Any]) -> str:
    return f"{e['name']} [{e['target'].upper()}]"


def device_table(report: dict[str, Any]) -> Table:
    s = report["settings"]
    rows = []
    for e in report["estimates"]:
        energy = e["energy_epoch_j"]
        rows.append([
            _device(e), _fits(e), f"{e['largest_batch']:,}", human_seconds(e["epoch_seconds"]),
            human_seconds(e["round_seconds"]),
            "n/a" if energy is None else f"{energy / 3600:.3f} Wh",
            _opt(e["samples_per_s_per_100usd"], ".1f"), _opt(e["samples_per_joule"], ".1f"),
            e["trust"]])
    return Table(
        f"Training the GKT edge model (ResNet-8) on each device: batch {s['batch']}, "
        f"{s['samples']:,} samples, {s['epochs']} local epoch(s), codec {s['codec']}, "
        f"{s['link_mbps']:g} Mbit/s link",
        ["device", "fits in RAM", "largest batch", "epoch", "round", "energy / epoch",
         "samples/s per $100", "samples / J", "trust"],
        rows,
        note="round = local epochs + feature extraction + upload/download of one round's "
             "features and logits (the hub's own training time is not included). Energy "
             "uses the catalog's power under load (an upper bound for Jetson power modes).",
        numeric=(2, 3, 4, 5, 6, 7))


def fedavg_table(report: dict[str, Any]) -> Table:
    gkt = report["estimates"]
    fed = report["fedavg_estimates"]
    names = [n for n in ("resnet56", "resnet110") if n in fed]
    headers = ["device", "GKT ResNet-8 epoch"]
    for n in names:
        headers += [f"FedAvg {n} epoch", f"{n} fits"]
    headers += ["GKT bytes/round", "FedAvg bytes/round (56 / 110)"]
    rows = []
    for i, e in enumerate(gkt):
        row = [_device(e), human_seconds(e["epoch_seconds"])]
        for n in names:
            f = fed[n][i]
            ratio = f["epoch_seconds"] / e["epoch_seconds"]
            row += [f"{human_seconds(f['epoch_seconds'])} ({ratio:.1f}x)",
                    "yes" if f["fits"] else f"NO (max batch {f['largest_batch']})"]
        row.append(human_bytes(e["bytes_up"] + e["bytes_down"]))
        row.append(" / ".join(human_bytes(fed[n][i]["bytes_up"] + fed[n][i]["bytes_down"])
                              for n in names))
        rows.append(row)
    return Table(
        "GKT against FedAvg on each device (same batch, samples and efficiency source)",
        headers, rows,
        note="FedAvg trains the whole ResNet-56/110 on the device and ships its weights up "
             "and down every round; GKT trains ResNet-8 and ships features, logits and labels "
             "(fp32/fp16/q8/q4 + zstd) up and the hub's logits down.",
        numeric=tuple(range(1, len(headers))))


def ratio_table(report: dict[str, Any]) -> Table:
    rows = []
    for name, r in report["comparison"].items():
        rows.append([f"{name} (FedAvg) / resnet8 (GKT)", f"{r['forward_macs_ratio']:.2f}x",
                     f"{r['train_flops_ratio']:.2f}x", f"{r['params_ratio']:.1f}x",
                     f"{r['paper']['flops']}x / ~{r['paper']['params']}x"])
    return Table("How much less a GKT device computes and stores",
                 ["ratio", "forward multiply-adds (conv+linear)", "training FLOPs",
                  "parameters", "paper (FLOPs / params)"], rows,
                 note="The paper's parameter ratios (~54x/~105x) were computed from slightly "
                      "different counts; ours count every parameter of the PyTorch models.",
                 numeric=(1, 2, 3))


def model_table(report: dict[str, Any]) -> Table:
    rows = []
    for m in report["models"]:
        rows.append([m["title"], f"{m['params']:,}", _m(m["conv_linear_macs"]),
                     _m(m["forward_macs"]), _m(m["train_flops_per_sample"]),
                     human_bytes(m["saved_activation_bytes_per_sample"]),
                     human_bytes(m["predicted_training_bytes"])])
    return Table(
        f"Models (per 32x32 sample; training memory at batch {report['settings']['batch']})",
        ["model", "params", "fwd MACs conv+linear", "fwd MACs all ops (fvcore)",
         "train FLOPs (torch)", "saved activations", "training memory"], rows,
        note=f"{report['conventions']['forward_macs']}. {report['conventions']['train_flops']} "
             "(convs and matmuls only). Training memory (torch's peak) = weights, grads and "
             "Adam states + batch x (input + saved activations + 2 x largest output); a "
             "process grows by ~50 MiB + 1.3x that (malloc, oneDNN).",
        numeric=(1, 2, 3, 4, 5, 6))


def operator_table(report: dict[str, Any], model: str = "resnet8") -> Table:
    m = next(x for x in report["models"] if x["name"] == model)
    ops = sorted(m["forward_macs_by_operator"].items(), key=lambda kv: -kv[1])
    mods = sorted(m["forward_macs_by_module"].items(), key=lambda kv: -kv[1])
    rows = [[f"operator: {k}", f"{v:,}", f"{100 * v / m['forward_macs']:.1f}%"] for k, v in ops]
    rows += [[f"module: {k}", f"{v:,}", f"{100 * v / m['forward_macs']:.1f}%"] for k, v in mods]
    return Table(f"{m['title']}: forward multiply-adds by operator and by module (fvcore)",
                 ["where", "multiply-adds", "share"], rows, numeric=(1, 2))


def memory_check_table(report: dict[str, Any]) -> Table:
    rt = report["runtime"]
    rows = [["fresh python", human_bytes(rt["python_bytes"]), "measured (RSS)"],
            ["import torch", human_bytes(rt["torch_bytes"]), f"measured (RSS), torch "
                                                               f"{rt['torch_version']}"],
            ["device stack (torch, torchvision, numpy, paho, edge_runtime)",
             human_bytes(rt["device_stack_bytes"]), "measured (RSS); used as the runtime of "
                                                    "devices without their own estimate"]]
    p = report["measured_peak"]
    if p is not None:
        rows += [[f"ResNet-8 training peak, batch {p['batch']} (torch allocator)",
                  human_bytes(p["allocator_peak_bytes"]),
                  f"measured; predicted {human_bytes(p['predicted_bytes'])} "
                  f"({100 * p['error']:+.1f}%)"],
                 [f"ResNet-8 training process: RSS growth over its imports, batch {p['batch']}",
                  human_bytes(p["rss_growth_bytes"]),
                  f"measured ({human_bytes(p['import_rss_bytes'])} -> "
                  f"{human_bytes(p['process_peak_rss_bytes'])}); predicted "
                  f"{human_bytes(p['predicted_rss_growth_bytes'])} "
                  f"({100 * p['rss_growth_error']:+.1f}%)"]]
    return Table("Memory on this machine: runtime footprint and a measured training peak",
                 ["what", "bytes", "how"], rows, numeric=(1,))


def wire_table(report: dict[str, Any]) -> Table:
    w = report["wire"]
    s = report["settings"]
    n = s["samples"]
    rows = [["H alone, raw fp32 (16 x S x S x 4)", f"{w['raw_fp32_feature_bytes']:,}", "",
             human_bytes(n * w["raw_fp32_feature_bytes"]), ""]]
    for name, c in (report["wire_codecs"] or {w["codec"]: w}).items():
        chosen = " (used above)" if name == w["codec"] else ""
        rows.append([f"upload: features {name} + zstd, logits, labels, ids{chosen}",
                     f"{c['up_bytes_per_sample']:,.0f}", f"{c['up_bytes_per_sample_dense']:,.0f}",
                     human_bytes(n * c["up_bytes_per_sample"] + c["up_bytes_per_round"]),
                     human_bytes(n * c["up_bytes_per_sample_dense"] + c["up_bytes_per_round"])])
    rows.append(["download: hub logits + ids", f"{w['down_bytes_per_sample']:,.0f}", "",
                 human_bytes(n * w["down_bytes_per_sample"]), ""])
    return Table(f"Bytes on the wire per round ({n:,} samples)",
                 ["what", "bytes / sample (real images)", "(noise images)",
                  "bytes / round (real)", "(noise: upper bound)"], rows,
                 note=w["how"] + ". Transfer times use the noise-image upper bound.",
                 numeric=(1, 2, 3, 4))


def onnx_table(report: dict[str, Any]) -> Table | None:
    if not report["onnx"]:
        return None
    rows = []
    for o in report["onnx"]:
        top = sorted(o["ops"].items(), key=lambda kv: -kv[1])[:6]
        rows.append([o["path"], f"{o['params']:,}", human_bytes(o["file_bytes"]),
                     _m(o["macs_per_sample"]), ", ".join(f"{k} {v}" for k, v in top)])
    return Table("Exported ONNX graphs (inference)", ["file", "params", "size",
                                                      "MACs / sample", "top ops"], rows,
                 numeric=(1, 2, 3))


def inference_table(report: dict[str, Any]) -> Table | None:
    rows = [[f"{e['name']} {e['variant']}", "yes" if e["fits"] else "NO",
             f"{e['flops_per_image'] / 1e6:,.0f} M", human_bytes(e["memory_bytes"]),
             f"{e['ms_per_image']:.1f}", f"{e['images_per_second']:.0f}"]
            for e in report.get("inference", [])]
    if not rows:
        return None
    return Table("Running the delivered composed model (gkt-edge predict), batch 1, CPU",
                 ["device, model", "fits", "FLOPs / image", "memory", "ms / image",
                  "images / s"], rows,
                 note="Composed = the device's extractor + the ResNet-55 server (= ResNet-56). "
                      "FLOPs: 2 per multiply-add. images/s = peak x efficiency / FLOPs; int8 "
                      "applies the int8/fp32 ratio measured on an x86 CPU (unmeasured on ARM). "
                      + " ".join(report["inference"][1]["how"][2:]),
                 numeric=(2, 3, 4, 5))


def source_rows(device: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, v in device.items():
        if isinstance(v, dict) and "source" in v:
            rows.append([key, f"{v['value']:g}", ("ESTIMATE - " if v["estimate"] else "")
                         + v["source"]])
    return rows


def all_tables(report: dict[str, Any]) -> list[Table]:
    tables = [device_table(report), fedavg_table(report), ratio_table(report),
              model_table(report), operator_table(report), memory_check_table(report),
              wire_table(report)]
    extra = [t for t in (inference_table(report), onnx_table(report)) if t]
    return tables + extra


def summary(report: dict[str, Any]) -> list[str]:
    """The few sentences a buyer reads first."""
    s = report["settings"]
    best = report["best"]
    lines = []
    for key, what, unit in (("value", "Most for the money", "training samples/s per $100"),
                            ("value_cpu", "Most for the money on a CPU",
                             "training samples/s per $100"),
                            ("energy", "Most for the watts", "samples per joule"),
                            ("speed", "Fastest", "samples/s")):
        b = best[key]
        if b:
            lines.append(f"{what}: {b['name']} [{b['target'].upper()}], {b['value']:,.1f} "
                         f"{unit} (trust: {b['trust'].split(':')[0]}).")
    no = sorted({e["name"] for e in report["estimates"] if not e["fits"]})
    lines.append(f"Cannot train ResNet-8 at batch {s['batch']}: {', '.join(no)}." if no else
                 f"Every device can train ResNet-8 at batch {s['batch']}.")
    for name, rows in report["fedavg_estimates"].items():
        no = sorted({e["name"] for e in rows if not e["fits"]})
        if no:
            lines.append(f"FedAvg {name} does not fit at batch {s['batch']} on: {', '.join(no)}.")
    gkt_bytes = [e["bytes_up"] + e["bytes_down"] for e in report["estimates"]]
    fed_bytes = [rows[0]["bytes_up"] + rows[0]["bytes_down"]
                 for rows in report["fedavg_estimates"].values() if rows]
    if gkt_bytes and fed_bytes:
        lines.append(f"Per round a GKT device moves {human_bytes(gkt_bytes[0])} (features, "
                     f"{s['codec']}, {s['samples']:,} samples; upper bound) against FedAvg's "
                     f"{' / '.join(human_bytes(b) for b in fed_bytes)} of weights: GKT saves "
                     "compute and memory on the device, not bandwidth.")
    cal = report["calibration"]
    if cal is None:
        lines.append("Not calibrated: CPU times use a default efficiency of 10% of peak "
                     "(trust within a factor 3). Run `gkt-profile calibrate` first.")
    else:
        pts = ", ".join(f"{p['model']}@{p['batch']}: {100 * p['efficiency']:.1f}%"
                        for p in cal["points"])
        where = "this machine" if cal["matches_this_machine"] else f"{cal['machine']}"
        threads = f"{cal['threads']} thread" + ("s" if cal["threads"] > 1 else "")
        lines.append(f"CPU times use efficiencies measured on {where} ({cal['arch']}, "
                     f"{threads}, peak {cal['peak_gflops']:.0f} GFLOP/s, large "
                     f"matmul {cal['matmul_gflops']:.0f} GFLOP/s): {pts} of peak. GPU times "
                     "use the catalog's estimated efficiency (not measured).")
        if cal["threads"] < 4:
            lines.append(f"Calibrated with {threads}: times for devices with more cores assume "
                         "the step scales perfectly over them, which a CNN this small does "
                         "not quite do, so they are optimistic.")
    return lines


METHOD = [
    "epoch = samples x training FLOPs per sample (torch FlopCounterMode, forward + backward, "
    "2 flops per multiply-add) / (peak fp32 FLOP/s x efficiency).",
    "round = local epochs + feature extraction (a forward pass over the samples) + upload "
    "and download on the link; the hub's training time is not included.",
    "memory = OS + runtime (python + torch, + CUDA context on a GPU) + dataset (uint8 "
    "images) + torch's training peak (weights, gradients and 3 Adam/amsgrad buffers + "
    "batch x (input + activations saved for backward + 2 x the largest layer output)) + "
    "process overhead (~50 MiB + 0.3 x the torch peak: malloc and oneDNN, fitted on x86).",
    "energy = the catalog's power under load x epoch time.",
    "Catalog numbers marked ESTIMATE are derived, not read from a datasheet; each says how.",
]
