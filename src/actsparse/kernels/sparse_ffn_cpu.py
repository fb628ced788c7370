"""Fused compiled CPU decode step of a gated FFN under the threshold rule (batch 1, float32).

One C call (built by `cbuild`) does what `sparse_ffn` does with ~40 PyTorch ops: the input mask
|x| > τ_input, the products with the kept rows of the transposed fused [h, 2d] gate/up weights, the
activation, i = σ(g)·u, its mask |i| > τ_intermediate, the products with the kept rows of the
transposed [d, h] down weights, and the counts (zeroed, natural zeros, seen) of both vectors.
Two phases, each split among the threads in whole blocks of 16 columns: first each thread computes
its columns of g and u (sums over the kept input rows, in index order), the activation and the mask;
then each thread sums its columns of the output over the kept intermediate entries, in index order.
No sum is split between threads, so the output is bitwise the same at any thread count (a partial
output per thread, summed at the end, would round differently at 1 and at 2 threads, and move an
entry of the next layer across τ). Kept rows are read 4 at a time, with a software prefetch of the next
4, so that skipped rows break neither the streams nor the hardware prefetcher. A vector left dense
(τ None) keeps every entry. `available()` is False without a C compiler (or with
ACTSPARSE_NO_CKERNEL=1); `accelerate` then uses the PyTorch kernels of `sparse_ffn`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from actsparse.kernels import cbuild

__all__ = ["FusedFFN", "activation_code", "available"]

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef float vf __attribute__((vector_size(64), aligned(4), may_alias)); /* 16 floats, unaligned */
#define VL 16

static inline float act_fn(float v, int act) {
    if (act == 0) return v / (1.0f + expf(-v)); /* SiLU, as torch computes it */
    const float beta = 0.7978845608028654f, kappa = 0.044715f; /* GELU, tanh approximation */
    return 0.5f * v * (1.0f + tanhf(beta * (v + kappa * v * v * v)));
}

/* acc[0..n) += a0 w0 + a1 w1 + a2 w2 + a3 w3, prefetching the same columns of rows p0..p3. */
static inline void rows4(float *restrict acc, int64_t n, const float *w0, const float *w1, const float *w2,
                         const float *w3, float a0, float a1, float a2, float a3, const float *p0,
                         const float *p1, const float *p2, const float *p3) {
    int64_t c = 0;
    for (; c + VL <= n; c += VL) {
        __builtin_prefetch(p0 + c, 0, 1);
        __builtin_prefetch(p1 + c, 0, 1);
        __builtin_prefetch(p2 + c, 0, 1);
        __builtin_prefetch(p3 + c, 0, 1);
        vf s = *(const vf *)(acc + c);
        s += a0 * *(const vf *)(w0 + c) + a1 * *(const vf *)(w1 + c);
        s += a2 * *(const vf *)(w2 + c) + a3 * *(const vf *)(w3 + c);
        *(vf *)(acc + c) = s;
    }
    for (; c < n; c++) acc[c] += a0 * w0[c] + a1 * w1[c] + a2 * w2[c] + a3 * w3[c];
}

static inline void rows1(float *restrict acc, int64_t n, const float *w, float a) {
    int64_t c = 0;
    for (; c + VL <= n; c += VL) *(vf *)(acc + c) += a * *(const vf *)(w + c);
    for (; c < n; c++) acc[c] += a * w[c];
}

/* acc[0..n) += sum_k val[k] * (rows + idx[k] * stride + off)[0..n). */
static void gather_rows(float *acc, int64_t n, const float *rows, int64_t stride, int64_t off, const int32_t *idx,
                        const float *val, int64_t m) {
    int64_t k = 0;
    for (; k + 4 <= m; k += 4) {
        const float *w0 = rows + idx[k] * stride + off, *w1 = rows + idx[k + 1] * stride + off;
        const float *w2 = rows + idx[k + 2] * stride + off, *w3 = rows + idx[k + 3] * stride + off;
        int64_t q = k + 4 < m ? k + 4 : k; /* prefetch the next group of rows (none after the last) */
        const float *p0 = rows + idx[q] * stride + off;
        const float *p1 = rows + idx[q + 1 < m ? q + 1 : q] * stride + off;
        const float *p2 = rows + idx[q + 2 < m ? q + 2 : q] * stride + off;
        const float *p3 = rows + idx[q + 3 < m ? q + 3 : q] * stride + off;
        rows4(acc, n, w0, w1, w2, w3, val[k], val[k + 1], val[k + 2], val[k + 3], p0, p1, p2, p3);
    }
    for (; k < m; k++) rows1(acc, n, rows + idx[k] * stride + off, val[k]);
}

typedef struct {
    int64_t h, d;
    const float *gate_up_t, *down_t, *gate_bias, *up_bias;
    const int32_t *in_idx;
    const float *in_val;
    int64_t in_kept;
    int sparse_mid, act;
    double tau_mid;
    float *mid; /* [d]: the intermediate */
    unsigned char *keep; /* [d]: its mask */
    int64_t mid_counts[64][3];
} job_t;

/* Columns [c0, c1) of n of part t of nt, in whole blocks of VL (the same code path for a column at any nt). */
static void columns(int64_t n, int t, int nt, int64_t *c0, int64_t *c1) {
    int64_t blocks = (n + VL - 1) / VL;
    *c0 = blocks * t / nt * VL;
    *c1 = blocks * (t + 1) / nt * VL;
    *c1 = *c1 < n ? *c1 : n;
    *c0 = *c0 < *c1 ? *c0 : *c1;
}

/* Part t of nt of the intermediate: g and u of its entries, i = act(g)·u, the mask and the counts. */
static void mid_part(job_t *job, int t, int nt) {
    int64_t d = job->d, c0, c1;
    columns(d, t, nt, &c0, &c1);
    int64_t n = c1 - c0;
    float *acc = (float *)calloc((size_t)(2 * n + 1), sizeof(float));
    float *gate = acc, *up = acc + n;
    gather_rows(gate, n, job->gate_up_t, 2 * d, c0, job->in_idx, job->in_val, job->in_kept);
    gather_rows(up, n, job->gate_up_t, 2 * d, d + c0, job->in_idx, job->in_val, job->in_kept);
    int64_t kept = 0, natural = 0, bad = 0;
    for (int64_t c = 0; c < n; c++) {
        float g = gate[c] + (job->gate_bias ? job->gate_bias[c0 + c] : 0.0f);
        float u = up[c] + (job->up_bias ? job->up_bias[c0 + c] : 0.0f);
        float v = act_fn(g, job->act) * u;
        natural += v == 0.0f;
        bad += !isfinite(v);
        unsigned char k = !job->sparse_mid || (double)fabsf(v) > job->tau_mid;
        job->mid[c0 + c] = v;
        job->keep[c0 + c] = k;
        kept += k;
    }
    job->mid_counts[t][0] = n - kept;
    job->mid_counts[t][1] = natural;
    job->mid_counts[t][2] = bad;
    free(acc);
}

/* Part t of nt of the output: its columns of W_d over the kept intermediate entries (idx, val, m). */
static void out_part(const job_t *job, const int32_t *idx, const float *val, int64_t m, float *y,
                     const float *down_bias, int t, int nt) {
    int64_t h = job->h, c0, c1;
    columns(h, t, nt, &c0, &c1);
    int64_t n = c1 - c0;
    memset(y + c0, 0, (size_t)n * sizeof(float));
    gather_rows(y + c0, n, job->down_t, h, c0, idx, val, m);
    if (down_bias)
        for (int64_t c = c0; c < c1; c++) y[c] += down_bias[c];
}

/* The kept entries of v [n] in index order: their indices and values; returns how many. */
static int64_t compact(const unsigned char *keep, const float *v, int64_t n, int32_t *idx, float *val) {
    int64_t m = 0;
    for (int64_t c = 0; c < n; c++) {
        if (keep[c]) {
            idx[m] = (int32_t)c;
            val[m++] = v[c];
        }
    }
    return m;
}

/* y [h] = W_d (m_i ⊙ σ(W_g (m_x ⊙ x) + b_g) ⊙ (W_u (m_x ⊙ x) + b_u)) + b_d with m_x = |x| > tau_in
   (all ones if !sparse_in) and m_i = |i| > tau_mid (all ones if !sparse_mid); gate_up_t [h, 2d] holds
   W_gᵀ and W_uᵀ side by side, down_t [d, h] is W_dᵀ; biases may be NULL. counts [2][3] receives
   (zeroed, natural zeros, seen) of x and i. Returns bit 1 if x (when sparse_in) and bit 2 if i holds
   NaN or Inf; after bit 1 nothing else is written. One thread runs without entering OpenMP. */
int actsparse_sparse_ffn(const float *x, int64_t h, int64_t d, const float *gate_up_t, const float *down_t,
                         const float *gate_bias, const float *up_bias, const float *down_bias, int sparse_in,
                         double tau_in, int sparse_mid, double tau_mid, int act, float *y, int64_t *counts,
                         int nthreads) {
    int32_t *in_idx = (int32_t *)malloc((size_t)h * sizeof(int32_t));
    float *in_val = (float *)malloc((size_t)h * sizeof(float));
    int64_t kept = 0, natural = 0;
    int bad = 0;
    for (int64_t j = 0; j < h; j++) {
        float v = x[j];
        natural += v == 0.0f;
        bad |= !isfinite(v);
        if (!sparse_in || (double)fabsf(v) > tau_in) {
            in_idx[kept] = (int32_t)j;
            in_val[kept++] = v;
        }
    }
    if (sparse_in && bad) {
        free(in_idx);
        free(in_val);
        return 1;
    }
    nthreads = nthreads < 1 ? 1 : nthreads > 64 ? 64 : nthreads;
    float *mid = (float *)malloc((size_t)d * sizeof(float)), *mid_val = (float *)malloc((size_t)d * sizeof(float));
    unsigned char *keep = (unsigned char *)malloc((size_t)d);
    int32_t *mid_idx = (int32_t *)malloc((size_t)d * sizeof(int32_t));
    job_t job = {h, d, gate_up_t, down_t, gate_bias, up_bias, in_idx, in_val, kept, sparse_mid, act, tau_mid,
                 mid, keep, {{0}}};
    int64_t mid_kept = 0;
    if (nthreads == 1) {
        mid_part(&job, 0, 1);
        mid_kept = compact(keep, mid, d, mid_idx, mid_val);
        out_part(&job, mid_idx, mid_val, mid_kept, y, down_bias, 0, 1);
    } else {
#pragma omp parallel num_threads(nthreads)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            mid_part(&job, t, nt);
#pragma omp barrier
#pragma omp single
            mid_kept = compact(keep, mid, d, mid_idx, mid_val);
            out_part(&job, mid_idx, mid_val, mid_kept, y, down_bias, t, nt);
        }
    }
    counts[0] = h - kept;
    counts[1] = natural;
    counts[2] = h;
    counts[3] = counts[4] = 0;
    counts[5] = d;
    int64_t mid_bad = 0;
    for (int t = 0; t < nthreads; t++) {
        counts[3] += job.mid_counts[t][0];
        counts[4] += job.mid_counts[t][1];
        mid_bad += job.mid_counts[t][2];
    }
    free(mid);
    free(mid_val);
    free(keep);
    free(mid_idx);
    free(in_idx);
    free(in_val);
    return mid_bad ? 2 : 0;
}
"""

