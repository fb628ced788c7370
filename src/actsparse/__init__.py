"""actsparse: find and exploit activation sparsity in the FFN layers of modern LLMs.

The public API:

- `load_model(name)` → (model, tokenizer): an alias (`DEFAULT_MODEL`, "gemma3-270m"), a folder, a .gguf file
  or a hub id; `ModelNotAvailableError` when it cannot be had offline.
- `SparsitySpec(target, rule, value)`: what to sparsify; `TARGETS` and `RULE_NAMES` list the choices.
- `sparsify(model, spec)`: a context manager that applies the rule to every FFN and yields the
  `SparsityStats` of what it zeroed; the model is restored on exit, also after an error.
- `accelerate(model, spec)`: `sparsify` whose decode steps skip the weights of zeroed activations.
- `find_ffns(model)`, `SUPPORTED_MODEL_TYPES`, `UnsupportedModelError`: the FFN adapters.
- `rules`: the rules as pure functions; `NonFiniteActivationError` for NaN/Inf activations.

The rest is organised by step (see the README's flow table): models, sparsity, methods, tasks, evaluate,
study, analysis, report, speed, cli.

The public names load on first use, so that the command line answers `--help` and argument errors
without importing torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actsparse._lazy import lazy_attributes

if TYPE_CHECKING:
    from actsparse.models.adapters import SUPPORTED_MODEL_TYPES, UnsupportedModelError, find_ffns
    from actsparse.models.loading import DEFAULT_MODEL, ModelNotAvailableError, load_model
    from actsparse.sparsity import rules
    from actsparse.sparsity.instrument import sparsify
    from actsparse.sparsity.rules import NonFiniteActivationError
    from actsparse.sparsity.spec import RULE_NAMES, TARGETS, SparsitySpec
    from actsparse.sparsity.stats import SparsityStats
    from actsparse.speed.accelerate import accelerate

__all__ = [
    "DEFAULT_MODEL",
    "RULE_NAMES",
    "SUPPORTED_MODEL_TYPES",
    "TARGETS",
    "ModelNotAvailableError",
    "NonFiniteActivationError",
    "SparsitySpec",
    "SparsityStats",
    "UnsupportedModelError",
    "accelerate",
    "find_ffns",
    "load_model",
    "rules",
    "sparsify",
]
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "DEFAULT_MODEL": "actsparse.models.loading",
        "ModelNotAvailableError": "actsparse.models.loading",
        "load_model": "actsparse.models.loading",
        "SUPPORTED_MODEL_TYPES": "actsparse.models.adapters",
        "UnsupportedModelError": "actsparse.models.adapters",
        "find_ffns": "actsparse.models.adapters",
        "RULE_NAMES": "actsparse.sparsity.spec",
        "TARGETS": "actsparse.sparsity.spec",
        "SparsitySpec": "actsparse.sparsity.spec",
        "rules": "actsparse.sparsity",
        "sparsify": "actsparse.sparsity.instrument",
        "NonFiniteActivationError": "actsparse.sparsity.rules",
        "SparsityStats": "actsparse.sparsity.stats",
        "accelerate": "actsparse.speed.accelerate",
    },
)
