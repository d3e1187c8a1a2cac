"""A simulated heterogeneous fleet: per-device speed factors and link bandwidths.

``--device-speeds 1,1,1,5`` gives slowdown factors directly; ``--device-profiles
rpi4b,jetson-orin-nano,...`` takes them from the device catalog, as the fastest listed
device's CPU peak over each device's (the fastest runs at this machine's speed); the
catalog lookup is device_profiles/cpu_peaks.py, reached through an entry point.
``--bandwidths 2M,2M,2M,400K`` sets each link in bytes/s. One value applies to all.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import distributions

from edge_runtime.device.throttle import DeviceSpeed, parse_bandwidth


def _per_device(text: str, n: int, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise ValueError(f"{what}: {len(items)} values for {n} devices (give 1 or {n})")
    return items


def parse_speeds(text: str, n: int) -> list[float]:
    out = []
    for s in _per_device(text, n, "--device-speeds"):
        try:
            out.append(float(s))
        except ValueError:
            raise ValueError(f"--device-speeds: {s!r} is not a number") from None
    return out


PEAKS_ENTRY_POINT = "gkt_edge_toolkit.cpu_peaks"  # device_profiles/cpu_peaks.py provides it


def catalog_peaks(ids: list[str]) -> list[float]:
    """CPU peaks of catalog ids, from the installed package that provides the entry point
    (device_profiles; server_hub never imports it: tests/test_layering.py). Every
    distribution is searched: a stale egg-info in a source checkout would hide it from
    ``entry_points()``, which keeps the first metadata found per package name."""
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == PEAKS_ENTRY_POINT:
                return ep.load()(ids)
    raise ValueError("--device-profiles needs the device catalog (device_profiles, "
                     "installed with this package); give --device-speeds instead")


def profile_speeds(text: str, n: int,
                   peaks_of: Callable[[list[str]], list[float]] = catalog_peaks) -> list[float]:
    """Slowdown factors: the fastest listed device's CPU peak over each device's."""
    peaks = peaks_of(_per_device(text, n, "--device-profiles"))
    return [max(peaks) / p for p in peaks]


def build_fleet(n: int, speeds: str | None = None, profiles: str | None = None,
                bandwidths: str | None = None) -> list[DeviceSpeed]:
    if speeds and profiles:
        raise ValueError("give --device-speeds or --device-profiles, not both")
    factors = (parse_speeds(speeds, n) if speeds else
               profile_speeds(profiles, n) if profiles else [1.0] * n)
    links = ([parse_bandwidth(b) for b in _per_device(bandwidths, n, "--bandwidths")]
             if bandwidths else [0.0] * n)
    return [DeviceSpeed(f, b) for f, b in zip(factors, links)]


