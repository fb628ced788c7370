"""Fused compiled CPU decode step of a Llama-style attention block (1 to `MAX_BATCH` tokens, float32 or bfloat16).

One C call (built by `cbuild`) does what about 30 PyTorch ops do per layer and decode step in
transformers' Llama, Mistral and Qwen2: the residual sum with the previous FFN's output, RMSNorm, the q, k
and v products (with biases), rotary embedding (cos and sin given, so that every rope scaling of the
model's own `rotary_emb` holds), the write of k and v into a static cache, attention of each query head
over its key-value head's cached positions (grouped-query), the o product, the residual sum and the
post-attention RMSNorm (the FFN's input). At batch 1 these ops are each far shorter than their launch
and bookkeeping, so a decode step in transformers spends more time between kernels than in them.

The products read the nn.Linear weights where they lie ([out, in], contiguous rows), each output row a
dot product in a fixed order, split among the threads by whole rows: the results are bitwise the same at
any thread count. Sums are in float32 (RMSNorm's mean and softmax too); bfloat16 rounds where PyTorch
rounds (after each elementwise op and product). `available()` is False without a C compiler (or with
ACTSPARSE_NO_CKERNEL=1); `actsparse.speed.decoding` then runs the same step with PyTorch ops.
"""

from __future__ import annotations

import ctypes

import torch

from actsparse.speed.kernels import cbuild, cpu_pool, int8
from actsparse.speed.kernels.int8 import Q8

__all__ = ["MAX_BATCH", "AttentionStep", "available", "linear"]

