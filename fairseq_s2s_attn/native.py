"""The element-wise halves of the LSTM and GRU cells, the fused loss's rows, dropout, the
additive attention score, and decoding's log-softmax and beam candidates, as single C loops on
CPU.

A decoder that loops over the target steps (``decoder.StackedCell``) runs its cell's
element-wise half at every step: from the two gate pre-activations (B x 4H for an LSTM), eager
torch makes the LSTM's new state in nine passes over memory (add, three sigmoids, two tanhs,
three products, a sum) and autograd's backward in more than twenty. Here each direction is one
loop over the B x H units (``lstm_forward``/``lstm_backward``, ``gru_forward``/``gru_backward``
in the C source below): it reads the gates once, keeps the activations in fp32 for backward and
writes only the outputs. One thread of an Intel Xeon with AMX, B 104, H 256, fp32: forward and
backward 91 against 423 us eager (B 56: 45 against 260 us).

The fused loss (``criterion._loss_and_gradient``) makes, per row of the N x V logits, the log of
its exponentials' sum, its sum (label smoothing) and the gradient written over it; eagerly ten
passes over a chunk of rows in an fp32 buffer (copy in, max, sum, shift, exp, sum, scale,
constant, target, copy out). ``loss_rows`` reads each row three times while it is in the cache
(max and sum; exp into a row of fp32 scratch and its sum; the gradient): 2,048 x 5,992 bf16
logits 5.4 against 11.1 ms, fp32 5.1 against 8.9 ms (one thread of the AMX Xeon).

Dropout (``dropout.cpu_dropout``, at every dropout site of a training update: twice per target
step of the step-loop decoders) took torch's ``random_`` for 16 bits per element, a comparison
into a bool mask kept for backward and two products each way. ``dropout`` makes the bits in the
loop that applies them, from a counter-based generator (SplitMix64 of the element's word index,
seeded by one 64-bit draw of torch's default generator per call), and backward makes the same
mask again from the seed: nothing of x's size is kept. One thread of an AMD EPYC (Zen 4),
forward and backward of 104 x 256 fp32: 92 against 208 us (forward 17 against 105 us); 2,000 x
256: 0.53 against 2.08 ms. The masks are other masks than the eager path's for the same seed,
with the same statistics (P(drop) = round(p 2^16) / 2^16, each lane independent).

The additive score (``attention.AdditiveScore``, Bahdanau's and Luong's concat, with or
without coverage) makes e = v^T tanh(q + k [+ cov w_c]) over B x S x A values per decoder step,
in fp32 on a CPU (``attention.for_elementwise``); its forward and backward ran as loops compiled
by inductor (``fused.py``) in training and as eager passes in decoding. ``additive_score`` and
``additive_score_grads`` are one loop each over the query rows and their key rows, for a step
(q B x 1 x A, k B x S x A) and for G queries per sentence (beam search's hypotheses, q B x G x 1
x A, k B x 1 x S x A), never writing the B x [G x] S x A values; their sigmoid takes an inline
exp (``exp_inline``: range reduction, a degree-7 polynomial, within 1 ulp of the correctly
rounded exp over [-87, 87], where the argument is clamped) that vectorises with the loop, where
libmvec's expf is a call per vector. One thread of an AMD EPYC (Zen 4), B 100, S 20, A 256,
forward and backward 711 against 1,061 us (inductor; eager 1,483), the forward alone 257
against 345 (eager 424); with coverage 844 against 1,146.

Two loops serve decoding. ``log_softmax`` makes the fp32 log-probabilities of each row of the
logits (``decoder.RNNDecoder.get_normalized_probs`` outside autograd: every step of beam search)
in three passes over the row, reading bf16 logits as they are, where fairseq casts them to fp32
and runs torch's row kernel: 80 x 5,992 bf16 logits (batch 16, beam 5) 195 against 330 us, one
thread of an AMD EPYC (Zen 4). ``beam_topk`` takes beam search's candidates (``search.py``, for
fairseq's ``BeamSearch.step``): the k best of log-probabilities plus each hypothesis's score per
sentence, in one pass, 16 values at a time against the k-th best so far, instead of an addition
over all of them, ``torch.topk`` and two index operations: fairseq's step 119-126 against 640 us
at batch 16, beam 5 and 5,992 words (37 against 144 us at beam 1; 23 against 80 at batch 1, beam
5). Ties go to the lower index, whose order torch.topk leaves open; a NaN leaves the step to it.

The loop computes in fp32 whatever its inputs (fp32 or bf16) and rounds each output once; the
eager path rounds bf16 after every operation. In fp32 both agree to a few ulp (the C library's
vectorised expf/tanhf against torch's). The activations kept for backward are fp32 in both
cases: B x 5H floats a step for an LSTM (s(i), s(f), tanh(g), s(o), tanh(c')), B x 4H for a GRU.

The source is compiled at the first call by the system's C compiler (``CC``, else ``cc``) for
this CPU (``-march=native``) into a cache directory (``$XDG_CACHE_HOME/fairseq_s2s_attn``, else
``~/.cache/fairseq_s2s_attn``; the name holds a hash of the source, the flags, the compiler's
version and the CPU's flags) and loaded with ctypes; later processes load it from there. expf
and tanhf run as glibc's vector functions (libmvec, declared as <math.h> declares them under
-ffast-math); the loops keep IEEE semantics otherwise. Not -ffast-math itself: besides
finite-only arithmetic (sigmoid(-120) came out NaN), linking with it adds GCC's crtfastmath.o,
which switches the whole process to flush denormals to zero at load time. If compilation or
loading fails (no compiler, no libmvec, another platform), one warning line says so and the
eager operations run from then on; ``S2S_NATIVE=0`` in the environment keeps them from the
start.

Used for CPU tensors of fp32 or bf16 (the score: fp32) whose rows are contiguous, in training
(autograd) and in decoding (no activations kept); not under torch.compile's tracing (``--compile-step`` traces the
eager formulas), not for other dtypes (tests' fp64 references) or devices (CUDA has its own fused
cells, ``decoder.FUSED_LSTM_CELL``). The backward is not itself differentiable (double backward
raises, as for torch's own fused cells).
"""

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

