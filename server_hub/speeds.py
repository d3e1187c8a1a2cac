"""A simulated heterogeneous fleet: per-device speed factors and link bandwidths.

``--device-speeds 1,1,1,5`` gives slowdown factors directly; ``--device-profiles
rpi4b,jetson-orin-nano,...`` takes them from the device catalog, as the fastest listed
device's CPU peak over each device's (the fastest runs at this machine's speed).
``--bandwidths 2M,2M,2M,400K`` sets each link in bytes/s. One value applies to all.
"""

from __future__ import annotations

from edge_runtime.throttle import DeviceSpeed, parse_bandwidth


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


def profile_speeds(text: str, n: int) -> list[float]:
    """Slowdown factors from catalog CPU peaks. An id may name a family sharing one CPU
    (``rpi4b`` for ``rpi4b-1gb`` ... ``rpi4b-8gb``)."""
    # device_profiles depends on server_hub for models; its catalog module is torch-free and
    # imports nothing from here, so this late import makes no cycle.
    from device_profiles.catalog import load_catalog

    specs = load_catalog()
    peaks = []
    for key in _per_device(text, n, "--device-profiles"):
        found = [s for s in specs if s.id == key] or [s for s in specs
                                                     if s.id.startswith(key + "-")]
        values = {s.cpu_peak_gflops.value for s in found}
        if len(values) != 1:
            known = ", ".join(s.id for s in specs)
            raise ValueError(f"--device-profiles: {key!r} matches "
                             f"{'no device' if not found else 'devices of different speeds'}; "
                             f"known: {known}")
        peaks.append(values.pop())
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


def is_uniform(fleet: list[DeviceSpeed]) -> bool:
    return all(s == DeviceSpeed() for s in fleet)
