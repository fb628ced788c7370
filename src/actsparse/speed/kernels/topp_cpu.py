"""Compiled CPU radix select for the top-p and top-k masks.

A small C kernel (below), built at first use by `cbuild` (cached, called through ctypes; it
builds in about a second). Per row it finds τ with a three-level radix select on the bit patterns of |v|
(11 bits, then 6, 6, 6 and 2; sums in float64), then writes the keep-mask |v| ≥ τ (top-p at p = 1: |v| > 0).
`available()` is False without a compiler (or with ACTSPARSE_NO_CKERNEL=1): callers fall back to PyTorch.
"""

from __future__ import annotations

import ctypes

import torch

from actsparse.speed.kernels import cbuild

__all__ = ["available", "select_mask"]

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static inline float as_float(uint32_t k) { float f; memcpy(&f, &k, 4); return f; }

/* |x| as the bit pattern of a non-negative float32: monotone in the value. */
static void load_keys(const void *x, int dtype, int64_t n, uint32_t *key) {
    if (dtype == 0) {
        const uint32_t *u = (const uint32_t *)x;
        for (int64_t i = 0; i < n; i++) key[i] = u[i] & 0x7fffffffu;
    } else if (dtype == 1) { /* bfloat16 */
        const uint16_t *u = (const uint16_t *)x;
        for (int64_t i = 0; i < n; i++) key[i] = (uint32_t)(u[i] & 0x7fffu) << 16;
    } else { /* float16 */
        const uint16_t *u = (const uint16_t *)x;
        for (int64_t i = 0; i < n; i++) {
            uint32_t e = (u[i] >> 10) & 0x1fu, m = u[i] & 0x3ffu, k;
            if (e == 0x1fu) k = 0x7f800000u | (m << 13);
            else if (e == 0) { float f = (float)m * 5.9604644775390625e-08f; memcpy(&k, &f, 4); }
            else k = ((e + 112u) << 23) | (m << 13);
            key[i] = k;
        }
    }
}

/* Weight of an entry: its value for top-p, one for top-k. */
static inline double weight(uint32_t k, int topk) { return topk ? 1.0 : (double)as_float(k); }

/* Among keys[0..m) (all sharing their top 12 bits), the largest key t with
   cum + sum(weight of keys >= t) >= target; the smallest positive-weight key if rounding
   keeps the sums short of target. Radix levels on bits 14-19, 8-13, 2-7, 0-1 until few keys
   are left, then a sort of those. Compacts keys in place. hist holds >= 64 zeros. */
static uint32_t resolve(uint32_t *keys, int64_t m, double cum, double target, int topk, double *hist) {
    static const int shifts[4] = {14, 8, 2, 0}, widths[4] = {63, 63, 63, 3};
    for (int level = 0;; level++) {
        if (m <= 32) {
            for (int64_t i = 1; i < m; i++) { /* insertion sort, descending */
                uint32_t k = keys[i];
                int64_t j = i;
                while (j > 0 && keys[j - 1] < k) { keys[j] = keys[j - 1]; j--; }
                keys[j] = k;
            }
            uint32_t tau = keys[0];
            for (int64_t j = 0; j < m; j++) {
                double w = weight(keys[j], topk);
                cum += w;
                if (w > 0) tau = keys[j];
                if (cum >= target) break;
            }
            return tau;
        }
        if (level == 4) return keys[0]; /* every bit chosen: the keys left are all equal */
        int shift = shifts[level], width = widths[level];
        int lo = width, hi = 0;
        for (int64_t i = 0; i < m; i++) {
            int b = (keys[i] >> shift) & width;
            hist[b] += weight(keys[i], topk);
            lo = b < lo ? b : lo;
            hi = b > hi ? b : hi;
        }
        int sel = -1, last = lo;
        for (int b = hi; b >= lo; b--) {
            if (hist[b] > 0) last = b;
            double c = cum + hist[b];
            if (c >= target && hist[b] > 0) { sel = b; break; }
            cum = c;
        }
        if (sel < 0) { sel = last; cum -= hist[last]; }
        memset(hist + lo, 0, (size_t)(hi - lo + 1) * sizeof(double));
        int64_t w = 0;
        for (int64_t i = 0; i < m; i++) {
            keys[w] = keys[i];
            w += (int)((keys[i] >> shift) & width) == sel;
        }
        m = w;
    }
}