# tests and scripts/train_ab.py set it to False for the eager path
ENABLED = os.environ.get("S2S_NATIVE", "1") != "0"
# the cells alone (``usable``), the fused loss's rows alone (``loss_rows_usable``), dropout
# alone (``dropout_usable``) and the additive score alone (``score_usable``): scripts/train_ab.py's
# levers "cells", "lossrows", "dropmask" and "scoreloop" (ENABLED switches all four)
CELLS = True
LOSS_ROWS = True
DROPOUT = True
SCORE = True
# decoding: the log-softmax of the logits (``log_softmax_usable``) and beam search's candidates
# (``topk_usable``): scripts/beam_ab.py's levers "logsoftmax" and "topk"
LOG_SOFTMAX = True
TOPK = True

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
/* glibc's vector expf and tanhf (libmvec), as <math.h> declares them under -ffast-math */
__attribute__((__simd__("notinbranch"))) extern float expf(float);
__attribute__((__simd__("notinbranch"))) extern float tanhf(float);
#endif

typedef uint16_t bf16;
static inline float from_bf16(bf16 x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
/* round to nearest even, as torch does; NaN stays NaN (quiet) */
static inline bf16 to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x40u;
    return (bf16)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}
static inline float from_f32(float x) { return x; }
static inline float to_f32(float x) { return x; }
static inline float sigm(float x) { return 1.f / (1.f + expf(-x)); }
/* exp(x) for |x| <= 87 (callers clamp), inline so that it vectorises with its caller: x =
   n ln 2 + r, |r| <= ln(2) / 2, exp(r) by its Taylor polynomial of degree 7 (relative error
   < 2e-9 on that interval, under fp32 rounding), times 2^n through the exponent bits (n within
   [-126, 126]: normal numbers only). Within 1 ulp of the correctly rounded exp on [-87, 87]
   (20M points checked against exp in double). A NaN argument gives NaN. */
static inline float exp_inline(float x) {
    /* n = round(x / ln 2) by adding and subtracting 1.5 * 2^23 (round to nearest even) */
    float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
    float r = __builtin_fmaf(n, -0.693145751953125f, x);  /* ln 2 in two parts: exact n hi */
    r = __builtin_fmaf(n, -1.428606765330187e-06f, r);
    float p = 1.f / 5040.f;
    p = __builtin_fmaf(p, r, 1.f / 720.f); p = __builtin_fmaf(p, r, 1.f / 120.f);
    p = __builtin_fmaf(p, r, 1.f / 24.f); p = __builtin_fmaf(p, r, 1.f / 6.f);
    p = __builtin_fmaf(p, r, 0.5f); p = __builtin_fmaf(p, r, 1.f); p = __builtin_fmaf(p, r, 1.f);
    int32_t bits = ((int32_t)n + 127) << 23; float scale; memcpy(&scale, &bits, 4);
    return p * scale;
}
/* sigmoid with exp_inline: x clamped to [-87, 87], where sigmoid is 1 or below 2e-38 */
static inline float sigm_inline(float x) {
    x = x < -87.f ? -87.f : (x > 87.f ? 87.f : x);
    return 1.f / (1.f + exp_inline(-x));
}

/* LSTM, PyTorch's gate order i, f, g, o (rows of ig/hg: ldi/ldh elements apart):
     c' = s(f) c + s(i) tanh(g),  h' = s(o) tanh(c')
   act (B x 5H floats: s(i) s(f) tanh(g) s(o) tanh(c')) is written unless it is NULL. */
