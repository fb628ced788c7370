"""What several test files share: the kinds of activation vectors and the hypothesis strategies over them,
and the `no_model` fixture of the command-line tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["random", "tied", "zeros", "outliers", "all_zero"]
"""Random, tied, zero-heavy, outlier-heavy ('massive activation') and all-zero vectors."""

fractions = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.9, 0.99]), st.floats(0, 1))
"""p or f in [0, 1], the ends and the usual values first."""


def vector_strategy(
    make: Callable[[str, tuple[int, ...], torch.dtype, int], torch.Tensor], shapes: list[tuple[int, ...]]
):
    """Vectors `make(kind, shape, dtype, seed)` of every kind, dtype and one of `shapes`."""
    return st.builds(
        make,
        kind=st.sampled_from(KINDS),
        shape=st.sampled_from(shapes),
        dtype=st.sampled_from(DTYPES),
        seed=st.integers(0, 2**31),
    )


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: bad input must be refused before model work."""
    monkeypatch.setenv("COLUMNS", "500")  # rich would wrap long messages mid-path

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("actsparse.models.loading.load_model", refuse)


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
