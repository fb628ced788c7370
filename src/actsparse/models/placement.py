"""Where a model runs and in which number format: `--device` and `--dtype`, parsed and checked in one
place for every command (`sweep`, `profile`, `calibrate`, `bench`, `study`, the lm-eval bridge).

`auto` is resolved here: the device to cuda when one is available, else cpu; the dtype (SPEC §4b) to
bfloat16 on CUDA and float32 on CPU for actsparse's own loader. lm-eval's HFLM reads `dtype=auto` as
the checkpoint's own dtype instead (`resolve_dtype(..., checkpoint=...)`).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""Number formats a model can run in."""

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def parse_device(text: str) -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N' (lower case, stripped); ValueError otherwise."""
    device = str(text).strip().lower()
    if not _DEVICE.match(device):
        raise ValueError(f"--device takes auto, cpu, cuda or cuda:N, got {text!r}")
    return device


def parse_dtype(text: str) -> str:
    """'auto' or one of DTYPES; ValueError otherwise."""
    dtype = str(text).strip().lower().removeprefix("torch.")
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype takes auto, {', '.join(DTYPES)}, got {text!r}")
    return dtype


def parse_dtypes(text: str) -> tuple[str, ...]:
    """'float32,bfloat16' → ('float32', 'bfloat16'): each named once, 'auto' not allowed."""
    dtypes = tuple(parse_dtype(t) for t in str(text).split(",") if t.strip())
    if not dtypes or "auto" in dtypes:
        raise ValueError(f"--dtypes takes a comma list of {', '.join(DTYPES)}, got {text!r}")
    if len(set(dtypes)) != len(dtypes):
        raise ValueError(f"--dtypes names a dtype twice: {text}")
    return dtypes


def resolve_device(device: str) -> str:
    """The device `device` names on this machine: 'auto' → 'cuda' when available, else 'cpu';
    'cuda' or 'cuda:N' without such a device is a ValueError (before any model work)."""
    import torch

    device = parse_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}, but no CUDA device is available here (use --device cpu)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}, but only {torch.cuda.device_count()} CUDA devices are visible")
    return device


def resolve_dtype(dtype: str, device: str, checkpoint: str | None = None) -> str:
    """The dtype `dtype` names: 'auto' → bfloat16 on CUDA, float32 on CPU; or, where `checkpoint` is
    given (lm-eval's HFLM semantics), the checkpoint's own dtype when it is one of DTYPES."""
    dtype = parse_dtype(dtype)
    if dtype != "auto":
        return dtype
    if checkpoint is not None and checkpoint in DTYPES:
        return checkpoint
    return "bfloat16" if device_kind(device) == "cuda" else "float32"


def checkpoint_dtype(reference: str) -> str | None:
    """The dtype a model's checkpoint is stored in (its config.json), as lm-eval's HFLM reads
    dtype=auto: float32 for a GGUF file (dequantised to float32), None when it cannot be told offline."""
    import json

    from actsparse.models.loading import ModelNotAvailableError, resolve

    try:
        kind, path = resolve(reference)
    except ModelNotAvailableError:
        return None
    if kind == "gguf":
        return "float32"
    if kind != "folder" or path is None:
        return None
    config = json.loads((path / "config.json").read_text())
    text = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    return str(text) if text in DTYPES else None


def device_kind(device: str) -> str:
    """'cuda' for cuda and cuda:N, else the device itself: what a run folder binds (results do not
    depend on which GPU of a machine ran them)."""
    return "cuda" if str(device).startswith("cuda") else str(device)


def torch_dtype(dtype: str) -> Any:
    """The torch dtype of a name of DTYPES."""
    import torch

    return getattr(torch, parse_dtype(dtype))


@dataclass(frozen=True)
class Placement:
    """A resolved device (cpu, cuda, cuda:N) and dtype (one of DTYPES)."""

    device: str
    dtype: str

    @property
    def torch_dtype(self) -> Any:
        return torch_dtype(self.dtype)

    def binding(self) -> dict[str, str]:
        """What a run folder records and later runs must match: device kind and dtype."""
        return {"device": device_kind(self.device), "dtype": self.dtype}


def resolve(device: str = "auto", dtype: str = "auto") -> Placement:
    """Both options resolved on this machine (ValueError before any model work if one is bad)."""
    where = resolve_device(device)
    return Placement(where, resolve_dtype(dtype, where))


HELP_DTYPE = (
    "auto (bfloat16 on cuda, float32 on cpu, as actsparse's loader reads it; the lm-eval bridge's dtype=auto "
    "is the checkpoint's own, as lm-eval's HFLM reads it), float32, bfloat16 or float16; bound to a run folder"
)
HELP_DEVICE = "auto (cuda when available, else cpu), cpu, cuda or cuda:N"


def _arg(parse: Any) -> Any:
    def check(text: str) -> str:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return check


def add_placement_arguments(parser: argparse.ArgumentParser | Any, dtype_help: str = HELP_DTYPE) -> None:
    """`--device`, `--dtype` and `--verbose` (library loading bars and warnings) on a command."""
    parser.add_argument(
        "--device", type=_arg(parse_device), default="auto", help=f"where the model runs: {HELP_DEVICE}"
    )
    parser.add_argument("--dtype", type=_arg(parse_dtype), default="auto", help=f"number format: {dtype_help}")
    parser.add_argument(
        "--verbose", action="store_true", help="show transformers' loading bars and warnings (silenced by default)"
    )


def add_dtypes_argument(parser: argparse.ArgumentParser | Any) -> None:
    """`--dtypes a,b`: precision as a sweep axis."""
    parser.add_argument(
        "--dtypes",
        type=_arg(parse_dtypes),
        default=None,
        help="run the dense baseline and every point once per dtype, on the same documents, e.g. "
        "float32,bfloat16,float16 (one sub-folder OUT/DTYPE each; the summary compares them); replaces --dtype",
    )


def quiet_libraries(verbose: bool = False) -> None:
    """Silence transformers' loading bars and info logs unless `verbose` (batch logs stay readable)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    if verbose:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_info()
    else:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def from_args(args: argparse.Namespace) -> Placement:
    """Resolve a command's `--device` and `--dtype`, and apply its `--verbose`."""
    quiet_libraries(getattr(args, "verbose", False))
    return resolve(getattr(args, "device", "auto"), getattr(args, "dtype", "auto"))


__all__ = [
    "DTYPES",
    "Placement",
    "add_dtypes_argument",
    "add_placement_arguments",
    "checkpoint_dtype",
    "device_kind",
    "from_args",
    "parse_device",
    "parse_dtype",
    "parse_dtypes",
    "quiet_libraries",
    "resolve",
    "resolve_device",
    "resolve_dtype",
    "torch_dtype",
]
