"""What a document asks of the model: the three request kinds the scorer knows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MultipleChoice:
    """Score each (context, continuation) pair by log-likelihood; `gold` indexes the choices.

    One shared context with a continuation per choice (most tasks), or a context per choice with one
    shared continuation (winogrande). `choices` are the texts whose lengths normalise acc_norm.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choices: tuple[str, ...]

    def pairs(self) -> list[tuple[str, str]]:
        n = len(self.choices)
        ctx = self.contexts if len(self.contexts) == n else self.contexts * n
        cont = self.continuations if len(self.continuations) == n else self.continuations * n
        return list(zip(ctx, cont, strict=True))


@dataclass(frozen=True)
class Completion:
    """Greedy completion of `context` must reproduce `target` (lambada's last word, with its space)."""

    context: str
    target: str


@dataclass(frozen=True)
class Generation:
    """Greedy generation from `prompt` until a stop string; exact match against any of `answers`,
    or, when given, `check(text)` → metrics (gsm8k's answer extraction, running code's tests)."""

    prompt: str
    answers: tuple[str, ...]
    until: tuple[str, ...] = ("\n", ".", ",")
    max_tokens: int = 256
    check: Callable[[str], dict[str, float]] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GoldLikelihood:
    """The log-likelihood of a gold `continuation` after `context`, read as bits per byte (OLMo)."""

    context: str
    continuation: str


Request = MultipleChoice | Completion | Generation | GoldLikelihood
