"""Fused compiled CPU decode step of a gated FFN (1 to `MAX_BATCH` tokens, float32 or bfloat16).

One C call (built by `cbuild`) does what `sparse_ffn` does with ~40 PyTorch ops: the input mask, the
products with the kept rows of the transposed gate and up weights, the activation, i = σ(g)·u, its
mask, the products with the kept rows of the transposed down weights, and per token the counts
(zeroed, natural zeros, seen) of both vectors. A vector's mask is the threshold rule |v| > τ, top-k or
top-p (the radix select of `topp_cpu`, whose C source is compiled in), or none (dense). A batch reads the
union of its tokens' kept rows once, each token's dropped entries weighing zero.
Two phases, each split among the threads in whole blocks of 16 columns: first each thread computes
its columns of g and u (sums over the kept input rows, in index order), the activation (and the
threshold mask); then, after a barrier and a serial step (top-k/top-p select, counts, compaction in
index order), each thread sums its columns of the output over the kept intermediate entries (on the
threads of `cpu_pool`, which stay awake between the calls of a decode step). No sum
is split between threads, so the output is bitwise the same at any thread count (a partial output per
thread, summed at the end, would round differently at 1 and at 2 threads, and move an entry of the
next layer across τ). Kept rows are read 4 at a time, with a software prefetch of the next 4, so that
skipped rows break neither the streams nor the hardware prefetcher; columns go in tiles so that a batch
reuses each weight row from cache. Weights are read through row strides, so they can live in the model's
own parameters (see `kernels.relayout`). bfloat16 sums in float32 and rounds g, u, σ(g), i and y
to bfloat16 as PyTorch does. `available()` is False without a C compiler (or with
ACTSPARSE_NO_CKERNEL=1); `accelerate` then uses the PyTorch kernels of `sparse_ffn`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from actsparse.speed.kernels import cbuild, cpu_pool, int8, topp_cpu
from actsparse.speed.kernels.int8 import Q8

__all__ = ["MAX_BATCH", "RULE_CODES", "FusedFFN", "activation_code", "available"]

MAX_BATCH = 8
"""Most tokens of one call; they share the union of their masks."""

RULE_CODES = {"threshold": 1, "top_k": 2, "top_p": 3}
"""A vector's rule in the kernel (0: dense); its value is τ, k (a count) or p."""

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_SOURCE = (
    topp_cpu._SOURCE
    + cpu_pool.CLIENT
    + cbuild.VECTORS
    + int8.SOURCE
    + r"""
#include <math.h>

#define MAXB 8
#define TILE 256 /* columns of one tile, a multiple of VL: 4 rows of a tile stay in L1 across a batch */

static inline float round_bf(float f) { return bf(to_bf(f)); }

static inline float act_fn(float v, int act) {
    if (act == 0) return v / (1.0f + expf(-v)); /* SiLU, as torch computes it */
    const float beta = 0.7978845608028654f, kappa = 0.044715f; /* GELU, tanh approximation */
    return 0.5f * v * (1.0f + tanhf(beta * (v + kappa * v * v * v)));
}

static inline vf load_f32(const float *p) { return *(const vf *)p; }
static inline vf load_bf16(const uint16_t *p) {
    vu w = __builtin_convertvector(*(const vh *)p, vu) << 16;
    return (vf)w;
}
static inline float scalar_f32(const float *p) { return *p; }
static inline float scalar_bf16(const uint16_t *p) { return bf(*p); }

/* gather_<T>: for each token b < nb, acc[b * lda + 0..n) += sum_k val[k * nb + b] * (w + idx[k] * stride + off)[0..n),
   over k in index order, 4 rows at a time with the next 4 prefetched. Per column the order of the
   additions is fixed by idx alone (not by n, the tiles or the thread). */
#define GATHER(T, W)                                                                                                 \
    static inline void rows4_##T(float *restrict acc, int64_t n, const W *w0, const W *w1, const W *w2,              \
                                 const W *w3, float a0, float a1, float a2, float a3, const W *p0, const W *p1,     \
                                 const W *p2, const W *p3) {                                                        \
        int64_t c = 0;                                                                                              \
        for (; c + VL <= n; c += VL) {                                                                              \
            __builtin_prefetch(p0 + c, 0, 1);                                                                       \
            __builtin_prefetch(p1 + c, 0, 1);                                                                       \
            __builtin_prefetch(p2 + c, 0, 1);                                                                       \
            __builtin_prefetch(p3 + c, 0, 1);                                                                       \
            vf s = *(const vf *)(acc + c);                                                                          \
            s += a0 * load_##T(w0 + c) + a1 * load_##T(w1 + c);                                                     \
            s += a2 * load_##T(w2 + c) + a3 * load_##T(w3 + c);                                                     \
            *(vf *)(acc + c) = s;                                                                                   \
        }                                                                                                           \
        for (; c < n; c++)                                                                                          \
            acc[c] += a0 * scalar_##T(w0 + c) + a1 * scalar_##T(w1 + c) + a2 * scalar_##T(w2 + c) +                 \
                      a3 * scalar_##T(w3 + c);                                                                      \
    }                                                                                                               \
    static inline void rows1_##T(float *restrict acc, int64_t n, const W *w, float a) {                             \
        int64_t c = 0;                                                                                              \
        for (; c + VL <= n; c += VL) *(vf *)(acc + c) += a * load_##T(w + c);                                      \
        for (; c < n; c++) acc[c] += a * scalar_##T(w + c);                                                        \
    }                                                                                                               \
    static void gather_##T(float *acc, int64_t lda, int nb, int64_t n, const W *w, int64_t stride, int64_t off,    \
                           const int32_t *idx, const float *val, int64_t m) {                                       \
        int64_t tile = nb == 1 ? n : TILE; /* one token: whole rows, one stream each */ \
        for (int64_t t0 = 0; t0 < n; t0 += tile) {                                                                  \
            int64_t tn = n - t0 < tile ? n - t0 : tile;                                                             \
            const W *base = w + off + t0;                                                                           \
            int64_t k = 0;                                                                                          \
            for (; k + 4 <= m; k += 4) {                                                                            \
                const W *w0 = base + idx[k] * stride, *w1 = base + idx[k + 1] * stride;                             \
                const W *w2 = base + idx[k + 2] * stride, *w3 = base + idx[k + 3] * stride;                         \
                int64_t q = k + 4 < m ? k + 4 : k; /* prefetch the next group of rows (none after the last) */      \
                const W *p0 = base + idx[q] * stride, *p1 = base + idx[q + 1 < m ? q + 1 : q] * stride;             \
                const W *p2 = base + idx[q + 2 < m ? q + 2 : q] * stride;                                           \
                const W *p3 = base + idx[q + 3 < m ? q + 3 : q] * stride;                                           \
                const float *v = val + k * nb;                                                                      \
                for (int b = 0; b < nb; b++)                                                                        \
                    rows4_##T(acc + b * lda + t0, tn, w0, w1, w2, w3, v[b], v[nb + b], v[2 * nb + b],               \
                              v[3 * nb + b], p0, p1, p2, p3);                                                       \
            }                                                                                                       \
            for (; k < m; k++)                                                                                      \
                for (int b = 0; b < nb; b++)                                                                        \
                    rows1_##T(acc + b * lda + t0, tn, base + idx[k] * stride, val[k * nb + b]);                     \
        }                                                                                                           \
    }

GATHER(f32, float)
GATHER(bf16, uint16_t)

/* rows4_q8: acc[0..n) += sum_i a_i * s_i[block] * w_i[0..n) over four int8 rows (n a multiple of QB), the next
   four prefetched; the same order of additions per column as rows4_<T>. */
static inline void rows4_q8(float *restrict acc, int64_t n, const int8_t *w0, const int8_t *w1, const int8_t *w2,
                            const int8_t *w3, const float *s0, const float *s1, const float *s2, const float *s3,
                            float a0, float a1, float a2, float a3, const int8_t *p0, const int8_t *p1,
                            const int8_t *p2, const int8_t *p3) {
    for (int64_t c = 0, blk = 0; c < n; c += QB, blk++) {
        __builtin_prefetch(p0 + c, 0, 1);
        __builtin_prefetch(p1 + c, 0, 1);
        __builtin_prefetch(p2 + c, 0, 1);
        __builtin_prefetch(p3 + c, 0, 1);
        float b0 = a0 * s0[blk], b1 = a1 * s1[blk], b2 = a2 * s2[blk], b3 = a3 * s3[blk];
        vf lo = *(const vf *)(acc + c), hi = *(const vf *)(acc + c + VL);
        lo += b0 * load_q8(w0 + c) + b1 * load_q8(w1 + c);
        hi += b0 * load_q8(w0 + c + VL) + b1 * load_q8(w1 + c + VL);
        lo += b2 * load_q8(w2 + c) + b3 * load_q8(w3 + c);
        hi += b2 * load_q8(w2 + c + VL) + b3 * load_q8(w3 + c + VL);
        *(vf *)(acc + c) = lo;
        *(vf *)(acc + c + VL) = hi;
    }
}

/* gather_<T> for int8 rows (`int8.Q8`): w [rows][stride] int8, scales [rows][stride / QB]; off and n multiples of
   QB. A last group of fewer than four rows repeats its first row at weight zero (the order stays fixed by idx). */
static void gather_q8(float *acc, int64_t lda, int nb, int64_t n, const int8_t *w, int64_t stride,
                      const float *scales, int64_t off, const int32_t *idx, const float *val, int64_t m) {
    int64_t tile = nb == 1 ? n : TILE, ss = stride / QB;
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
        int64_t tn = n - t0 < tile ? n - t0 : tile;
        const int8_t *base = w + off + t0;
        const float *sb = scales + (off + t0) / QB;
        for (int64_t k = 0; k < m; k += 4) {
            int64_t r[4], q[4];
            for (int i = 0; i < 4; i++) {
                r[i] = idx[k + i < m ? k + i : k];
                q[i] = k + 4 + i < m ? idx[k + 4 + i] : r[i];
            }
            for (int b = 0; b < nb; b++) {
                float a[4];
                for (int i = 0; i < 4; i++) a[i] = k + i < m ? val[(k + i) * nb + b] : 0.0f;
                rows4_q8(acc + b * lda + t0, tn, base + r[0] * stride, base + r[1] * stride, base + r[2] * stride,
                         base + r[3] * stride, sb + r[0] * ss, sb + r[1] * ss, sb + r[2] * ss, sb + r[3] * ss, a[0],
                         a[1], a[2], a[3], base + q[0] * stride, base + q[1] * stride, base + q[2] * stride,
                         base + q[3] * stride);
            }
        }
    }
}

typedef struct {
    int nb, dtype, act, mid_rule;
    int64_t h, d, gate_stride, up_stride, down_stride;
    const void *gate_t, *up_t, *down_t, *gate_bias, *up_bias, *down_bias;
    const float *gate_s, *up_s, *down_s; /* the scales of int8 weights (NULL: weights in the dtype) */
    double mid_value;
    const int32_t *in_idx;
    const float *in_val;
    int64_t in_kept;
    float *mid; /* [nb][d]: the intermediate */
    unsigned char *keep; /* [nb][d]: its mask */
    const int32_t *mid_idx;
    const float *mid_val;
    int64_t mid_kept;
    void *y;
} job_t;

static inline float bias_at(const void *b, int dtype, int64_t c) {
    if (!b) return 0.0f;
    return dtype ? bf(((const uint16_t *)b)[c]) : ((const float *)b)[c];
}

/* Columns [c0, c1) of n of part t of nt, in whole blocks of QB (the same code path for a column at any nt). */
static void columns(int64_t n, int t, int nt, int64_t *c0, int64_t *c1) {
    int64_t blocks = (n + QB - 1) / QB;
    *c0 = blocks * t / nt * QB;
    *c1 = blocks * (t + 1) / nt * QB;
    *c1 = *c1 < n ? *c1 : n;
    *c0 = *c0 < *c1 ? *c0 : *c1;
}

/* Part t of nt of the intermediate: g and u of its entries for every token, i = act(g)·u and the threshold mask. */
static void mid_part(job_t *job, int t, int nt) {
    int64_t d = job->d, c0, c1;
    columns(d, t, nt, &c0, &c1);
    int64_t n = c1 - c0;
    int nb = job->nb;
    if (n <= 0) return;
    float *gate = (float *)calloc((size_t)(2 * nb * n), sizeof(float)), *up = gate + nb * n;
    const int32_t *idx = job->in_idx;
    const float *val = job->in_val;
    int64_t m = job->in_kept;
    if (job->gate_s) {
        gather_q8(gate, n, nb, n, (const int8_t *)job->gate_t, job->gate_stride, job->gate_s, c0, idx, val, m);
        gather_q8(up, n, nb, n, (const int8_t *)job->up_t, job->up_stride, job->up_s, c0, idx, val, m);
    } else if (job->dtype) {
        gather_bf16(gate, n, nb, n, (const uint16_t *)job->gate_t, job->gate_stride, c0, idx, val, m);
        gather_bf16(up, n, nb, n, (const uint16_t *)job->up_t, job->up_stride, c0, idx, val, m);
    } else {
        gather_f32(gate, n, nb, n, (const float *)job->gate_t, job->gate_stride, c0, idx, val, m);
        gather_f32(up, n, nb, n, (const float *)job->up_t, job->up_stride, c0, idx, val, m);
    }
    for (int b = 0; b < nb; b++) {
        for (int64_t c = 0; c < n; c++) {
            float g = gate[b * n + c] + bias_at(job->gate_bias, job->dtype, c0 + c);
            float u = up[b * n + c] + bias_at(job->up_bias, job->dtype, c0 + c);
            float v;
            if (job->dtype) {
                g = round_bf(g);
                u = round_bf(u);
                v = round_bf(round_bf(act_fn(g, job->act)) * u);
            } else {
                v = act_fn(g, job->act) * u;
            }
            job->mid[b * d + c0 + c] = v;
            job->keep[b * d + c0 + c] = job->mid_rule != 1 || (double)fabsf(v) > job->mid_value;
        }
    }
    free(gate);
}

/* Part t of nt of the output: its columns of W_d over the kept intermediate entries, for every token. */
static void out_part(const job_t *job, int t, int nt) {
    int64_t h = job->h, c0, c1;
    columns(h, t, nt, &c0, &c1);
    int64_t n = c1 - c0;
    int nb = job->nb;
    if (n <= 0) return;
    float *acc = (float *)calloc((size_t)(nb * n), sizeof(float));
    const int32_t *idx = job->mid_idx;
    const float *val = job->mid_val;
    if (job->down_s)
        gather_q8(acc, n, nb, n, (const int8_t *)job->down_t, job->down_stride, job->down_s, c0, idx, val,
                  job->mid_kept);
    else if (job->dtype)
        gather_bf16(acc, n, nb, n, (const uint16_t *)job->down_t, job->down_stride, c0, idx, val, job->mid_kept);
    else
        gather_f32(acc, n, nb, n, (const float *)job->down_t, job->down_stride, c0, idx, val, job->mid_kept);
    for (int b = 0; b < nb; b++) {
        for (int64_t c = 0; c < n; c++) {
            float v = acc[b * n + c] + bias_at(job->down_bias, job->dtype, c0 + c);
            if (job->dtype) ((uint16_t *)job->y)[b * h + c0 + c] = to_bf(v);
            else ((float *)job->y)[b * h + c0 + c] = v;
        }
    }
    free(acc);
}

/* The mask of one vector v [nb][n] (float32) under rule 0-3 (dense, |v| > value, top-k, top-p) into keep, where
   rule 1 has not already written it. */
static void select_keep(const float *v, int nb, int64_t n, int rule, double value, unsigned char *keep) {
    if (rule == 0) memset(keep, 1, (size_t)(nb * n));
    else if (rule == 1)
        for (int64_t j = 0; j < nb * n; j++) keep[j] = (double)fabsf(v[j]) > value;
    else select_rows(v, 0, 0, nb, n, rule == 2, value, keep, NULL);
}

/* Per token the counts (zeroed, natural zeros, seen) of v [nb][n] into counts[b * 6 + 0..3), the union of the
   tokens' kept entries (in index order) into idx, and their values per token (0 where a token drops one)
   into val [m][nb]; returns m. Sets *bad if v holds NaN or Inf. */
static int64_t compact(const float *v, const unsigned char *keep, int nb, int64_t n, int32_t *idx, float *val,
                       int64_t *counts, int *bad) {
    int64_t m = 0;
    for (int b = 0; b < nb; b++) {
        int64_t kept = 0, natural = 0;
        for (int64_t j = 0; j < n; j++) {
            float x = v[b * n + j];
            kept += keep[b * n + j];
            natural += x == 0.0f;
            *bad |= !isfinite(x);
        }
        counts[b * 6] = n - kept;
        counts[b * 6 + 1] = natural;
        counts[b * 6 + 2] = n;
    }
    for (int64_t j = 0; j < n; j++) {
        unsigned char any = 0;
        for (int b = 0; b < nb; b++) any |= keep[b * n + j];
        if (!any) continue;
        idx[m] = (int32_t)j;
        for (int b = 0; b < nb; b++) val[m * nb + b] = keep[b * n + j] ? v[b * n + j] : 0.0f;
        m++;
    }
    return m;
}

typedef struct {
    job_t *job;
    int64_t *mid_counts;
    int *bad_mid;
    spin_barrier_t barrier;
} ffn_task_t;

/* Thread t of nt: its columns of g, u and i, then (thread 0) the intermediate's mask and compaction, then its
   columns of the output. */
static void ffn_task(void *arg, int t, int nt) {
    ffn_task_t *task = (ffn_task_t *)arg;
    job_t *job = task->job;
    mid_part(job, t, nt);
    spin_barrier(&task->barrier, nt);
    if (t == 0) {
        if (job->mid_rule > 1) select_keep(job->mid, job->nb, job->d, job->mid_rule, job->mid_value, job->keep);
        job->mid_kept = compact(job->mid, job->keep, job->nb, job->d, (int32_t *)job->mid_idx, (float *)job->mid_val,
                                task->mid_counts, task->bad_mid);
    }
    spin_barrier(&task->barrier, nt);
    out_part(job, t, nt);
}

/* y [nb][h] = W_d (m_i ⊙ σ(W_g (m_x ⊙ x) + b_g) ⊙ (W_u (m_x ⊙ x) + b_u)) + b_d per token, with m_x and m_i the
   masks of the input and intermediate rules (code 0-3, value). gate_t, up_t [h][d] hold W_gᵀ and W_uᵀ and
   down_t [d][h] holds W_dᵀ, each row-contiguous with its own row stride; dtype 0 float32, 1 bfloat16 for x,
   y, weights and biases (which may be NULL). With scales (gate_s, up_s, down_s not NULL) the weights are int8
   (`int8.Q8`, h and d multiples of QB). counts [nb][2][3] receives (zeroed, natural zeros, seen) of x and
   i per token; totals [2][3], when not NULL, the same counts summed over the tokens added to it (a running
   total, so that a caller need not read counts per call). Returns bit 1 if x (under a rule) and bit 2 if i
   holds NaN or Inf; after bit 1 nothing else is written. One thread runs without entering OpenMP. */
int actsparse_sparse_ffn(const void *x, int nb, int64_t h, int64_t d, int dtype, const void *gate_t,
                         int64_t gate_stride, const void *up_t, int64_t up_stride, const void *down_t,
                         int64_t down_stride, const void *gate_bias, const void *up_bias, const void *down_bias,
                         const float *gate_s, const float *up_s, const float *down_s, int in_rule, double in_value,
                         int mid_rule, double mid_value, int act, void *y, int64_t *counts, int64_t *totals,
                         int nthreads) {
    nb = nb < 1 ? 1 : nb > MAXB ? MAXB : nb;
    float *xf = (float *)malloc((size_t)(nb * h) * sizeof(float));
    float *in_val = (float *)malloc((size_t)(nb * h) * sizeof(float));
    unsigned char *in_keep = (unsigned char *)malloc((size_t)(nb * h));
    int32_t *in_idx = (int32_t *)malloc((size_t)h * sizeof(int32_t));
    for (int64_t j = 0; j < nb * h; j++) xf[j] = dtype ? bf(((const uint16_t *)x)[j]) : ((const float *)x)[j];
    int bad_in = 0;
    for (int64_t j = 0; j < nb * h; j++) bad_in |= !isfinite(xf[j]);
    int64_t in_kept = 0;
    if (!(in_rule && bad_in)) {
        select_keep(xf, nb, h, in_rule, in_value, in_keep);
        int ignored = 0;
        int64_t in_counts[MAXB * 6];
        in_kept = compact(xf, in_keep, nb, h, in_idx, in_val, in_counts, &ignored);
        for (int b = 0; b < nb; b++) memcpy(counts + b * 6, in_counts + b * 6, 3 * sizeof(int64_t));
    }
    free(xf);
    free(in_keep);
    if (in_rule && bad_in) {
        free(in_val);
        free(in_idx);
        return 1;
    }
    float *mid = (float *)malloc((size_t)(nb * d) * sizeof(float));
    float *mid_val = (float *)malloc((size_t)(nb * d) * sizeof(float));
    unsigned char *keep = (unsigned char *)malloc((size_t)(nb * d));
    int32_t *mid_idx = (int32_t *)malloc((size_t)d * sizeof(int32_t));
    job_t job = {nb, dtype, act, mid_rule, h, d, gate_stride, up_stride, down_stride, gate_t, up_t, down_t,
                 gate_bias, up_bias, down_bias, gate_s, up_s, down_s, mid_value, in_idx, in_val, in_kept, mid,
                 keep, mid_idx, mid_val, 0, y};
    int bad_mid = 0;
    int64_t mid_counts[MAXB * 6];
    ffn_task_t task = {&job, mid_counts, &bad_mid, {0, 0}};
    parallel(ffn_task, &task, nthreads);
    for (int b = 0; b < nb; b++) memcpy(counts + b * 6 + 3, mid_counts + b * 6, 3 * sizeof(int64_t));
    if (totals && !bad_mid)
        for (int b = 0; b < nb; b++)
            for (int j = 0; j < 6; j++) totals[j] += counts[b * 6 + j];
    free(mid);
    free(mid_val);
    free(keep);
    free(mid_idx);
    free(in_idx);
    free(in_val);
    return bad_mid ? 2 : 0;
}
"""
)

