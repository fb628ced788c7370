"""The 8-bit weight format of the CPU decode kernels: symmetric int8 in blocks of 32, one float32 scale each.

As llama.cpp's Q8_0 (scale d = max|w| / 127 over a block, q = round(w / d)), with the scale kept in float32
(Q8_0 rounds it to float16). A matrix is quantized along its last dimension, the axis that sparsity does not
skip: the sparse FFN kernel reads transposed weights (one row per input or intermediate entry), so a skipped
entry skips whole blocks of its row; the attention and LM-head products read [out, in] rows as dot products.
`Q8.dequantize()` is the reference every kernel is tested against (in float64): the kernels convert each
int8 to float32 and multiply by its block's scale, so they compute with exactly these values.

`SOURCE` is the C the kernels include: `load_q8` (16 int8 as 16 floats: vpmovsxbd + vcvtdq2ps under AVX2 or AVX-512).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BLOCK", "Q8", "SOURCE", "quantize"]

BLOCK = 32
"""Weights per scale, along the last dimension."""

SOURCE = r"""
#define QB 32 /* int8 weights per scale (`int8.BLOCK`) */
#include <immintrin.h>
/* 16 int8 as 16 floats: sign-extend, convert (gcc 12 converts vector_size int8 to float one lane at a time) */
static inline vf load_q8(const int8_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
    vf v;
    memcpy(&v, &lo, 32);
    memcpy((char *)&v + 32, &hi, 32);
    return v;
#else
    vf v;
    for (int i = 0; i < VL; i++) v[i] = (float)p[i];
    return v;
#endif
}
"""
"""C source of the int8 format (after `cbuild.VECTORS`)."""


@dataclass(frozen=True)
class Q8:
    """A matrix [rows, n] in the int8 format: `q` int8 [rows, n] and `scale` float32 [rows, n // 32] (contiguous)."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matrix the kernels compute with: each int8 times its block's scale."""
        rows, n = self.q.shape
        blocks = self.q.to(dtype).view(rows, n // BLOCK, BLOCK) * self.scale.to(dtype).unsqueeze(-1)
        return blocks.view(rows, n)


def quantize(w: torch.Tensor) -> Q8:
    """w [rows, n] (n a multiple of 32) in the int8 format, blocks along the last dimension (round half away
    from zero, as llama.cpp's roundf)."""
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(
            f"the int8 format takes a matrix whose rows are a multiple of {BLOCK} long, got {tuple(w.shape)}"
        )
    rows, n = w.shape
    blocks = w.detach().to(torch.float32).reshape(rows, n // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=-1) / 127.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    scaled = blocks * inverse.unsqueeze(-1)
    q = (scaled.abs() + 0.5).floor().copysign(scaled).clamp_(-127, 127).to(torch.int8)
    return Q8(q.reshape(rows, n).contiguous(), scale.contiguous())
