"""Feature codecs on real post-ReLU maps H, in one run: size, speed, and error.

H comes from an EdgeResNet8's extractor trained for a few dozen SGD steps on scikit-learn
digits upsampled to each size (``--steps 0`` gives random-init features instead). For every
codec: bytes per sample after zstd (raw fp32 is 16*S*S*4: 65,536 at 32x32), ratio to raw
fp32, encode and decode throughput in MB/s of raw fp32 (median of ``--repeats`` passes over
all chunks of ``--chunk`` samples), max abs error, relative RMSE (||y - x|| / ||x||), and the
bytes per sample of a whole "features" message (ids, labels, fp32 logits, header).
Usage: python bench/bench_codecs.py [--sizes 32 16] [--samples 512] [--steps 40] [--json PATH]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
import zstandard
from results_file import write_results  # noqa: E402

from edge_runtime.learning.data import DataConfig, load_split
from edge_runtime.learning.models import EdgeResNet8
from edge_runtime.protocol.codecs import FEATURE_CODECS, ZSTD_LEVEL, get_codec
from edge_runtime.protocol.wire import encode_message


def trained_features(size: int, samples: int, steps: int, seed: int = 0):
    """H (float32 [samples, 16, size, size]), the model's logits and labels on digits."""
    torch.manual_seed(seed)
    split = load_split(DataConfig("digits", image_size=size, augment=False), train=True)
    x, y = split.dataset.images, split.dataset.labels
    model = EdgeResNet8(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx])[0], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits, h = model(x[:samples])
    acc = (logits.argmax(1) == y[:samples]).float().mean().item() if steps else None
    return h.numpy(), logits.numpy(), y[:samples].numpy(), acc


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(name: str, level: int, h: np.ndarray, logits: np.ndarray, labels: np.ndarray,
            chunk: int, repeats: int) -> dict:
    codec = get_codec(name, level)
    chunks = [h[i:i + chunk] for i in range(0, len(h), chunk)]
    t_enc, blobs = timed(lambda: [codec.encode(c) for c in chunks], repeats)
    t_dec, outs = timed(lambda: [codec.decode(b, c.shape) for b, c in zip(blobs, chunks)],
                        repeats)
    y = np.concatenate(outs).astype(np.float64)
    diff = y - h
    msg_bytes = sum(
        len(encode_message("features", "bench-device-0", 0, {
            "ids": (np.arange(i, i + len(c), dtype=np.int64), "exact"),
            "labels": (labels[i:i + len(c)].astype(np.int64), "exact"),
            "logits": (logits[i:i + len(c)], "fp32"),
            "features": (c, name)}, msg_id=f"r0-bench:{i // chunk}"))
        for i, c in zip(range(0, len(h), chunk), chunks))
    raw = h.nbytes
    return {
        "codec": name, "zstd_level": level,
        "bytes_per_sample": sum(map(len, blobs)) / len(h),
        "raw_fp32_bytes_per_sample": raw / len(h),
        "ratio_vs_fp32": raw / sum(map(len, blobs)),
        "encode_MBps": raw / t_enc / 1e6, "decode_MBps": raw / t_dec / 1e6,
        "max_abs_error": float(np.abs(diff).max()),
        "rel_rmse": float(np.sqrt((diff**2).sum() / (h.astype(np.float64) ** 2).sum())),
        "message_bytes_per_sample": msg_bytes / len(h),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 16])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--steps", type=int, default=40, help="SGD steps before extracting H")
    p.add_argument("--chunk", type=int, default=64, help="samples per encoded chunk")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--level", type=int, default=ZSTD_LEVEL, help="zstd level")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="bench/results/codecs.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {"steps": args.steps, "samples": args.samples, "chunk": args.chunk,
           "repeats": args.repeats, "zstd_level": args.level, "numpy": np.__version__,
           "zstandard": zstandard.__version__, "machine": platform.machine(),
           "processor": platform.processor(), "features": "trained" if args.steps else
           "random-init", "sizes": []}
    for size in args.sizes:
        h, logits, labels, acc = trained_features(size, args.samples, args.steps)
        rows = [measure(n, args.level, h, logits, labels, args.chunk, args.repeats)
                for n in FEATURE_CODECS]
        stats = {"size": size, "accuracy_on_these_samples": acc,
                 "zero_fraction": float((h == 0).mean()), "h_max": float(h.max()),
                 "h_mean": float(h.mean()), "rows": rows}
        out["sizes"].append(stats)
        acc_txt = f"accuracy {acc:.3f} on these samples" if acc is not None else "random init"
        print(f"\nH {args.samples}x16x{size}x{size} from EdgeResNet8 after {args.steps} SGD "
              f"steps on digits ({acc_txt}); {stats['zero_fraction']:.1%} zeros, max "
              f"{stats['h_max']:.2f}; zstd level {args.level}, chunks of {args.chunk}")
        print(f"{'codec':6} {'B/sample':>9} {'ratio':>6} {'enc MB/s':>9} {'dec MB/s':>9} "
              f"{'max abs err':>11} {'rel RMSE':>9} {'msg B/sample':>12}")
        for r in rows:
            print(f"{r['codec']:6} {r['bytes_per_sample']:>9,.0f} {r['ratio_vs_fp32']:>6.2f} "
                  f"{r['encode_MBps']:>9.0f} {r['decode_MBps']:>9.0f} "
                  f"{r['max_abs_error']:>11.2e} {r['rel_rmse']:>9.2e} "
                  f"{r['message_bytes_per_sample']:>12,.0f}")
        print(f"(raw fp32: {16 * size * size * 4:,} B/sample)")
    write_results(args.json, out)


if __name__ == "__main__":
    main()
