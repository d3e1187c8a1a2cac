"""The device catalog: TOML data files, one or more devices each, every number with its source.

A number is written ``field = { value = 4, source = "..." }``. The source is a datasheet
(URL or name) or a line starting with ``estimate:`` that says how it was derived; such
numbers are flagged as estimates in every report. A file may hold a ``[common]`` table
whose fields every ``[[device]]`` of that file inherits (a board sold with 1/2/4/8 GB).

Built-in files live in ``device_profiles/catalog/``; users add their own with
``--catalog DIR`` (every ``*.toml`` there). Errors name the file, the device and the field.
Torch-free on purpose: a device can list and validate the catalog without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ESTIMATE_PREFIX = "estimate:"
ARCHES = ("x86_64", "aarch64")


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Quantity:
    """A number with where it came from."""

    value: float
    source: str

    @property
    def estimate(self) -> bool:
        return self.source.strip().lower().startswith(ESTIMATE_PREFIX)


@dataclass(frozen=True)
class DeviceSpec:
    """One device. Optional numbers are None when unknown (energy or price is then n/a)."""

    id: str
    name: str
    arch: str
    cpu: str
    cpu_cores: Quantity
    cpu_clock_ghz: Quantity
    cpu_peak_gflops: Quantity  # fp32, all cores, 2 flops per fused multiply-add
    ram_gib: Quantity
    os_mib: Quantity  # RAM the OS itself uses while idle
    runtime_mib: Quantity | None = None  # RSS of python + torch; None: measured here
    mem_bandwidth_gbs: Quantity | None = None
    power_w: Quantity | None = None  # whole board under sustained training load
    price_usd: Quantity | None = None
    gpu: str = ""
    gpu_peak_gflops: Quantity | None = None  # fp32 CUDA cores
    gpu_efficiency: Quantity | None = None  # achieved / peak for the edge model's step
    gpu_runtime_mib: Quantity | None = None  # CUDA context + libraries, taken from the same RAM
    notes: str = ""
    file: str = ""  # where the spec was read from ("measured" for this machine)

    def quantities(self) -> dict[str, Quantity]:
        """Every number of the spec that is set, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), Quantity)}


_REQUIRED_NUMBERS = ("cpu_cores", "cpu_clock_ghz", "cpu_peak_gflops", "ram_gib", "os_mib")
_OPTIONAL_NUMBERS = ("runtime_mib", "mem_bandwidth_gbs", "power_w", "price_usd",
                     "gpu_peak_gflops", "gpu_efficiency", "gpu_runtime_mib")
_REQUIRED_TEXT = ("id", "name", "arch", "cpu")
_OPTIONAL_TEXT = ("gpu", "notes")
_KNOWN = set(_REQUIRED_NUMBERS + _OPTIONAL_NUMBERS + _REQUIRED_TEXT + _OPTIONAL_TEXT)
_GPU_FIELDS = ("gpu_peak_gflops", "gpu_efficiency", "gpu_runtime_mib")


