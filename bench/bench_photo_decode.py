"""Decoding camera-sized JPEGs to the model's input: a full decode against libjpeg's
reduced-scale decode (``decode_image(..., for_size)``, step 0 of the preprocessing).

CIFAR-10's 32x32 JPEGs never take the reduced path; a device's own photos do. This writes
``--photos`` JPEGs per size (quality 90: smooth shapes plus sensor-like noise, so they
compress like photos rather than flat test cards), then for each photo times both paths
from bytes to the cached uint8 input (decode, EXIF, RGB, resize), interleaved, and
compares their pixels.

Then a device's first scan of a folder of 12 MP photos (``OwnData.scan``: read, hash,
decode, cache), one decode thread against the default (``DECODE_THREADS``: one per core,
at most 4), each on a fresh state dir, interleaved.

Usage: python bench/bench_photo_decode.py [--sizes 4032x3024,1920x1080,640x480]
       [--input 32] [--photos 8] [--repeats 3] [--scan-photos 24]
       [--json bench/results/photo_decode.json]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image, ImageDraw
from results_file import write_results

from edge_runtime.learning.preprocess import Preprocess, decode_image, to_rgb_u8


def photo(w: int, h: int, rng: np.random.Generator) -> bytes:
    small = Image.new("RGB", (64, 48), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(small)
    for _ in range(12):
        x, y = rng.integers(0, 64), rng.integers(0, 48)
        r = int(rng.integers(3, 20))
        draw.ellipse((x - r, y - r, x + r, y + r),
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = img + rng.normal(0, 6, img.shape).astype(np.int16)  # sensor noise
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def timed(fn) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4032x3024,1920x1080,640x480")
    ap.add_argument("--input", type=int, default=32, help="the run's input size")
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scan-photos", type=int, default=24)
    ap.add_argument("--json", default="bench/results/photo_decode.json")
    args = ap.parse_args()
    spec = Preprocess(size=args.input)
    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        photos = [photo(w, h, rng) for _ in range(args.photos)]
        full_s, draft_s, diffs = [], [], []
        for _ in range(args.repeats):
            for data in photos:  # interleaved: both paths see the same machine load
                t_full, a = timed(lambda d=data: to_rgb_u8(decode_image(d, "p"), spec))
                t_draft, b = timed(lambda d=data: to_rgb_u8(decode_image(d, "p", spec.size),
                                                            spec))
                full_s.append(t_full)
                draft_s.append(t_draft)
                diffs.append(np.abs(a.astype(np.int16) - b.astype(np.int16)))
        full, draft = statistics.median(full_s), statistics.median(draft_s)
        d = np.stack(diffs)
        rows.append({"size": size, "jpeg_kb": round(statistics.mean(map(len, photos)) / 1024),
                     "full_ms": round(full * 1000, 2), "reduced_ms": round(draft * 1000, 2),
                     "speedup": round(full / draft, 2),
                     "full_images_per_s": round(1 / full, 1),
                     "reduced_images_per_s": round(1 / draft, 1),
                     "max_pixel_diff": int(d.max()), "mean_pixel_diff": round(float(d.mean()), 4)})
    print(f"{'photo':>10} {'KB':>6} {'full ms':>8} {'reduced ms':>10} {'speedup':>7} "
          f"{'max diff':>8} {'mean diff':>9}")
    for r in rows:
        print(f"{r['size']:>10} {r['jpeg_kb']:>6} {r['full_ms']:>8} {r['reduced_ms']:>10} "
              f"{r['speedup']:>6}x {r['max_pixel_diff']:>8} {r['mean_pixel_diff']:>9}")
    scan = scan_rates(args.scan_photos, args.input, args.repeats, rng)
    print(f"first scan of {args.scan_photos} 12 MP photos: {scan['one_thread_per_s']} "
          f"images/s on 1 thread, {scan['default_per_s']} on {scan['threads']} "
          f"({scan['speedup']}x)")
    write_results(args.json, {"input_size": args.input, "photos_per_size": args.photos,
                              "repeats": args.repeats, "rows": rows, "scan": scan})


def scan_rates(n: int, size: int, repeats: int, rng: np.random.Generator) -> dict:
    import tempfile
    from pathlib import Path

    from edge_runtime.learning import own_data as od
    from edge_runtime.learning.catalog import ImageCatalog

    default = od.DECODE_THREADS
    spec = od.DataSpec(("a",), Preprocess(size=size))
    rates: dict[int, list[float]] = {1: [], default: []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos" / "a"
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"IMG_{i:04d}.jpg").write_bytes(photo(4032, 3024, rng))
        for rep in range(repeats):
            for threads in rates:
                od.DECODE_THREADS, od.DECODE_WINDOW = threads, 4 * threads
                state = Path(tmp) / f"state-{rep}-{threads}"
                data = od.OwnData(od.OwnDataConfig(str(folder.parent), spec, 0.0),
                                  ImageCatalog(state / "own-data.sqlite"))
                t0 = time.perf_counter()
                assert data.scan().decoded == n
                rates[threads].append(n / (time.perf_counter() - t0))
    od.DECODE_THREADS, od.DECODE_WINDOW = default, 4 * default
    one, many = statistics.median(rates[1]), statistics.median(rates[default])
    return {"photos": n, "threads": default, "one_thread_per_s": round(one, 1),
            "default_per_s": round(many, 1), "speedup": round(many / one, 2)}


if __name__ == "__main__":
    main()