#define LSTM(T, LOAD, STORE)                                                                   \
void lstm_forward_##T(long B, long H, const T* ig, long ldi, const T* hg, long ldh,             \
                      const T* c, T* h, T* cn, float* act) {                                   \
    for (long b = 0; b < B; b++) {                                                             \
        const T* x = ig + b * ldi; const T* y = hg + b * ldh; const T* cb = c + b * H;         \
        T* hb = h + b * H; T* nb = cn + b * H; float* a = act ? act + b * 5 * H : 0;           \
        _Pragma("omp simd")                                                                    \
        for (long j = 0; j < H; j++) {                                                         \
            float i = sigm(LOAD(x[j]) + LOAD(y[j]));                                           \
            float f = sigm(LOAD(x[H + j]) + LOAD(y[H + j]));                                   \
            float g = tanhf(LOAD(x[2 * H + j]) + LOAD(y[2 * H + j]));                          \
            float o = sigm(LOAD(x[3 * H + j]) + LOAD(y[3 * H + j]));                           \
            float cc = f * LOAD(cb[j]) + i * g, t = tanhf(cc);                                 \
            nb[j] = STORE(cc); hb[j] = STORE(o * t);                                           \
            if (a) { a[j] = i; a[H + j] = f; a[2 * H + j] = g; a[3 * H + j] = o; a[4 * H + j] = t; } \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
/* gh, gc: the gradients of h' and c' (either NULL: zero); c: the previous cell state;         \
   gg: B x 4H, the gradient of both gate pre-activations; gcp: B x H, that of c */             \
void lstm_backward_##T(long B, long H, const T* gh, const T* gc, const float* act, const T* c,  \
                       T* gg, T* gcp) {                                                        \
    for (long b = 0; b < B; b++) {                                                             \
        const float* a = act + b * 5 * H; const T* cb = c + b * H;                             \
        T* d = gg + b * 4 * H; T* dp = gcp + b * H;                                            \
        const T* ghb = gh ? gh + b * H : 0; const T* gcb = gc ? gc + b * H : 0;                \
        _Pragma("omp simd")                                                                    \
        for (long j = 0; j < H; j++) {                                                         \
            float i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j], t = a[4 * H + j]; \
            float dh = ghb ? LOAD(ghb[j]) : 0.f;                                               \
            float dc = (gcb ? LOAD(gcb[j]) : 0.f) + dh * o * (1.f - t * t);                    \
            d[j] = STORE(dc * g * i * (1.f - i));                                              \
            d[H + j] = STORE(dc * LOAD(cb[j]) * f * (1.f - f));                                \
            d[2 * H + j] = STORE(dc * i * (1.f - g * g));                                      \
            d[3 * H + j] = STORE(dh * t * o * (1.f - o));                                      \
            dp[j] = STORE(dc * f);                                                             \
        }                                                                                      \
    }                                                                                          \
}

/* GRU, PyTorch's order r, z, n:
     r = s(i_r + h_r), z = s(i_z + h_z), n = tanh(i_n + r h_n), h' = n + z (h - n)
   act (B x 4H floats: r z n h_n) is written unless it is NULL. */
#define GRU(T, LOAD, STORE)                                                                    \
void gru_forward_##T(long B, long H, const T* ig, long ldi, const T* hg, long ldh,              \
                     const T* h, T* out, float* act) {                                         \
    for (long b = 0; b < B; b++) {                                                             \
        const T* x = ig + b * ldi; const T* y = hg + b * ldh; const T* hb = h + b * H;         \
        T* ob = out + b * H; float* a = act ? act + b * 4 * H : 0;                             \
        _Pragma("omp simd")                                                                    \
        for (long j = 0; j < H; j++) {                                                         \
            float r = sigm(LOAD(x[j]) + LOAD(y[j]));                                           \
            float z = sigm(LOAD(x[H + j]) + LOAD(y[H + j]));                                   \
            float hn = LOAD(y[2 * H + j]), n = tanhf(LOAD(x[2 * H + j]) + r * hn);             \
            ob[j] = STORE(n + z * (LOAD(hb[j]) - n));                                          \
            if (a) { a[j] = r; a[H + j] = z; a[2 * H + j] = n; a[3 * H + j] = hn; }            \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
/* gout: the gradient of h'; h: the previous state; gi, gh: B x 3H, the gradients of the       \
   input and recurrent gate pre-activations; ghp: B x H, that of h */                          \
void gru_backward_##T(long B, long H, const T* gout, const float* act, const T* h,              \
                      T* gi, T* gh, T* ghp) {                                                  \
    for (long b = 0; b < B; b++) {                                                             \
        const float* a = act + b * 4 * H; const T* go = gout + b * H; const T* hb = h + b * H; \
        T* di = gi + b * 3 * H; T* dh = gh + b * 3 * H; T* dp = ghp + b * H;                   \
        _Pragma("omp simd")                                                                    \
        for (long j = 0; j < H; j++) {                                                         \
            float r = a[j], z = a[H + j], n = a[2 * H + j], hn = a[3 * H + j];                 \
            float d = LOAD(go[j]);                                                             \
            float dn = d * (1.f - z) * (1.f - n * n);                                          \
            float dr = dn * hn * r * (1.f - r), dz = d * (LOAD(hb[j]) - n) * z * (1.f - z);    \
            di[j] = STORE(dr); di[H + j] = STORE(dz); di[2 * H + j] = STORE(dn);               \
            dh[j] = STORE(dr); dh[H + j] = STORE(dz); dh[2 * H + j] = STORE(dn * r);           \
            dp[j] = STORE(d * z);                                                              \
        }                                                                                      \
    }                                                                                          \
}

/* The fused loss's rows (criterion._loss_and_gradient): for each row z of the N x V logits
   (rows V apart), lse = log sum_j exp z_j and (total != NULL) total = sum_j z_j, in fp32; then
   z is overwritten by its gradient scale p - c_smooth - c_nll onehot(target), p = softmax(z),
   one rounding to T per value. e: V floats of scratch (the row's exp, reused). */
#define LOSS(T, LOAD, STORE)                                                                   \
void loss_rows_##T(long N, long V, T* logits, const int64_t* target, float scale,              \
                   float c_smooth, float c_nll, float* lse, float* total, float* e) {          \
    for (long r = 0; r < N; r++) {                                                             \
        T* z = logits + r * V;                                                                 \
        float m = -INFINITY, t = 0.f, s = 0.f;                                                 \
        _Pragma("omp simd reduction(max:m) reduction(+:t)")                                    \
        for (long j = 0; j < V; j++) { float v = LOAD(z[j]); m = v > m ? v : m; t += v; }     \
        _Pragma("omp simd reduction(+:s)")                                                     \
        for (long j = 0; j < V; j++) { e[j] = expf(LOAD(z[j]) - m); s += e[j]; }              \
        lse[r] = m + logf(s);                                                                  \
        if (total) total[r] = t;                                                               \
        float f = scale * (1.f / s);                                                           \
        float at_target = e[target[r]] * f - c_smooth - c_nll;                                 \
        _Pragma("omp simd")                                                                    \
        for (long j = 0; j < V; j++) z[j] = STORE(e[j] * f - c_smooth);                        \
        z[target[r]] = STORE(at_target);                                                       \
    }                                                                                          \
}

/* Dropout (dropout.cpu_dropout): y = x keep scale, one rounding. Element i is kept when 16
   random bits, read as an int16, are >= thr; its bits are lane i % 4 (bits 16 (i % 4) up) of the
   64-bit word w = i / 4, mix64(seed + (w + 1) gamma): SplitMix64's output for counter w + 1
   (Steele, Lea & Flood 2014), a function of (seed, i) alone, so that backward makes the same
   mask again from the seed instead of keeping it. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static inline float kept(uint64_t r, int k, long thr) { return (int16_t)(r >> (16 * k)) >= thr ? 1.f : 0.f; }
#define DROPOUT(T, LOAD, STORE)                                                                \
void dropout_##T(long n, const T* x, T* y, uint64_t seed, long thr, float scale) {             \
    const uint64_t gamma = 0x9e3779b97f4a7c15ULL;                                              \
    long words = n / 4;                                                                        \
    _Pragma("omp simd")                                                                        \
    for (long w = 0; w < words; w++) {                                                         \
        uint64_t r = mix64(seed + (uint64_t)(w + 1) * gamma);                                  \
        for (int k = 0; k < 4; k++)                                                            \
            y[4 * w + k] = STORE(LOAD(x[4 * w + k]) * kept(r, k, thr) * scale);                \
    }                                                                                          \
    if (4 * words < n) {                                                                       \
        uint64_t r = mix64(seed + (uint64_t)(words + 1) * gamma);                              \
        for (long i = 4 * words; i < n; i++)                                                   \
            y[i] = STORE(LOAD(x[i]) * kept(r, (int)(i - 4 * words), thr) * scale);             \
    }                                                                                          \
}

/* The additive score (attention.AdditiveScore; Bahdanau et al. eq. (6), Tu et al.'s coverage
   term), fp32: R query rows q (R x A), keys k (K x S x A, K = R / G: query row r is scored
   against key block r / G, so G are beam search's hypotheses of one sentence or a sentence's
   target steps), coverage cov (R x S, or NULL) with w_c (A):
     e[r][s] = sum_a 2 v_a (sigmoid(2 q_ra + 2 (k_bsa + cov_rs w_ca)) - 1/2) = v^T tanh(...)
   as attention._additive_scores computes it. One pass over each key row per query row; the
   B x S x A values are never written. */
#define SCORE_TERM(KEY) 2.f * v[a] * (sigm_inline(2.f * qr[a] + 2.f * (KEY)) - 0.5f)
void score_forward_float(long R, long G, long S, long A, const float* q, const float* k,
                   const float* v, const float* cov, const float* wc, float* e) {
    for (long r = 0; r < R; r++) {
        const float* qr = q + r * A; const float* kb = k + (r / G) * S * A;
        for (long s = 0; s < S; s++) {
            const float* ks = kb + s * A; float acc = 0.f;
            if (cov) {
                float c = cov[r * S + s];
                _Pragma("omp simd reduction(+:acc)")
                for (long a = 0; a < A; a++) acc += SCORE_TERM(ks[a] + c * wc[a]);
            } else {
                _Pragma("omp simd reduction(+:acc)")
                for (long a = 0; a < A; a++) acc += SCORE_TERM(ks[a]);
            }
            e[r * S + s] = acc;
        }
    }
}
/* Its gradients for the upstream gradient ge (R x S), from s = sigmoid(2 (q + k')) made again
   (k' = k + cov w_c): tanh = 2 s - 1, d e / d (q + k') = 4 v s (1 - s). gq: R x A; gk: K x S x A
   (summed over a key block's G query rows); gv: A; with cov, gcov: R x S and gw: A. */
#define SCORE_GRAD(KEY, COV)                                                                   \
    for (long a = 0; a < A; a++) {                                                             \
        float sg = sigm_inline(2.f * qr[a] + 2.f * (KEY));                                     \
        float d = g * 4.f * v[a] * sg * (1.f - sg);                                            \
        gv[a] += g * (2.f * sg - 1.f); gqr[a] += d;                                            \
        gks[a] = first ? d : gks[a] + d;                                                       \
        COV                                                                                    \
    }
void score_backward_float(long R, long G, long S, long A, const float* q, const float* k,
                    const float* v, const float* cov, const float* wc, const float* ge,
                    float* gq, float* gk, float* gv, float* gcov, float* gw) {
    memset(gv, 0, A * sizeof(float));
    if (cov) memset(gw, 0, A * sizeof(float));
    memset(gq, 0, R * A * sizeof(float));
    for (long r = 0; r < R; r++) {
        const float* qr = q + r * A; float* gqr = gq + r * A; int first = r % G == 0;
        for (long s = 0; s < S; s++) {
            const float* ks = k + ((r / G) * S + s) * A; float* gks = gk + ((r / G) * S + s) * A;
            float g = ge[r * S + s];
            if (cov) {
                float c = cov[r * S + s], dc = 0.f;
                _Pragma("omp simd reduction(+:dc)")
                SCORE_GRAD(ks[a] + c * wc[a], dc += d * wc[a]; gw[a] += d * c;)
                gcov[r * S + s] = dc;
            } else {
                _Pragma("omp simd")
                SCORE_GRAD(ks[a], )
            }
        }
    }
}

/* Log-softmax of each row of the N x V logits (decoder.RNNDecoder.get_normalized_probs outside
   autograd: every step of beam search), into fp32: y = z - (m + log sum_j exp(z_j - m)),
   m = max_j z_j, the sum in fp32 with exp_inline (z_j - m clamped to [-87, 0]: a term below
   2e-38 of a sum of at least 1). Three passes over a row while it is in the cache (max, sum,
   output), the bf16 input read as it is, where fairseq casts the logits to fp32 and torch's row
   kernel reads them three times more. A row with a NaN or without a finite maximum comes out
   NaN, as torch's log_softmax makes it. */
#define LOG_SOFTMAX(T, LOAD)                                                                   \
void log_softmax_##T(long N, long V, const T* x, float* y) {                                   \
    for (long r = 0; r < N; r++) {                                                             \
        const T* z = x + r * V; float* o = y + r * V;                                          \
        float m = -INFINITY, s = 0.f; int nan = 0;                                             \
        _Pragma("omp simd reduction(max:m) reduction(|:nan)")                                  \
        for (long j = 0; j < V; j++) { float v = LOAD(z[j]); m = v > m ? v : m; nan |= v != v; } \
        if (nan || !(m > -INFINITY && m < INFINITY)) {                                         \
            for (long j = 0; j < V; j++) o[j] = NAN;                                           \
            continue;                                                                          \
        }                                                                                      \
        _Pragma("omp simd reduction(+:s)")                                                     \
        for (long j = 0; j < V; j++) {                                                         \
            float d = LOAD(z[j]) - m; s += exp_inline(d < -87.f ? -87.f : d);                  \
        }                                                                                      \
        float c = m + logf(s);                                                                 \
        _Pragma("omp simd")                                                                    \
        for (long j = 0; j < V; j++) o[j] = LOAD(z[j]) - c;                                    \
    }                                                                                          \
}