/* Rows [r0, r1) of the job below, on one thread. */
static int select_rows(const void *x, int dtype, int64_t r0, int64_t r1, int64_t n, int topk, double value,
                       uint8_t *mask, void *out) {
    int bad = 0;
    size_t esize = dtype == 0 ? 4 : 2;
    double *hist = (double *)calloc(2048, sizeof(double));
    uint32_t *keys = (uint32_t *)malloc((size_t)n * 4), *buf = (uint32_t *)malloc((size_t)n * 4);
    for (int64_t r = r0; r < r1; r++) {
        load_keys((const char *)x + (size_t)r * n * esize, dtype, n, keys);
        uint32_t kmax = 0;
        int lo, hi;
        uint32_t kmin = 0xffffffffu, kpos = 0xffffffffu;
        for (int64_t i = 0; i < n; i++) {
            uint32_t k = keys[i];
            kmax = k > kmax ? k : kmax;
            kmin = k < kmin ? k : kmin;
            kpos = k > 0 && k < kpos ? k : kpos;
            hist[k >> 20] += weight(k, topk);
        }
        lo = kmin >> 20;
        hi = kmax >> 20;
        if (kmax >= 0x7f800000u) {
            bad = 1;
            memset(hist, 0, 2048 * sizeof(double));
            continue;
        }
        double total = 0;
        for (int b = hi; b >= lo; b--) total += hist[b];
        double target = topk ? value : value * total;
        uint32_t tau = kmax;
        if (!topk && value >= 1.0) {
            /* p = 1: every nonzero entry (SPEC §2); float64 sums absorb a tiny entry beside a huge one */
            memset(hist + lo, 0, (size_t)(hi - lo + 1) * sizeof(double));
            tau = kmax > 0 ? kpos : 0;
        } else if (target > 0) {
            double cum = 0;
            int sel = lo;
            for (int b = hi; b >= lo; b--) {
                double c = cum + hist[b];
                if (c >= target) { sel = b; break; }
                cum = c;
            }
            memset(hist + lo, 0, (size_t)(hi - lo + 1) * sizeof(double));
            int64_t m = 0;
            for (int64_t i = 0; i < n; i++) {
                buf[m] = keys[i];
                m += (int)(keys[i] >> 20) == sel;
            }
            tau = resolve(buf, m, cum, target, topk, hist);
        } else {
            memset(hist + lo, 0, (size_t)(hi - lo + 1) * sizeof(double));
        }
        uint8_t *keep = mask + (size_t)r * n;
        for (int64_t i = 0; i < n; i++) keep[i] = keys[i] >= tau;
        if (out && esize == 4) {
            const uint32_t *src = (const uint32_t *)x + (size_t)r * n;
            uint32_t *dst = (uint32_t *)out + (size_t)r * n;
            for (int64_t i = 0; i < n; i++) dst[i] = keys[i] >= tau ? src[i] : 0u;
        } else if (out) {
            const uint16_t *src = (const uint16_t *)x + (size_t)r * n;
            uint16_t *dst = (uint16_t *)out + (size_t)r * n;
            for (int64_t i = 0; i < n; i++) dst[i] = keys[i] >= tau ? src[i] : (uint16_t)0;
        }
    }
    free(hist);
    free(keys);
    free(buf);
    return bad;
}

/* Keep-mask of top-p (topk = 0, value = p) or top-k (topk = 1, value = k) for `rows` rows of
   `n` contiguous entries, and when `out` is not NULL the sparsified rows (dropped entries +0).
   Returns 1 if any entry is NaN or Inf (the outputs are then undefined). One thread runs without
   entering OpenMP, which would otherwise resize the team that torch's own parallel regions use. */
int actsparse_select_mask(const void *x, int dtype, int64_t rows, int64_t n, int topk, double value,
                          uint8_t *mask, void *out, int nthreads) {
    if (nthreads <= 1) return select_rows(x, dtype, 0, rows, n, topk, value, mask, out);
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
        bad |= select_rows(x, dtype, r0, r1, n, topk, value, mask, out);
    }
    return bad;
}
"""

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.actsparse_select_mask
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_double,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    fn.restype = ctypes.c_int


def _library() -> ctypes.CDLL | None:
    return cbuild.load("topp", _SOURCE, _declare)


def available() -> bool:
    """Whether the compiled kernel could be built (or was found in the cache) on this machine."""
    return _library() is not None


def select_mask(
    v: torch.Tensor, topk: bool, value: float, sparsify: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Top-p (`value` = p) or top-k (`value` = k) of a CPU tensor: keep-mask, sparsified `v` (if asked), finite?

    Call only when `available()`; `v` is float32, bfloat16 or float16.
    """
    lib = _library()
    assert lib is not None
    x = v if v.is_contiguous() else v.contiguous()
    mask = torch.empty(v.shape, dtype=torch.bool)
    out = torch.empty(v.shape, dtype=v.dtype) if sparsify else None
    size = x.numel()
    if size == 0:
        return mask, out, True
    n = x.shape[-1]
    threads = max(1, min(torch.get_num_threads(), size // 32768))
    bad = lib.actsparse_select_mask(
        x.data_ptr(),
        _DTYPES[x.dtype],
        size // n,
        n,
        int(topk),
        float(value),
        mask.data_ptr(),
        None if out is None else out.data_ptr(),
        threads,
    )
    return mask, out, not bad
