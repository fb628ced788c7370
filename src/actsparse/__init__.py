"""actsparse: find and exploit activation sparsity in the FFN layers of modern LLMs."""

from actsparse import rules
from actsparse.accelerate import accelerate
from actsparse.adapters import SUPPORTED_MODEL_TYPES, UnsupportedModelError, find_ffns
from actsparse.instrument import sparsify
from actsparse.loading import DEFAULT_MODEL, ModelNotAvailableError, load_model
from actsparse.rules import NonFiniteActivationError
from actsparse.spec import RULE_NAMES, TARGETS, SparsitySpec
from actsparse.stats import SparsityStats

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