/* Beam search's candidates (search.py, fairseq's BeamSearch.step): for each of the B sentences,
   the K largest of lp[b][g][w] + score[b][g] over its G hypotheses g and V words w (sentences
   `sent` floats apart, hypotheses `row` floats apart; score B x G, or NULL for lp alone), in
   descending order, ties to the lower flat index g V + w (torch.topk leaves their order open):
   values, flat indices, hypotheses and words, K each per sentence. One pass over the values,
   16 at a time against the K-th largest so far; only those above it are inserted. Returns 1 at
   the first NaN (the caller leaves that step to torch.topk, which ranks NaN above all), else 0. */
long beam_topk_float(long B, long G, long V, long K, const float* lp, long sent, long row,
                     const float* score, float* vals, int64_t* idx, int64_t* hyp, int64_t* word) {
    for (long b = 0; b < B; b++) {
        float* bv = vals + b * K; int64_t* bi = idx + b * K; long n = 0; float thr = -INFINITY;
        for (long g = 0; g < G; g++) {
            const float* z = lp + b * sent + g * row; float sc = score ? score[b * G + g] : 0.f;
            for (long j0 = 0; j0 < V; j0 += 16) {
                long end = j0 + 16 < V ? j0 + 16 : V; int above = 0;
                _Pragma("omp simd reduction(|:above)")
                for (long j = j0; j < end; j++) above |= !(z[j] + sc <= thr);
                if (!above && n == K) continue;
                for (long j = j0; j < end; j++) {
                    float v = z[j] + sc;
                    if (v != v) return 1;
                    if (n == K && !(v > thr)) continue;
                    long p = n < K ? n++ : K - 1;
                    while (p > 0 && bv[p - 1] < v) { bv[p] = bv[p - 1]; bi[p] = bi[p - 1]; p--; }
                    bv[p] = v; bi[p] = g * V + j;
                    if (n == K) thr = bv[K - 1];
                }
            }
        }
        for (long i = 0; i < K; i++) { hyp[b * K + i] = bi[i] / V; word[b * K + i] = bi[i] % V; }
    }
    return 0;
}