_P, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double


def _declare(lib: ctypes.CDLL) -> None:
    cpu_pool.attach(lib)
    fn = lib.actsparse_sparse_ffn
    fn.argtypes = [_P, _INT, _I64, _I64, _INT, _P, _I64, _P, _I64, _P, _I64, _P, _P, _P, _P, _P, _P, _INT, _DBL]
    fn.argtypes += [_INT, _DBL]
    fn.argtypes += [_INT, _P, _P, _P, _INT]
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


def _rule(rule: float | tuple[str, float] | None) -> tuple[int, float]:
    """(code, value) of a vector's rule: None dense, a float τ of the threshold rule, or (name, value)."""
    if rule is None:
        return 0, 0.0
    if isinstance(rule, tuple):
        name, value = rule
        if name not in RULE_CODES:
            raise ValueError(f"the fused kernel has no rule {name!r}; it has {sorted(RULE_CODES)}")
        return RULE_CODES[name], float(value)
    return RULE_CODES["threshold"], float(rule)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [K, N] with contiguous rows (a view when it has them, else a copy)."""
    t = t.detach()
    return t if t.stride(-1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


class FusedFFN:
    """One gated FFN prepared for the fused kernel (float32 or bfloat16 CPU weights, referenced, not copied).

    `gate_t`, `up_t` [h, d] are W_gᵀ and W_uᵀ and `down_t` [d, h] is W_dᵀ, each with contiguous rows
    (any row stride: they may be views of the model's parameters), or all three in the int8 format
    (`int8.Q8`, h and d multiples of 32), with activations and biases in `dtype`. A vector's rule is None
    (dense), τ of the threshold rule, or ("top_k", k) / ("top_p", p) / ("threshold", τ).
    """

    calls = 0
    """Calls of the kernel in this process, all instances together (so that benchmarks can tell it ran)."""

    def __init__(
        self,
        gate_t: torch.Tensor | Q8,
        up_t: torch.Tensor | Q8,
        down_t: torch.Tensor | Q8,
        act: int,
        input_rule: float | tuple[str, float] | None,
        intermediate_rule: float | tuple[str, float] | None,
        biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
        dtype: torch.dtype | None = None,
    ):
        h, d = down_t.shape[1], down_t.shape[0]
        quantized = [isinstance(w, Q8) for w in (gate_t, up_t, down_t)]
        if any(quantized) and not all(quantized):
            raise ValueError("the fused CPU kernel takes all three weights in the int8 format, or none")
        mats = [w.q if isinstance(w, Q8) else w for w in (gate_t, up_t, down_t)]
        dtype = dtype or (torch.float32 if all(quantized) else mats[2].dtype)
        weight_dtype = torch.int8 if all(quantized) else dtype
        tensors = [*(b for b in biases if b is not None)]
        if (
            dtype not in _DTYPES
            or any(t.dtype != dtype or t.device.type != "cpu" for t in tensors)
            or any(w.dtype != weight_dtype or w.device.type != "cpu" for w in mats)
        ):
            raise ValueError("the fused CPU kernel takes float32 or bfloat16 CPU weights of one dtype (or int8 ones)")
        if gate_t.shape != (h, d) or up_t.shape != (h, d):
            raise ValueError(f"gate_t and up_t are {tuple(gate_t.shape)} and {tuple(up_t.shape)}, expected {(h, d)}")
        self.h, self.d, self.dtype = h, d, dtype
        self.weights = tuple(w if isinstance(w, Q8) else _rows(w) for w in (gate_t, up_t, down_t))
        self._biases = [None if b is None else b.detach().contiguous() for b in biases]
        (in_code, in_value), (mid_code, mid_value) = _rule(input_rule), _rule(intermediate_rule)
        g, u, w = (m.q if isinstance(m, Q8) else m for m in self.weights)
        scales = [m.scale.data_ptr() if isinstance(m, Q8) else None for m in self.weights]
        self._args = (
            _DTYPES[dtype],
            g.data_ptr(),
            g.stride(0),
            u.data_ptr(),
            u.stride(0),
            w.data_ptr(),
            w.stride(0),
            *(None if b is None else b.data_ptr() for b in self._biases),
            *scales,
            in_code,
            in_value,
            mid_code,
            mid_value,
            act,
        )
        self.counts = torch.zeros(MAX_BATCH, 2, 3, dtype=torch.long)
        """Per token of the last call, (zeroed, natural zeros, seen) of the input and the intermediate."""
        self.totals = torch.zeros(2, 3, dtype=torch.long)
        """The same counts summed over the tokens of every call made with `accumulate=True`, until reset."""

    def __call__(
        self, x: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False
    ) -> tuple[torch.Tensor, int]:
        """FFN of 1 to `MAX_BATCH` tokens x [..., h] (the weights' dtype): the output and the NaN/Inf flags
        (1 input, 2 intermediate). Written into `out` (contiguous, x's shape) when given. With `accumulate`
        the kernel also adds the call's counts into `totals`."""
        rows = x.shape[:-1].numel()
        if not 1 <= rows <= MAX_BATCH or x.shape[-1] != self.h or x.dtype != self.dtype:
            raise ValueError(
                f"the fused kernel takes 1 to {MAX_BATCH} {self.dtype} tokens of size {self.h}, got {tuple(x.shape)}"
            )
        lib = _library()
        assert lib is not None, "call only when available()"
        x = x.contiguous()
        y = torch.empty(x.shape, dtype=self.dtype) if out is None else out
        if y.shape != x.shape or y.dtype != self.dtype or not y.is_contiguous():
            raise ValueError(f"out must be a contiguous {self.dtype} tensor of shape {tuple(x.shape)}")
        dtype, *rest = self._args
        FusedFFN.calls += 1
        bad = lib.actsparse_sparse_ffn(
            x.data_ptr(),
            rows,
            self.h,
            self.d,
            dtype,
            *rest,
            y.data_ptr(),
            self.counts.data_ptr(),
            self.totals.data_ptr() if accumulate else None,
            torch.get_num_threads(),
        )
        return y, bad