MAX_BATCH = 8

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_SOURCE = (
    cpu_pool.CLIENT
    + cbuild.VECTORS
    + int8.SOURCE
    + r"""
#include <math.h>
#include <stdlib.h>

/* a value as the dtype holds it: float32 unchanged, bfloat16 rounded */
static inline float rnd(float f, int dtype) { return dtype ? bf(to_bf(f)) : f; }
static inline float get(const void *p, int dtype, int64_t i) {
    return dtype ? bf(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void put(void *p, int dtype, int64_t i, float v) {
    if (dtype) ((uint16_t *)p)[i] = to_bf(v);
    else ((float *)p)[i] = v;
}
static inline vf load_row(const void *w, int dtype, int64_t i) {
    if (dtype) {
        vu u = __builtin_convertvector(*(const vh *)((const uint16_t *)w + i), vu) << 16;
        return (vf)u;
    }
    return *(const vf *)((const float *)w + i);
}
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
static inline float hsum(vf v) { /* a fixed tree: 16 -> 8 -> 4 -> 1 */
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
         + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline const void *row_at(const void *w, int dtype, int64_t r, int64_t k) {
    return dtype ? (const void *)((const uint16_t *)w + r * k) : (const void *)((const float *)w + r * k);
}

/* s[0..4) = rows r..r+3 of W [.][k] times x (float32), four rows in one pass over x; each row's sum in a fixed
   order set by k alone (the same as `dot1`'s) */
static inline void dot4(const void *w, int dtype, int64_t r, int64_t k, const float *x, float *s, const void *next) {
    const void *r0 = row_at(w, dtype, r, k), *r1 = row_at(w, dtype, r + 1, k);
    const void *r2 = row_at(w, dtype, r + 2, k), *r3 = row_at(w, dtype, r + 3, k);
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t c = 0, bytes = dtype ? 2 : 4;
    for (; c + VL <= k; c += VL) {
        if (next)
            for (int i = 0; i < 4; i++) __builtin_prefetch((const char *)next + (c * 4 + i * VL) * bytes, 0, 1);
        vf xv = *(const vf *)(x + c);
        a0 += load_row(r0, dtype, c) * xv;
        a1 += load_row(r1, dtype, c) * xv;
        a2 += load_row(r2, dtype, c) * xv;
        a3 += load_row(r3, dtype, c) * xv;
    }
    s[0] = hsum(a0), s[1] = hsum(a1), s[2] = hsum(a2), s[3] = hsum(a3);
    for (; c < k; c++) {
        s[0] += get(r0, dtype, c) * x[c], s[1] += get(r1, dtype, c) * x[c];
        s[2] += get(r2, dtype, c) * x[c], s[3] += get(r3, dtype, c) * x[c];
    }
}
static inline float dot1(const void *w, int dtype, int64_t r, int64_t k, const float *x) {
    const void *row = row_at(w, dtype, r, k);
    vf a = {0};
    int64_t c = 0;
    for (; c + VL <= k; c += VL) a += load_row(row, dtype, c) * *(const vf *)(x + c);
    float s = hsum(a);
    for (; c < k; c++) s += get(row, dtype, c) * x[c];
    return s;
}

/* dot4 and dot1 of int8 rows (`int8.Q8`: k a multiple of QB, scales sc [n][k / QB]): per block of QB the
   products summed in a vector, times the block's scale, added to the row's vector sum */
static inline void dot4_q8(const int8_t *w, const float *sc, int64_t r, int64_t k, const float *x, float *s,
                           const int8_t *next) {
    const int8_t *r0 = w + r * k, *r1 = r0 + k, *r2 = r1 + k, *r3 = r2 + k;
    const float *s0 = sc + r * (k / QB), *s1 = s0 + k / QB, *s2 = s1 + k / QB, *s3 = s2 + k / QB;
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int64_t c = 0, blk = 0; c < k; c += QB, blk++) {
        if (next)
            for (int i = 0; i < 4; i++) __builtin_prefetch(next + i * k + c, 0, 1);
        vf xl = *(const vf *)(x + c), xh = *(const vf *)(x + c + VL);
        a0 += s0[blk] * (load_q8(r0 + c) * xl + load_q8(r0 + c + VL) * xh);
        a1 += s1[blk] * (load_q8(r1 + c) * xl + load_q8(r1 + c + VL) * xh);
        a2 += s2[blk] * (load_q8(r2 + c) * xl + load_q8(r2 + c + VL) * xh);
        a3 += s3[blk] * (load_q8(r3 + c) * xl + load_q8(r3 + c + VL) * xh);
    }
    s[0] = hsum(a0), s[1] = hsum(a1), s[2] = hsum(a2), s[3] = hsum(a3);
}
static inline float dot1_q8(const int8_t *w, const float *sc, int64_t r, int64_t k, const float *x) {
    const int8_t *r0 = w + r * k;
    const float *s0 = sc + r * (k / QB);
    vf a0 = {0};
    for (int64_t c = 0, blk = 0; c < k; c += QB, blk++) {
        vf xl = *(const vf *)(x + c), xh = *(const vf *)(x + c + VL);
        a0 += s0[blk] * (load_q8(r0 + c) * xl + load_q8(r0 + c + VL) * xh);
    }
    return hsum(a0);
}

/* rows [r0, r1) of y [nb][n] = W [n][k] x [nb][k] (+ bias), x in float32, y rounded to the dtype; W in the dtype,
   or int8 with scales sc (NULL: none). Rows go four at a time (the four after them prefetched), so each row's
   sum is the same whichever thread computes it. */
static void gemv_rows(const void *w, const float *sc, const void *bias, int dtype, int64_t k, const float *x, int nb,
                      int64_t n, float *y, int64_t r0, int64_t r1) {
    int64_t r = r0;
    float s[4];
    for (; r + 4 <= r1; r += 4) {
        const void *next = 0;
        if (r + 8 <= r1) next = sc ? (const void *)((const int8_t *)w + (r + 4) * k) : row_at(w, dtype, r + 4, k);
        for (int b = 0; b < nb; b++) {
            if (sc) dot4_q8((const int8_t *)w, sc, r, k, x + b * k, s, b == 0 ? (const int8_t *)next : 0);
            else dot4(w, dtype, r, k, x + b * k, s, b == 0 ? next : 0);
            for (int i = 0; i < 4; i++) {
                float v = s[i];
                if (bias) v = rnd(rnd(v, dtype) + get(bias, dtype, r + i), dtype);
                y[b * n + r + i] = rnd(v, dtype);
            }
        }
    }
    for (; r < r1; r++)
        for (int b = 0; b < nb; b++) {
            float v = sc ? dot1_q8((const int8_t *)w, sc, r, k, x + b * k) : dot1(w, dtype, r, k, x + b * k);
            if (bias) v = rnd(rnd(v, dtype) + get(bias, dtype, r), dtype);
            y[b * n + r] = rnd(v, dtype);
        }
}

/* out [nb][h] (float32, holding dtype values) = RMSNorm(x) with weight w, as transformers computes it. */
static void rms_norm(const float *x, int nb, int64_t h, const void *w, int dtype, double eps, float *out) {
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * h;
        float ss = 0.0f;
        for (int64_t c = 0; c < h; c++) ss += xb[c] * xb[c];
        float r = 1.0f / sqrtf(ss / (float)h + (float)eps);
        for (int64_t c = 0; c < h; c++) out[b * h + c] = rnd(get(w, dtype, c) * rnd(xb[c] * r, dtype), dtype);
    }
}

typedef struct {
    int nb, dtype, nh, nkv, hd;
    int64_t h, max_len, pos;
    const void *wq, *wk, *wv, *wo, *bq, *bk, *bv, *bo;
    const float *sq, *sk, *sv, *so; /* the scales of int8 weights (NULL: weights in the dtype) */
    const void *cos, *sin;
    void *kc, *vc;
    float scale;
    float *x, *q, *k, *v, *att, *o;
    spin_barrier_t barrier;
} job_t;

static void split(int64_t n, int t, int nt, int64_t *a, int64_t *b) {
    *a = n * t / nt;
    *b = n * (t + 1) / nt;
}

static void qkv_part(const job_t *j, int t, int nt) {
    int64_t nq = (int64_t)j->nh * j->hd, nk = (int64_t)j->nkv * j->hd, a, b;
    split(nq + 2 * nk, t, nt, &a, &b);
    if (a < nq) gemv_rows(j->wq, j->sq, j->bq, j->dtype, j->h, j->x, j->nb, nq, j->q, a, b < nq ? b : nq);
    int64_t ka = a > nq ? a - nq : 0, kb = b - nq < nk ? b - nq : nk;
    if (kb > ka) gemv_rows(j->wk, j->sk, j->bk, j->dtype, j->h, j->x, j->nb, nk, j->k, ka, kb);
    int64_t va = a > nq + nk ? a - nq - nk : 0, vb = b - nq - nk;
    if (vb > va) gemv_rows(j->wv, j->sv, j->bv, j->dtype, j->h, j->x, j->nb, nk, j->v, va, vb);
}

/* q [nb][nh][hd] and k [nb][nkv][hd] rotated in place: x cos + rotate_half(x) sin (cos, sin [nb][hd]). */
static void rope(float *x, int nb, int heads, int hd, const void *cos, const void *sin, int dtype) {
    int half = hd / 2;
    float tmp[1024];
    for (int b = 0; b < nb; b++)
        for (int hh = 0; hh < heads; hh++) {
            float *v = x + ((int64_t)b * heads + hh) * hd;
            for (int i = 0; i < hd; i++) {
                float rot = i < half ? rnd(-v[i + half], dtype) : v[i - half];
                float c = get(cos, dtype, (int64_t)b * hd + i), s = get(sin, dtype, (int64_t)b * hd + i);
                tmp[i] = rnd(rnd(v[i] * c, dtype) + rnd(rot * s, dtype), dtype);
            }
            memcpy(v, tmp, (size_t)hd * sizeof(float));
        }
}

static void attend_part(const job_t *j, int t, int nt) {
    int64_t a, b, len = j->pos + 1;
    split((int64_t)j->nb * j->nh, t, nt, &a, &b);
    int group = j->nh / j->nkv;
    float *p = (float *)malloc((size_t)len * sizeof(float));
    for (int64_t bh = a; bh < b; bh++) {
        int bb = (int)(bh / j->nh), hh = (int)(bh % j->nh), kv = hh / group;
        const float *q = j->q + bh * j->hd;
        int64_t base = ((int64_t)bb * j->nkv + kv) * j->max_len * j->hd;
        float m = -INFINITY;
        for (int64_t s = 0; s < len; s++) {
            float d = 0.0f;
            for (int i = 0; i < j->hd; i++) d += q[i] * get(j->kc, j->dtype, base + s * j->hd + i);
            p[s] = d * j->scale;
            m = p[s] > m ? p[s] : m;
        }
        float z = 0.0f;
        for (int64_t s = 0; s < len; s++) z += (p[s] = expf(p[s] - m));
        float *out = j->att + bh * j->hd;
        for (int i = 0; i < j->hd; i++) out[i] = 0.0f;
        for (int64_t s = 0; s < len; s++) {
            float w = p[s] / z;
            for (int i = 0; i < j->hd; i++) out[i] += w * get(j->vc, j->dtype, base + s * j->hd + i);
        }
        for (int i = 0; i < j->hd; i++) out[i] = rnd(out[i], j->dtype);
    }
    free(p);
}

static void o_part(const job_t *j, int t, int nt) {
    int64_t a, b;
    split(j->h, t, nt, &a, &b);
    gemv_rows(j->wo, j->so, j->bo, j->dtype, (int64_t)j->nh * j->hd, j->att, j->nb, j->h, j->o, a, b);
}

/* The cache write of k and v at position pos: cache [nb][nkv][max_len][hd] in the dtype. */
static void write_cache(const job_t *j) {
    for (int b = 0; b < j->nb; b++)
        for (int kv = 0; kv < j->nkv; kv++) {
            int64_t at = (((int64_t)b * j->nkv + kv) * j->max_len + j->pos) * j->hd;
            const float *k = j->k + ((int64_t)b * j->nkv + kv) * j->hd, *v = j->v + ((int64_t)b * j->nkv + kv) * j->hd;
            for (int i = 0; i < j->hd; i++) {
                put(j->kc, j->dtype, at + i, k[i]);
                put(j->vc, j->dtype, at + i, v[i]);
            }
        }
}

/* Thread t of nt: its rows of q, k and v; (thread 0) rotary embedding and the cache write; its heads'
   attention; its rows of o. */
static void attention_task(void *arg, int t, int nt) {
    job_t *job = (job_t *)arg;
    qkv_part(job, t, nt);
    spin_barrier(&job->barrier, nt);
    if (t == 0) {
        rope(job->q, job->nb, job->nh, job->hd, job->cos, job->sin, job->dtype);
        rope(job->k, job->nb, job->nkv, job->hd, job->cos, job->sin, job->dtype);
        write_cache(job);
    }
    spin_barrier(&job->barrier, nt);
    attend_part(job, t, nt);
    spin_barrier(&job->barrier, nt);
    o_part(job, t, nt);
}

typedef struct {
    const void *w, *bias;
    const float *sc;
    int dtype, nb;
    int64_t k, n;
    const float *x;
    float *y;
} linear_t;

static void linear_task(void *arg, int t, int nt) {
    linear_t *a = (linear_t *)arg;
    int64_t blocks = (a->n + 3) / 4, r0 = blocks * t / nt * 4, r1 = blocks * (t + 1) / nt * 4;
    gemv_rows(a->w, a->sc, a->bias, a->dtype, a->k, a->x, a->nb, a->n, a->y, r0, r1 < a->n ? r1 : a->n);
}

/* y [nb][n] = x [nb][k] W [n][k]^T (+ bias), in the dtype (an LM head: one pass over W for the batch); W int8
   with scales sc when sc is not NULL. */
void actsparse_linear(const void *x, int nb, int64_t k, int64_t n, int dtype, const void *w, const float *sc,
                      const void *bias, void *y, int nthreads) {
    float *xf = (float *)malloc((size_t)(nb * k) * sizeof(float));
    float *yf = (float *)malloc((size_t)(nb * n) * sizeof(float));
    for (int64_t i = 0; i < nb * k; i++) xf[i] = get(x, dtype, i);
    linear_t task = {w, bias, sc, dtype, nb, k, n, xf, yf};
    parallel(linear_task, &task, nthreads);
    for (int64_t i = 0; i < nb * n; i++) put(y, dtype, i, yf[i]);
    free(xf);
    free(yf);
}

/* One decode step of a Llama-style attention block for nb tokens at position pos, in place of
       h = h + add;  x = rms1(h);  h_out = h + o(attention(rope(q(x)), cache ∪ rope(k(x)), cache ∪ v(x)));
       normed = rms2(h_out)
   h, add (NULL: none), h_out, normed [nb][hidden]; weights [out][in] contiguous; biases may be NULL;
   cos, sin [nb][hd]; caches [nb][nkv][max_len][hd]. All in the dtype (0 float32, 1 bfloat16), but for the
   weights with scales (sq, sk, sv, so not NULL), int8. Returns 1 if h_out holds NaN or Inf. */
int actsparse_attention_step(int nb, int dtype, int64_t hidden, int nh, int nkv, int hd, const void *h,
                             const void *add, void *h_out, void *normed, const void *ln1, const void *ln2,
                             double eps1, double eps2, const void *wq, const void *wk, const void *wv,
                             const void *wo, const void *bq, const void *bk, const void *bv, const void *bo,
                             const float *sq, const float *sk, const float *sv, const float *so, const void *cos,
                             const void *sin, void *kc, void *vc, int64_t max_len, int64_t pos, double scale,
                             int nthreads) {
    int64_t nq = (int64_t)nh * hd, nk = (int64_t)nkv * hd;
    float *buf = (float *)malloc((size_t)(nb * (4 * hidden + 2 * nq + 2 * nk)) * sizeof(float));
    float *res = buf, *x = res + nb * hidden, *q = x + nb * hidden, *k = q + nb * nq, *v = k + nb * nk;
    float *att = v + nb * nk, *o = att + nb * nq, *tmp = o + nb * hidden;
    job_t job = {nb, dtype, nh, nkv, hd, hidden, max_len, pos, wq, wk, wv, wo, bq, bk, bv, bo, sq, sk,
                 sv, so, cos, sin, kc, vc, (float)scale, x, q, k, v, att, o};
    for (int64_t i = 0; i < nb * hidden; i++)
        res[i] = add ? rnd(get(h, dtype, i) + get(add, dtype, i), dtype) : get(h, dtype, i);
    rms_norm(res, nb, hidden, ln1, dtype, eps1, x);
    job.barrier = (spin_barrier_t){0, 0};
    parallel(attention_task, &job, nthreads);
    int bad = 0;
    for (int64_t i = 0; i < nb * hidden; i++) {
        tmp[i] = rnd(res[i] + o[i], dtype);
        bad |= !isfinite(tmp[i]);
        put(h_out, dtype, i, tmp[i]);
    }
    rms_norm(tmp, nb, hidden, ln2, dtype, eps2, x);
    for (int64_t i = 0; i < nb * hidden; i++) put(normed, dtype, i, x[i]);
    free(buf);
    return bad;
}
"""
)