LSTM(float, from_f32, to_f32)
LSTM(bf16, from_bf16, to_bf16)
GRU(float, from_f32, to_f32)
GRU(bf16, from_bf16, to_bf16)
LOSS(float, from_f32, to_f32)
LOSS(bf16, from_bf16, to_bf16)
DROPOUT(float, from_f32, to_f32)
DROPOUT(bf16, from_bf16, to_bf16)
LOG_SOFTMAX(float, from_f32)
LOG_SOFTMAX(bf16, from_bf16)
"""

# IEEE semantics (no -ffast-math: see the module docstring) but no errno, which lets expf and
# tanhf run as glibc's vector functions; -fopenmp-simd for the loops' "omp simd" without
# OpenMP's run time
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared"]
_LIBMVEC = platform.machine() == "x86_64" and platform.system() == "Linux"
LIBS = (["-lmvec"] if _LIBMVEC else []) + ["-lm"]

_DTYPES = {torch.float32: "float", torch.bfloat16: "bf16"}


# the C functions' arguments: L a C long (sizes, row strides), P a pointer (a tensor's data, or
# None for NULL), F a float, U a 64-bit unsigned integer (a seed)
_SIGNATURES = {"lstm_forward": "LLPLPLPPPP", "lstm_backward": "LLPPPPPP",
               "gru_forward": "LLPLPLPPP", "gru_backward": "LLPPPPPP",
               "loss_rows": "LLPPFFFPPP", "dropout": "LPPULF",
               "score_forward": "LLLLPPPPPP", "score_backward": "LLLLPPPPPPPPPPP",
               "log_softmax": "LLPP", "beam_topk": "LLLLPLLPPPPP"}
# the additive score's loops take fp32 only (its element-wise work runs in fp32 on a CPU,
# attention.for_elementwise), as do beam search's candidates (fairseq's log-probabilities)
_FP32_ONLY = ("score_forward", "score_backward", "beam_topk")
# functions that return a C long (the others return nothing)
_RETURNS = ("beam_topk",)
_C_TYPES = {"L": ctypes.c_long, "P": ctypes.c_void_p, "F": ctypes.c_float, "U": ctypes.c_uint64}


class _Library:
    lib: Optional[ctypes.CDLL] = None
    functions: Dict[Tuple[str, torch.dtype], Callable] = {}  # (name, dtype) -> its C function
    failure: Optional[str] = None  # the first failure; the eager path runs from then on


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fairseq_s2s_attn"


def _build(target: Path) -> None:
    """Compiles SOURCE into the shared library ``target`` (atomically: a file beside it, renamed,
    so that processes starting together never load a half-written library)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp, "cells.c"), Path(tmp, "cells.so")
        src.write_text(SOURCE)
        cmd = [_compiler(), *FLAGS, str(src), "-o", str(lib), *LIBS]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise OSError(f"{_compiler()} failed: {lines[0] if lines else done.returncode}")
        os.replace(lib, target)


