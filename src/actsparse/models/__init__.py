"""Model definitions that transformers does not ship (loaded without remote code)."""

from actsparse.models.llada import LLaDAConfig, LLaDAModelLM, is_llada_config

__all__ = ["LLaDAConfig", "LLaDAModelLM", "is_llada_config"]
