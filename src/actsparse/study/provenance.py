"""Provenance of a run (SPEC §4b): actsparse version, the model's source (alias → file, and the
quantisation a GGUF file was dequantised from), dtype, device, library versions and the command.

A run folder keeps it in its store (`provenance`), so that summary.json and the report carry it.
"""

from __future__ import annotations

import platform
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
"""GGUF metadata value types of fixed size (8 is a string, 9 an array)."""


def _read_gguf_header(path: Path) -> tuple[dict[str, Any], list[int]]:
    """The scalar metadata of a GGUF file and the type of each tensor, read from its header only (the
    `gguf` package's reader maps every tensor, which takes a minute for a 250 MB file)."""
    import struct

    with open(path, "rb") as f:

        def read(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            if kind in _SCALAR:
                return read(_SCALAR[kind])
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("<I"), read("<Q")
                if item in _SCALAR:  # skipped: vocabularies, merges
                    f.seek(struct.calcsize(_SCALAR[item]) * count, 1)
                else:
                    for _ in range(count):
                        value(item)
                return None
            raise ValueError(f"unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("<I")  # version
        n_tensors, n_kv = read("<Q"), read("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(read("<I"))
        types = []
        for _ in range(n_tensors):
            string()
            f.seek(8 * read("<I"), 1)  # dimensions
            types.append(read("<I"))
            read("<Q")  # offset
    return meta, types


def gguf_quantisation(path: Path) -> dict[str, Any] | None:
    """The quantisation of a GGUF file: its `general.file_type` and a count of tensor types (None if
    its header cannot be read)."""
    try:
        meta, types = _read_gguf_header(path)
    except Exception:  # an unreadable header never stops a run: provenance says None
        return None
    try:
        import gguf

        def name(code: int) -> str:
            return gguf.GGMLQuantizationType(code).name

        code = meta.get("general.file_type")
        file_type = None if code is None else gguf.LlamaFileType(code).name.removeprefix("MOSTLY_")
    except (ImportError, ValueError):

        def name(code: int) -> str:
            return str(code)

        file_type = None if meta.get("general.file_type") is None else str(meta["general.file_type"])
    counts: dict[str, int] = {}
    for t in types:
        counts[name(t)] = counts.get(name(t), 0) + 1
    return {"file_type": file_type, "tensor_types": dict(sorted(counts.items()))}


def model_source(reference: str) -> dict[str, Any]:
    """Where `reference` (alias, folder, .gguf file, hub id) comes from, without loading it."""
    from actsparse.models.loading import ALIASES, ModelNotAvailableError, resolve

    record: dict[str, Any] = {"reference": reference}
    try:
        kind, path = resolve(reference)
    except ModelNotAvailableError as err:
        return record | {"kind": "unavailable", "error": str(err)}
    record["kind"] = "alias" if reference in ALIASES else kind
    if path is not None:
        record["file"] = str(path.resolve())
        if path.is_file():
            record["bytes"] = path.stat().st_size
    if kind == "gguf" and path is not None:
        record["dequantised_from"] = gguf_quantisation(path)
    return record


def versions() -> dict[str, str | None]:
    """Versions of actsparse and of the libraries behind its numbers."""
    import importlib.metadata

    import torch

    import actsparse

    out: dict[str, str | None] = {"actsparse": actsparse.__version__, "python": platform.python_version()}
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    for name in ("transformers", "lm_eval", "triton"):
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-") if name == "lm_eval" else name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: str) -> str:
    """A readable name of the device: the GPU's, or the CPU's architecture."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} CPU ({torch.get_num_threads()} threads)"


def command_line(argv: Sequence[str] | None, device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """The command as typed, and one that reproduces the run: the same with --device and --dtype explicit."""
    if argv is None:
        return {"command": None, "reproduce": None}
    args = list(argv)
    explicit = list(args)
    for flag, value in (("--device", device), ("--dtype", dtype)):
        if value is None:
            continue
        for i, arg in enumerate(explicit):
            if arg == flag and i + 1 < len(explicit):
                explicit[i + 1] = value
                break
            if arg.startswith(flag + "="):
                explicit[i] = f"{flag}={value}"
                break
        else:
            if "--dtypes" not in explicit or flag != "--dtype":
                explicit += [flag, value]
    return {"command": shlex.join(["actsparse", *args]), "reproduce": shlex.join(["actsparse", *explicit])}


def provenance(
    model: str, device: str, dtype: str | Sequence[str], argv: Sequence[str] | None = None
) -> dict[str, Any]:
    """Everything a reader needs to know where a run's numbers come from."""
    single = dtype if isinstance(dtype, str) else None
    return {
        "model": model_source(model),
        "device": device,
        "device_name": device_name(device),
        "dtype": dtype if isinstance(dtype, str) else list(dtype),
        "versions": versions(),
        **command_line(argv, device, single),
    }


def lines(record: dict[str, Any] | None) -> list[str]:
    """The provenance as short 'name: value' lines, for the report and the console."""
    if not record:
        return []
    model = record.get("model", {})
    source = model.get("reference", "?")
    if model.get("file"):
        source += f" → {model['file']}"
    quant = model.get("dequantised_from")
    if quant:
        source += f" (GGUF {quant.get('file_type')}, dequantised to float32 safetensors, then cast)"
    v = record.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("actsparse", "torch", "transformers", "lm_eval", "python") if v.get(k))
    out = [
        f"model source: {source}",
        f"dtype: {record.get('dtype')}; device: {record.get('device')} ({record.get('device_name')})",
        f"versions: {libs}",
    ]
    if record.get("reproduce"):
        out.append(f"command: {record['reproduce']}")
    return out


__all__ = ["command_line", "gguf_quantisation", "lines", "model_source", "provenance", "versions"]