_P, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double


def _declare(lib: ctypes.CDLL) -> None:
    cpu_pool.attach(lib)
    fn = lib.actsparse_attention_step
    fn.argtypes = [_INT, _INT, _I64, _INT, _INT, _INT] + [_P] * 6 + [_DBL, _DBL] + [_P] * 16
    fn.argtypes += [_I64, _I64, _DBL, _INT]
    fn.restype = _INT
    lib.actsparse_linear.argtypes = [_P, _INT, _I64, _I64, _INT, _P, _P, _P, _P, _INT]
    lib.actsparse_linear.restype = None


def _library() -> ctypes.CDLL | None:
    return cbuild.load("attention_step", _SOURCE, _declare)


def available() -> bool:
    """Whether the fused attention kernel could be built (or was found in the cache) on this machine."""
    return _library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class AttentionStep:
    """One layer's attention block prepared for the fused kernel: its weights referenced, not copied.

    `weights` are q, k, v, o as [out, in] contiguous tensors of one dtype (float32 or bfloat16) on the CPU,
    or all four in the int8 format (`int8.Q8`, blocks along `in`), `biases` the same four or None, `norms`
    the input and post-attention RMSNorm weights and epsilons (their dtype is the activations').
    """

    calls = 0
    """Calls of the kernel in this process (so that benchmarks can tell it ran)."""

    def __init__(
        self,
        weights: tuple[torch.Tensor | Q8, torch.Tensor | Q8, torch.Tensor | Q8, torch.Tensor | Q8],
        biases: tuple[torch.Tensor | None, ...],
        norms: tuple[torch.Tensor, float, torch.Tensor, float],
        heads: int,
        kv_heads: int,
        head_dim: int,
        scale: float,
    ):
        wq, wk, wv, wo = weights
        dtype = norms[0].dtype
        quantized = all(isinstance(w, Q8) for w in weights)
        mats = [w.q if isinstance(w, Q8) else w for w in weights]
        if not quantized and any(isinstance(w, Q8) for w in weights):
            raise ValueError("the fused attention kernel takes all four weights in the int8 format, or none")
        tensors = [*(b for b in biases if b is not None), norms[0], norms[2]]
        tensors += [] if quantized else mats
        if dtype not in _DTYPES or any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
            raise ValueError("the fused attention kernel takes float32 or bfloat16 CPU weights of one dtype")
        if any(not t.is_contiguous() for t in [*tensors, *mats]):
            raise ValueError("the fused attention kernel reads contiguous weights")
        hidden = wq.shape[1]
        shapes = [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden)]
        if [tuple(w.shape) for w in (wq, wk, wv)] != shapes or tuple(wo.shape) != (hidden, heads * head_dim):
            raise ValueError("q, k, v, o weights do not match the heads and head size")
        if heads % kv_heads or head_dim % 2 or head_dim > 1024:
            raise ValueError(f"{heads} heads over {kv_heads} key-value heads of size {head_dim}: not supported")
        self._keep = (tensors, weights)  # the pointers below stay valid while this object lives
        ln1, eps1, ln2, eps2 = norms
        self._head = (_DTYPES[dtype], hidden, heads, kv_heads, head_dim)
        self._norms = (ln1.data_ptr(), ln2.data_ptr(), float(eps1), float(eps2))
        scales = tuple(w.scale.data_ptr() if isinstance(w, Q8) else None for w in weights)
        self._weights = tuple(m.data_ptr() for m in mats) + tuple(_ptr(b) for b in biases) + scales
        self._scale = float(scale)

    def __call__(
        self,
        h: torch.Tensor,
        add: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        pos: int,
        out: tuple[torch.Tensor, torch.Tensor],
    ) -> bool:
        """Write (h + add + attention, its post-attention RMSNorm) for tokens h [nb, hidden] into `out`, k and v
        into `cache` at `pos`; returns whether the new residual stream holds NaN or Inf. Every tensor is
        contiguous in the weights' dtype; `cos`, `sin` [nb, head_dim], each cache [nb, kv_heads, max_len, head_dim]."""
        lib = _library()
        assert lib is not None, "call only when available()"
        nb = h.shape[0]
        keys, values = cache
        if not 1 <= nb <= MAX_BATCH or not 0 <= pos < keys.shape[2]:
            raise ValueError(f"1 to {MAX_BATCH} tokens at a position below {keys.shape[2]}, got {nb} at {pos}")
        AttentionStep.calls += 1
        h_out, normed = out
        bad = lib.actsparse_attention_step(
            nb,
            *self._head,
            h.data_ptr(),
            _ptr(add),
            h_out.data_ptr(),
            normed.data_ptr(),
            *self._norms,
            *self._weights,
            cos.data_ptr(),
            sin.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            keys.shape[2],
            pos,
            self._scale,
            torch.get_num_threads(),
        )
        return bool(bad)


def linear(x: torch.Tensor, weight: torch.Tensor | Q8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for 1 to `MAX_BATCH` decode tokens x [..., k] on a CPU float32 or bfloat16 weight [n, k]
    (contiguous), or one in the int8 format: one pass over the weight on the kernels' threads (an LM head)."""
    lib = _library()
    assert lib is not None, "call only when available()"
    rows = x.shape[:-1].numel()
    scales = weight.scale.data_ptr() if isinstance(weight, Q8) else None
    mat = weight.q if isinstance(weight, Q8) else weight
    if not 1 <= rows <= MAX_BATCH or x.dtype not in _DTYPES or (scales is None and x.dtype != mat.dtype):
        raise ValueError(f"1 to {MAX_BATCH} tokens of the weight's dtype (float32 or bfloat16), got {tuple(x.shape)}")
    if not mat.is_contiguous() or x.shape[-1] != mat.shape[1] or mat.device.type != "cpu":
        raise ValueError("a contiguous CPU weight [n, k] for tokens of size k")
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    lib.actsparse_linear(
        x.data_ptr(),
        rows,
        weight.shape[1],
        weight.shape[0],
        _DTYPES[x.dtype],
        mat.data_ptr(),
        scales,
        _ptr(bias),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y
