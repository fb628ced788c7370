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


def gguf_quantisation(path: Path) -> dict[str, Any] | None:
    """The quantisation of a GGUF file: its `general.file_type` and a count of tensor types (None if
    the `gguf` package cannot read it)."""
    try:
        import gguf

        reader = gguf.GGUFReader(path)
        field = reader.fields.get("general.file_type")
        counts: dict[str, int] = {}
        for tensor in reader.tensors:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
        file_type = None
        if field is not None:
            code = int(field.parts[field.data[0]][0])
            try:
                file_type = gguf.LlamaFileType(code).name.removeprefix("MOSTLY_")
            except ValueError:
                file_type = str(code)
        return {"file_type": file_type, "tensor_types": dict(sorted(counts.items()))}
    except Exception:  # an unreadable header is no reason to stop a run: provenance says so
        return None


def model_source(reference: str) -> dict[str, Any]:
    """Where `reference` (alias, folder, .gguf file, hub id) comes from, without loading it."""
    from actsparse.loading import ALIASES, ModelNotAvailableError, resolve

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


def provenance(model: str, device: str, dtype: str | Sequence[str], argv: Sequence[str] | None = None) -> dict[str, Any]:
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