_P, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.actsparse_sparse_ffn
    fn.argtypes = [_P, _I64, _I64, _P, _P, _P, _P, _P, _INT, _DBL, _INT, _DBL, _INT, _P, _P, _INT]
    fn.restype = _INT


def _library() -> ctypes.CDLL | None:
    return cbuild.load("sparse_ffn", _SOURCE, _declare)


def available() -> bool:
    """Whether the fused kernel could be built (or was found in the cache) on this machine."""
    return _library() is not None


_SILU_NAMES = {"SiLU", "SiLUActivation"}
_GELU_TANH_NAMES = {"GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh"}


def activation_code(act: Callable[[torch.Tensor], torch.Tensor]) -> int | None:
    """The kernel's code of an FFN activation (0 SiLU, 1 tanh-GELU), None for one it lacks."""
    if act is F.silu or type(act).__name__ in _SILU_NAMES:
        return 0
    if type(act).__name__ in _GELU_TANH_NAMES or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return 1
    return None


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedFFN:
    """One gated FFN prepared for the fused kernel (float32, CPU, contiguous weights kept alive here).

    `gate_up_t` [h, 2d] is [W_gᵀ | W_uᵀ], `down_t` [d, h] is W_dᵀ; a τ of None leaves that vector dense.
    """

    def __init__(
        self,
        gate_up_t: torch.Tensor,
        down_t: torch.Tensor,
        act: int,
        tau_input: float | None,
        tau_intermediate: float | None,
        biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
    ):
        h, d = down_t.shape[1], down_t.shape[0]
        tensors = [gate_up_t, down_t, *(b for b in biases if b is not None)]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            raise ValueError("the fused CPU kernel takes float32 CPU weights")
        if gate_up_t.shape != (h, 2 * d):
            raise ValueError(f"gate_up_t is {tuple(gate_up_t.shape)}, expected {(h, 2 * d)}")
        self.h, self.d = h, d
        self.weights = (gate_up_t.detach().contiguous(), down_t.detach().contiguous())
        self._biases = [None if b is None else b.detach().float().contiguous() for b in biases]
        self._args = (
            self.weights[0].data_ptr(),
            self.weights[1].data_ptr(),
            *(_pointer(b) for b in self._biases),
            int(tau_input is not None),
            float(tau_input or 0.0),
            int(tau_intermediate is not None),
            float(tau_intermediate or 0.0),
            act,
        )
        self.counts = torch.zeros(2, 3, dtype=torch.long)
        """(zeroed, natural zeros, seen) of the input and the intermediate in the last call."""

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """FFN of one token x [..., h] (float32): the output and the NaN/Inf flags (1 input, 2 intermediate).

        Written into `out` (contiguous, x's shape) when given.
        """
        if x.shape[:-1].numel() != 1 or x.shape[-1] != self.h or x.dtype != torch.float32:
            raise ValueError(f"the fused kernel takes one float32 token of size {self.h}, got {tuple(x.shape)}")
        lib = _library()
        assert lib is not None, "call only when available()"
        x = x.contiguous()
        y = torch.empty(x.shape, dtype=torch.float32) if out is None else out
        if y.shape != x.shape or y.dtype != torch.float32 or not y.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(x.shape)}")
        (gate_up, down, bg, bu, bd, *rest) = self._args
        bad = lib.actsparse_sparse_ffn(
            x.data_ptr(),
            self.h,
            self.d,
            gate_up,
            down,
            bg,
            bu,
            bd,
            *rest,
            y.data_ptr(),
            self.counts.data_ptr(),
            torch.get_num_threads(),
        )
        return y, bad