def library() -> Optional[ctypes.CDLL]:
    """The compiled loops, built at the first call (None where that failed, logged once)."""
    if _Library.lib is not None or _Library.failure is not None:
        return _Library.lib
    try:
        try:
            version = subprocess.run([_compiler(), "--version"], capture_output=True,
                                     text=True).stdout
        except OSError as exc:
            raise OSError(f"no C compiler ({_compiler()}: {exc.strerror})") from exc
        key = "\n".join([SOURCE, *FLAGS, *LIBS, version, _cpu_flags()])
        target = cache_dir() / f"cells-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
        for name, signature in _SIGNATURES.items():
            for dtype, suffix in _DTYPES.items():
                if name in _FP32_ONLY and dtype != torch.float32:
                    continue
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes = [_C_TYPES[t] for t in signature]
                fn.restype = ctypes.c_long if name in _RETURNS else None
                _Library.functions[(name, dtype)] = fn
        _Library.lib = lib
    except OSError as exc:  # compiler missing or failing, cache not writable, library not loadable
        _Library.failure = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        logger.warning(f"the C loops of the LSTM/GRU cells, the fused loss, dropout and the "
                       f"additive score are off "
                       f"({_Library.failure}); running torch's operations instead")
    return _Library.lib


def usable(igates: Tensor, hgates: Tensor, state: Tensor) -> bool:
    """Whether the C loops run this step: on, CPU tensors of one dtype, fp32 or bf16, rows with
    unit column stride, not traced by torch.compile, and the library built."""
    return (ENABLED and CELLS and igates.device.type == "cpu" and igates.dtype in _DTYPES
            and hgates.dtype == igates.dtype and state.dtype == igates.dtype
            and hgates.device.type == "cpu" and state.device.type == "cpu"
            and not torch.compiler.is_compiling() and library() is not None)


def _rows(x: Tensor) -> Tensor:
    """x with unit column stride (a view where it has one)."""
    return x if x.stride(1) == 1 or x.size(1) == 1 else x.contiguous()


def _ptr(x: Optional[Tensor]) -> Optional[int]:
    return None if x is None else x.data_ptr()


def _call(name: str, dtype: torch.dtype, *args) -> Optional[int]:
    return _Library.functions[(name, dtype)](*args)


def _lstm_forward(igates: Tensor, hgates: Tensor, c: Tensor, keep: bool):
    B, H = c.shape
    h, cn = torch.empty_like(c), torch.empty_like(c)
    act = torch.empty(B, 5 * H, dtype=torch.float32) if keep else None
    _call("lstm_forward", c.dtype, B, H, _ptr(igates), igates.stride(0), _ptr(hgates),
          hgates.stride(0), _ptr(c), _ptr(h), _ptr(cn), _ptr(act))
    return h, cn, act


def _gru_forward(igates: Tensor, hgates: Tensor, h: Tensor, keep: bool):
    B, H = h.shape
    out = torch.empty_like(h)
    act = torch.empty(B, 4 * H, dtype=torch.float32) if keep else None
    _call("gru_forward", h.dtype, B, H, _ptr(igates), igates.stride(0), _ptr(hgates),
          hgates.stride(0), _ptr(h), _ptr(out), _ptr(act))
    return out, act


class LSTMCell(torch.autograd.Function):
    @staticmethod
    def forward(ctx, igates: Tensor, hgates: Tensor, c: Tensor):
        c = c.contiguous()
        h, cn, act = _lstm_forward(igates, hgates, c, keep=True)
        ctx.save_for_backward(act, c)
        return h, cn

    @staticmethod
    @once_differentiable
    def backward(ctx, g_h: Optional[Tensor], g_c: Optional[Tensor]):
        act, c = ctx.saved_tensors
        B, H = c.shape
        gg, g_prev = c.new_empty(B, 4 * H), torch.empty_like(c)
        # named, not temporaries: a copy made here must outlive the call that reads it
        g_h, g_c = (None if g is None else g.to(c.dtype).contiguous() for g in (g_h, g_c))
        _call("lstm_backward", c.dtype, B, H, _ptr(g_h), _ptr(g_c), _ptr(act), _ptr(c),
              _ptr(gg), _ptr(g_prev))
        return gg, gg, g_prev


class GRUCell(torch.autograd.Function):
    @staticmethod
    def forward(ctx, igates: Tensor, hgates: Tensor, h: Tensor):
        h = h.contiguous()
        out, act = _gru_forward(igates, hgates, h, keep=True)
        ctx.save_for_backward(act, h)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out: Tensor):
        act, h = ctx.saved_tensors
        B, H = h.shape
        g_i, g_h, g_prev = h.new_empty(B, 3 * H), h.new_empty(B, 3 * H), torch.empty_like(h)
        g_out = g_out.to(h.dtype).contiguous()  # named: it must outlive the call
        _call("gru_backward", h.dtype, B, H, _ptr(g_out), _ptr(act), _ptr(h), _ptr(g_i),
              _ptr(g_h), _ptr(g_prev))
        return g_i, g_h, g_prev