def _quantity(raw: Any, where: str) -> Quantity:
    if not isinstance(raw, Mapping):
        raise CatalogError(f"{where}: expected {{ value = <number>, source = \"...\" }}, "
                           f"got {raw!r}")
    extra = set(raw) - {"value", "source"}
    if extra:
        raise CatalogError(f"{where}: unknown key(s) {sorted(extra)}; only value and source")
    value, source = raw.get("value"), raw.get("source")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CatalogError(f"{where}: value must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise CatalogError(f"{where}: value must be a positive number, got {value!r}")
    if not isinstance(source, str) or not source.strip():
        raise CatalogError(f"{where}: missing source (a datasheet URL/name, or "
                           f"'{ESTIMATE_PREFIX} how it was derived')")
    if source.strip().lower() == ESTIMATE_PREFIX:
        raise CatalogError(f"{where}: an estimate must say how it was derived")
    return Quantity(float(value), source.strip())


def parse_device(raw: Mapping[str, Any], file: str) -> DeviceSpec:
    """A validated DeviceSpec from one device table (``[common]`` already merged in)."""
    label = f"{file}: device {raw.get('id', '?')!r}"
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise CatalogError(f"{label}: unknown field(s) {unknown}; known: {sorted(_KNOWN)}")
    for name in _REQUIRED_TEXT + _REQUIRED_NUMBERS:
        if name not in raw:
            raise CatalogError(f"{label}: missing required field {name!r}")
    kwargs: dict[str, Any] = {"file": file}
    for name in _REQUIRED_TEXT + _OPTIONAL_TEXT:
        if name in raw:
            if not isinstance(raw[name], str) or (name in _REQUIRED_TEXT and not raw[name]):
                raise CatalogError(f"{label}: field {name!r} must be a non-empty string")
            kwargs[name] = raw[name]
    if kwargs["arch"] not in ARCHES:
        raise CatalogError(f"{label}: field 'arch' must be one of {list(ARCHES)}, "
                           f"got {kwargs['arch']!r}")
    for name in _REQUIRED_NUMBERS + _OPTIONAL_NUMBERS:
        if name in raw:
            kwargs[name] = _quantity(raw[name], f"{label}: field {name!r}")
    spec = DeviceSpec(**kwargs)
    if spec.cpu_cores.value != int(spec.cpu_cores.value):
        raise CatalogError(f"{label}: field 'cpu_cores' must be a whole number")
    if spec.gpu_efficiency is not None and spec.gpu_efficiency.value > 1:
        raise CatalogError(f"{label}: field 'gpu_efficiency' is a fraction of the peak (0..1]")
    gpu_set = [n for n in _GPU_FIELDS if getattr(spec, n) is not None]
    if gpu_set and (len(gpu_set) != len(_GPU_FIELDS) or not spec.gpu):
        raise CatalogError(f"{label}: a GPU needs all of 'gpu', "
                           f"{', '.join(repr(n) for n in _GPU_FIELDS)}")
    return spec


def parse_file(text: str, file: str) -> list[DeviceSpec]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise CatalogError(f"{file}: not valid TOML: {err}") from None
    extra = set(doc) - {"common", "device"}
    if extra:
        raise CatalogError(f"{file}: unknown top-level table(s) {sorted(extra)}; "
                           "use [common] and [[device]]")
    common = doc.get("common", {})
    devices = doc.get("device", [])
    if not isinstance(common, dict) or not isinstance(devices, list) or not devices:
        raise CatalogError(f"{file}: needs at least one [[device]] table")
    return [parse_device({**common, **dev}, file) for dev in devices]


CATALOG_DIR = Path(__file__).with_name("catalog")  # package data, see pyproject.toml


def builtin_files() -> list[tuple[str, str]]:
    """(name, text) of the catalog files shipped with the package, in file-name order."""
    return [(f"catalog/{p.name}", p.read_text(encoding="utf-8"))
            for p in sorted(CATALOG_DIR.glob("*.toml"))]


def load_catalog(extra_dirs: Iterable[str | Path] = ()) -> list[DeviceSpec]:
    """Built-in devices plus every ``*.toml`` under ``extra_dirs``; ids must be unique."""
    sources = builtin_files()
    for d in extra_dirs:
        path = Path(d).expanduser()
        if not path.is_dir():
            raise CatalogError(f"{path}: catalog directory not found")
        sources += [(str(p), p.read_text(encoding="utf-8")) for p in sorted(path.glob("*.toml"))]
    seen: dict[str, str] = {}
    specs: list[DeviceSpec] = []
    for file, text in sources:
        for spec in parse_file(text, file):
            if spec.id in seen:
                raise CatalogError(f"{file}: device id {spec.id!r} is already defined in "
                                   f"{seen[spec.id]}; pick another id")
            seen[spec.id] = file
            specs.append(spec)
    return specs


def spec_to_dict(spec: DeviceSpec) -> dict[str, Any]:
    """JSON-ready: every number as {value, source, estimate}; unknown ones as None."""
    out: dict[str, Any] = {}
    for f in fields(spec):
        v = getattr(spec, f.name)
        if isinstance(v, Quantity):
            v = {"value": v.value, "source": v.source, "estimate": v.estimate}
        out[f.name] = v
    return out


def select(specs: list[DeviceSpec], wanted: str) -> list[DeviceSpec]:
    """``all`` or a comma-separated list of ids (unknown ids are an error naming the known)."""
    if wanted.strip() == "all":
        return list(specs)
    by_id = {s.id: s for s in specs}
    out = []
    for key in (w.strip() for w in wanted.split(",") if w.strip()):
        if key not in by_id:
            raise CatalogError(f"unknown device {key!r}; known: {', '.join(by_id)}")
        out.append(by_id[key])
    return out
