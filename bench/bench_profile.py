"""Predicted against measured on this machine: time per local epoch of the edge model after
calibration, and peak training memory (torch allocator and process RSS).

Each repetition calibrates (``gkt-profile calibrate``'s code: the real training step,
random data) and then runs one real local epoch of ``edge_runtime.learning.train.train_edge`` on
the scikit-learn digits upsampled to 32x32 (1,438 images, a different data path), so
load from other processes hits both alike; the median ratio is reported. Memory runs in
fresh processes at several batch sizes. The calibration goes to a temporary file, never
to the user's state.

On a machine shared with other jobs use ``--threads 1``: two OpenMP threads on two busy
cores spin at barriers and the step time swings by 2x from one second to the next.

Usage: python bench/bench_profile.py [--reps 3] [--steps 20] [--batch 64] [--threads N]
                                     [--memory-batches 16,64,256] [--json PATH]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from results_file import write_results  # noqa: E402

from device_profiles.calibrate import calibrate, calibrated_this_machine
from device_profiles.estimate import Settings, estimate, predicted_rss_growth
from device_profiles.memory import measure_training_peak
from device_profiles.model_zoo import profile_model
from device_profiles.report import efficiency_for
from edge_runtime.learning.data import DataConfig, WithIds, load_split, make_loader
from edge_runtime.learning.distill import LogitBank
from edge_runtime.learning.models import EdgeResNet8
from edge_runtime.learning.train import EdgeTrainConfig, make_optimizer, train_edge


def measured_epoch(batch: int) -> tuple[float, int]:
    """Wall seconds of one real local epoch (CE + KD against a full logit bank)."""
    split = load_split(DataConfig("digits", image_size=32), train=True)
    ids = np.arange(len(split.targets))
    loader = make_loader(WithIds(split.dataset, ids), batch, shuffle=True)
    torch.manual_seed(0)
    model = EdgeResNet8(10)
    cfg = EdgeTrainConfig(batch_size=batch)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    teacher = LogitBank(ids, 10)
    teacher.update(ids, torch.randn(len(ids), 10))
    warm = make_loader(WithIds(split.dataset, ids[: 2 * batch]), batch, shuffle=False)
    train_edge(model, opt, warm, teacher, cfg)  # first-use costs are not part of an epoch
    t0 = time.perf_counter()
    train_edge(model, opt, loader, teacher, cfg)
    return time.perf_counter() - t0, len(ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--memory-batches", default="16,64,256")
    p.add_argument("--json", default="bench/results/profile.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    edge = profile_model("resnet8")
    cost = edge.cost()
    timing = []
    for rep in range(args.reps):
        cal = calibrate(("resnet8",), (args.batch,), args.steps)
        spec = calibrated_this_machine(cal)
        seconds, samples = measured_epoch(args.batch)
        eff = efficiency_for("resnet8", args.batch, cal)
        est = estimate(spec, cost, Settings(batch=args.batch, samples=samples), eff, "cpu",
                       0, 0, 0, is_this_machine=True)
        row = {"rep": rep, "samples": samples, "predicted_s": est.epoch_seconds,
               "measured_s": seconds, "ratio": est.epoch_seconds / seconds,
               "efficiency": eff.value, "achieved_gflops": cal.points[0].achieved_gflops,
               "peak_gflops": cal.peak_gflops, "matmul_gflops": cal.matmul_gflops,
               "calibration_step_s": cal.points[0].step_seconds}
        timing.append(row)
        print(f"rep {rep}: predicted {row['predicted_s']:.2f} s, measured {seconds:.2f} s "
              f"(predicted/measured {row['ratio']:.2f}); efficiency {100 * eff.value:.1f}% of "
              f"{cal.peak_gflops:.0f} GFLOP/s, matmul {cal.matmul_gflops:.0f} GFLOP/s",
              flush=True)

    memory = []
    for batch in (int(b) for b in args.memory_batches.split(",")):
        m = measure_training_peak("resnet8", batch)
        pred, growth = cost.training_bytes(batch), predicted_rss_growth(cost, batch)
        memory.append({"batch": batch, "predicted_torch_bytes": pred,
                       "measured_torch_bytes": m.allocator_peak_bytes,
                       "torch_error": m.allocator_peak_bytes / pred - 1,
                       "predicted_rss_growth_bytes": growth,
                       "measured_rss_growth_bytes": m.rss_growth_bytes,
                       "rss_growth_error": m.rss_growth_bytes / growth - 1,
                       "import_rss_bytes": m.import_rss_bytes,
                       "process_peak_rss_bytes": m.process_peak_rss_bytes})

    ratios = [r["ratio"] for r in timing]
    med = statistics.median(ratios)
    print(f"\nedge model, batch {args.batch}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {platform.machine()}")
    print(f"{'rep':>3} {'predicted s':>12} {'measured s':>11} {'pred/meas':>10} {'eff %':>6}")
    for r in timing:
        print(f"{r['rep']:>3} {r['predicted_s']:>12.2f} {r['measured_s']:>11.2f} "
              f"{r['ratio']:>10.2f} {100 * r['efficiency']:>6.1f}")
    print(f"median predicted/measured: {med:.2f} ({'within' if abs(med - 1) <= 0.25 else 'OUTSIDE'}"
          f" the 25% goal)\n")
    print(f"{'batch':>5} {'torch pred MiB':>15} {'torch meas MiB':>15} {'err':>7} "
          f"{'RSS+ pred MiB':>14} {'RSS+ meas MiB':>14} {'err':>7}")
    for m in memory:
        print(f"{m['batch']:>5} {m['predicted_torch_bytes'] / 2**20:>15.1f} "
              f"{m['measured_torch_bytes'] / 2**20:>15.1f} {100 * m['torch_error']:>+6.1f}% "
              f"{m['predicted_rss_growth_bytes'] / 2**20:>14.1f} "
              f"{m['measured_rss_growth_bytes'] / 2**20:>14.1f} "
              f"{100 * m['rss_growth_error']:>+6.1f}%")
    out = {"machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "batch": args.batch, "steps": args.steps, "timing": timing,
           "median_ratio": med, "memory": memory}
    write_results(args.json, out)


if __name__ == "__main__":
    main()