def _recording(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def lstm_cell(igates: Tensor, hgates: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """``decoder.lstm_from_gates`` in one loop: igates, hgates B x 4H, c B x H (one dtype, see
    ``usable``) -> h', c' (B x H each)."""
    igates, hgates = _rows(igates), _rows(hgates)
    if _recording(igates, hgates, c):
        return LSTMCell.apply(igates, hgates, c)
    h, cn, _ = _lstm_forward(igates, hgates, c.contiguous(), keep=False)
    return h, cn


def gru_cell(igates: Tensor, hgates: Tensor, h: Tensor) -> Tensor:
    """``decoder.gru_from_gates`` in one loop: igates, hgates B x 3H, h B x H -> h' (B x H)."""
    igates, hgates = _rows(igates), _rows(hgates)
    if _recording(igates, hgates, h):
        return GRUCell.apply(igates, hgates, h)
    return _gru_forward(igates, hgates, h.contiguous(), keep=False)[0]


def loss_rows_usable(logits: Tensor, target: Tensor, acc: torch.dtype) -> bool:
    """Whether ``loss_rows`` runs the fused loss's rows: on, contiguous CPU logits of fp32 or
    bf16 summed in fp32, int64 targets, not traced, the library built."""
    return (ENABLED and LOSS_ROWS and logits.device.type == "cpu" and logits.dtype in _DTYPES
            and acc == torch.float32 and logits.is_contiguous() and target.dtype == torch.int64
            and not torch.compiler.is_compiling() and library() is not None)


def loss_rows(logits: Tensor, target: Tensor, c_nll: float, c_smooth: float, smooth: bool
              ) -> Tuple[Tensor, Optional[Tensor]]:
    """``criterion._loss_and_gradient`` without accuracy, one row at a time in one loop: returns
    lse and (smooth) the row sums of the logits (N each, fp32), and overwrites the logits (N x V)
    with dL/dz = scale p - c_smooth - c_nll onehot(target), scale = c_nll + V c_smooth. Each row
    is read three times while it is in the cache (max and sum, exp into a row of scratch, the
    gradient), against ten passes of eager operations over a chunk of rows."""
    n, vocab = logits.shape
    target = target.contiguous()
    lse = logits.new_empty(n, dtype=torch.float32)
    total = logits.new_empty(n, dtype=torch.float32) if smooth else None
    scratch = logits.new_empty(vocab, dtype=torch.float32)
    _call("loss_rows", logits.dtype, n, vocab, _ptr(logits), _ptr(target),
          c_nll + vocab * c_smooth, c_smooth, c_nll, _ptr(lse), _ptr(total), _ptr(scratch))
    return lse, total


def dropout_usable(x: Tensor) -> bool:
    """Whether ``dropout`` runs: on, a CPU tensor of fp32 or bf16, not traced, the library built."""
    return (ENABLED and DROPOUT and x.device.type == "cpu" and x.dtype in _DTYPES
            and not torch.compiler.is_compiling() and library() is not None)


def _dropout(x: Tensor, seed: int, threshold: int, scale: float) -> Tensor:
    x = x.contiguous()  # named: it must outlive the call
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    _call("dropout", x.dtype, x.numel(), _ptr(x), _ptr(y), seed & ((1 << 64) - 1), threshold,
          scale)
    return y


class Dropout(torch.autograd.Function):
    """y = x keep scale with the mask of (seed, element index); backward applies the same mask
    to the gradient, made again from the seed (nothing of x's size is kept). Its backward is this
    function again, so double backward works."""

    @staticmethod
    def forward(ctx, x: Tensor, seed: int, threshold: int, scale: float):
        ctx.mask = (seed, threshold, scale)
        ctx.dtype = x.dtype
        return _dropout(x, seed, threshold, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return Dropout.apply(grad.to(ctx.dtype), *ctx.mask), None, None, None


def dropout(x: Tensor, threshold: int, scale: float) -> Tensor:
    """``dropout.cpu_dropout`` in one C loop each way: x (fp32 or bf16, CPU) times a mask of 16
    random bits per element compared with ``threshold`` (an int16; kept when the bits are at
    least it) times ``scale``. The bits come from one 64-bit seed drawn from torch's default
    generator per call (``torch.manual_seed`` makes them reproducible) through a counter-based
    generator (SplitMix64 over the element's index: see the C source); they are other bits than
    the eager path's ``random_`` draws."""
    # a signed 64-bit value (the profiler's record_shapes fails on larger Python ints as a
    # Function's arguments); the loop reads its bits as unsigned
    seed = int(torch.empty((), dtype=torch.int64).random_(-(1 << 63), None))
    if _recording(x):
        return Dropout.apply(x, seed, threshold, scale)
    return _dropout(x, seed, threshold, scale)


def score_usable(q: Tensor, k: Tensor, coverage: Optional[Tensor]) -> bool:
    """Whether ``additive_score`` runs the additive score for these operands: on, fp32 CPU
    tensors in one of its layouts (``_score_layout``), not traced, the library built."""
    return (ENABLED and SCORE and q.device.type == "cpu" and k.device.type == "cpu"
            and q.dtype == torch.float32 and k.dtype == torch.float32
            and (coverage is None or coverage.dtype == torch.float32)
            and _score_layout(q, k, coverage) is not None
            and not torch.compiler.is_compiling() and library() is not None)


def _score_layout(q: Tensor, k: Tensor, coverage: Optional[Tensor]
                  ) -> Optional[Tuple[int, int, int, int]]:
    """(R, G, S, A) for q B x 1 x A with k B x S x A (a step: G = 1), or q B x G x 1 x A with
    k B x 1 x S x A (G hypotheses or steps per sentence); coverage one row per query
    (q.shape[:-2] x S x 1); else None."""
    if q.dim() == 3 and k.dim() == 3 and q.size(1) == 1:
        groups = 1
    elif q.dim() == 4 and k.dim() == 4 and q.size(2) == 1 and k.size(1) == 1:
        groups = q.size(1)
    else:
        return None
    B, S, A = k.size(0), k.size(-2), k.size(-1)
    if q.size(0) != B or q.size(-1) != A or B * groups == 0 or S == 0:
        return None
    if coverage is not None and tuple(coverage.shape) != (*q.shape[:-2], S, 1):
        return None
    return B * groups, groups, S, A


def _score_operands(q: Tensor, k: Tensor, v: Tensor, coverage: Optional[Tensor],
                    w_c: Optional[Tensor]):
    """The layout (R, G, S, A) and the operands as the C loops read them: contiguous fp32."""
    layout = _score_layout(q, k, coverage)
    q, k = q.contiguous(), k.contiguous()
    v = v.detach().to(torch.float32).contiguous()
    cov = None if coverage is None else coverage.contiguous()
    wc = None if coverage is None else w_c.detach().to(torch.float32).contiguous()
    return layout, q, k, v, cov, wc


def additive_score(q: Tensor, k: Tensor, v: Tensor, coverage: Optional[Tensor] = None,
                   w_c: Optional[Tensor] = None) -> Tensor:
    """attention.additive_scores in one C loop (see ``score_usable``): e = v^T tanh(q + k
    [+ coverage w_c]) -> q.shape[:-2] x S, in fp32, without the B x [G x] S x A values."""
    # named: the operands must outlive the call
    (R, G, S, A), q, k, v, cov, wc = _score_operands(q, k, v, coverage, w_c)
    e = q.new_empty(*q.shape[:-2], S)
    _call("score_forward", torch.float32, R, G, S, A, _ptr(q), _ptr(k), _ptr(v), _ptr(cov),
          _ptr(wc), _ptr(e))
    return e


def additive_score_grads(q: Tensor, k: Tensor, v: Tensor, grad: Tensor,
                         coverage: Optional[Tensor] = None, w_c: Optional[Tensor] = None):
    """The gradients of ``additive_score`` for the upstream gradient ``grad`` (q.shape[:-2] x
    S): (q's, k's, v's, coverage's or None, w_c's or None), in the operands' shapes, fp32."""
    (R, G, S, A), q, k, v32, cov, wc = _score_operands(q, k, v, coverage, w_c)
    grad = grad.to(torch.float32).contiguous()
    g_q, g_k, g_v = torch.empty_like(q), torch.empty_like(k), q.new_empty(A)
    g_cov = None if coverage is None else torch.empty_like(cov)
    g_w = None if coverage is None else q.new_empty(A)
    _call("score_backward", torch.float32, R, G, S, A, _ptr(q), _ptr(k), _ptr(v32), _ptr(cov),
          _ptr(wc), _ptr(grad), _ptr(g_q), _ptr(g_k), _ptr(g_v), _ptr(g_cov), _ptr(g_w))
    return g_q, g_k, g_v, g_cov, g_w


def log_softmax_usable(logits: Tensor) -> bool:
    """Whether ``log_softmax`` runs: on, CPU logits of fp32 or bf16 with at least one value,
    outside autograd (decoding, validation; training's loss has its own loop), not traced, the
    library built."""
    return (ENABLED and LOG_SOFTMAX and logits.device.type == "cpu" and logits.dtype in _DTYPES
            and logits.dim() > 0 and logits.numel() > 0 and not _recording(logits)
            and not torch.compiler.is_compiling() and library() is not None)


def log_softmax(logits: Tensor) -> Tensor:
    """``torch.log_softmax(logits.float(), -1)`` in one C loop over the rows (see
    ``log_softmax_usable``): fp32 log-probabilities in the logits' shape, a new tensor. Within a
    few ulp of torch's (another exp, another order of the sum)."""
    x = logits.contiguous()  # named: it must outlive the call
    out = torch.empty(x.shape, dtype=torch.float32)
    vocab = x.size(-1)
    _call("log_softmax", x.dtype, x.numel() // vocab, vocab, _ptr(x), _ptr(out))
    return out


def topk_usable(lprobs: Tensor, scores: Optional[Tensor]) -> bool:
    """Whether ``beam_topk`` can take beam search's candidates: on, fp32 CPU log-probabilities
    B x G x V with unit word stride (scores, if any, fp32 CPU B x G), not traced, the library
    built."""
    return (ENABLED and TOPK and lprobs.device.type == "cpu" and lprobs.dtype == torch.float32
            and lprobs.dim() == 3 and lprobs.numel() > 0 and lprobs.stride(2) == 1
            and (scores is None or (scores.device.type == "cpu" and scores.dtype == torch.float32
                                    and tuple(scores.shape) == tuple(lprobs.shape[:2])))
            and not torch.compiler.is_compiling() and library() is not None)


def beam_topk(lprobs: Tensor, scores: Optional[Tensor], k: int
              ) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """The k best of ``lprobs + scores.unsqueeze(-1)`` per sentence over its hypotheses and
    words, in one C loop (see ``topk_usable``): lprobs B x G x V, scores B x G or None ->
    (values B x k in descending order, hypotheses B x k, words B x k), ties to the lower flat
    index g V + w; None where a value is NaN."""
    B, G, V = lprobs.shape
    score = None if scores is None else scores.contiguous()  # named: it must outlive the call
    values = lprobs.new_empty(B, k)
    flat, hyps, words = (torch.empty(B, k, dtype=torch.int64) for _ in range(3))
    nan = _call("beam_topk", torch.float32, B, G, V, k, _ptr(lprobs), lprobs.stride(0),
                lprobs.stride(1), _ptr(score), _ptr(values), _ptr(flat), _ptr(hyps), _ptr(words))
    return None if nan else (values, hyps, words)
