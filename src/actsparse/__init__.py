"""actsparse: find and exploit activation sparsity in the FFN layers of modern LLMs."""

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
