"""Evaluate a model on a task: per-document results, and KL to a dense reference (SPEC §4)."""

from actsparse.evaluate.reference import DenseReference
from actsparse.evaluate.results import DocResult, TaskResult
from actsparse.evaluate.scorer import evaluate_task

__all__ = ["DenseReference", "DocResult", "TaskResult", "evaluate_task"]
