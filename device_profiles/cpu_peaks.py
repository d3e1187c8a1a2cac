"""CPU peaks from the device catalog, for `gkt-hub simulate --device-profiles`.

server_hub never imports this package (device_profiles depends on server_hub, not the
reverse); it finds this function through the ``gkt_edge_toolkit.cpu_peaks`` entry point
that pyproject.toml declares, so the catalog lookup lives here, next to the catalog.
"""

from __future__ import annotations

from device_profiles.catalog import load_catalog


def cpu_peaks(ids: list[str]) -> list[float]:
    """fp32 CPU peak GFLOPS of each id; an id may name a family sharing one CPU (``rpi4b``
    for ``rpi4b-1gb`` ... ``rpi4b-8gb``). ValueError names an unknown or ambiguous id."""
    specs = load_catalog()
    peaks = []
    for key in ids:
        found = [s for s in specs if s.id == key] or [s for s in specs
                                                     if s.id.startswith(key + "-")]
        values = {s.cpu_peak_gflops.value for s in found}
        if len(values) != 1:
            known = ", ".join(s.id for s in specs)
            raise ValueError(f"--device-profiles: {key!r} matches "
                             f"{'no device' if not found else 'devices of different speeds'}; "
                             f"known: {known}")
        peaks.append(values.pop())
    return peaks
