"""Attention: one module, interchangeable score functions, global or local.

Every scorer splits its work into a part that depends only on the source (``keys``, computed
once per sentence and cached across decoder steps) and a part that depends on the decoder state
(``forward(query, keys)``, computed per step or, where the math allows, for all steps at once).

Shapes (B = batch, S = source length, T = target steps, C = encoder output size,
Q = decoder query size, A = attention hidden size):

    values: B x S x C      keys: B x S x K      query: B x Q  or  B x T x Q
    scores / weights: B x S  or  B x T x S       context: B x C  or  B x T x C

Source positions: fairseq pads sources on the left, so the padded index of a token is not its
position in the sentence. Whatever depends on a position (the location score, local windows)
uses positions counted from the first real token and the real length S of each sentence.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import native, stepgrad
from .fused import Fused
from .packed import Linear
from .precision import over_positions

SCORERS = ("additive", "dot", "general", "concat", "location")
MODES = ("global", "local-m", "local-p")


def source_positions(padding_mask: Optional[Tensor], like: Tensor) -> Tuple[Tensor, Tensor]:
    """(positions B x S counted from each sentence's first real token, real lengths B).

    Positions at padding are meaningless (the padding is masked). like: B x S x ... tensor.
    """
    if padding_mask is None:
        bsz, seqlen = like.shape[:2]
        pos = torch.arange(seqlen, device=like.device).unsqueeze(0).expand(bsz, seqlen)
        return pos, torch.full((bsz,), seqlen, device=like.device, dtype=torch.long)
    real = (~padding_mask).long()
    return real.cumsum(dim=1) - 1, real.sum(dim=1)


class AdditiveScorer(nn.Module):
    """Bahdanau et al. (2014), eq. (6) / Appendix A.1.2: e_ij = v^T tanh(W s + U h_j + b).

    Luong et al. (2015)'s *concat* score, v^T tanh(W_a [h_t; h_s]), is the same function
    (W_a [h_t; h_s] = W h_t + U h_s), so ``concat`` is served by this class.
    U h_j + b is the key, computed once per sentence.

    normalize (Luong et al.'s tf-nmt ``normed_bahdanau``, after Salimans & Kingma 2016 weight
    normalisation): v is replaced by g v / ||v|| with a learned scalar g (initialised to
    sqrt(1/A)); the bias b inside the tanh is the key projection's bias, present in both forms.
    coverage (Tu et al. 2016, eq. (6), linguistic coverage without fertility):
    e_ij = v^T tanh(W s + U h_j + b + w_c cov_ij) with cov_ij = sum_{k<i} a_kj.
    """

    def __init__(self, query_dim: int, value_dim: int, attention_dim: int,
                 normalize: bool = False, coverage: bool = False):
        super().__init__()
        self.query_proj = Linear(query_dim, attention_dim, bias=False)  # W (every step)
        self.key_proj = nn.Linear(value_dim, attention_dim, bias=True)  # U (+ bias b)
        self.v = nn.Linear(attention_dim, 1, bias=False)  # v
        self.normalize = normalize
        if normalize:
            self.g = nn.Parameter(torch.tensor(math.sqrt(1.0 / attention_dim)))
        self.coverage_proj = nn.Linear(1, attention_dim, bias=False) if coverage else None  # w_c

    def keys(self, values: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        # B x S x C -> B x S x A, in the dtype the score's element-wise work runs in
        return for_elementwise(over_positions(self.key_proj, values))

    def v_weight(self) -> Tensor:
        """v (A), or g v / ||v|| when normalised."""
        v = self.v.weight[0]
        if self.normalize:
            v = self.g * v / v.norm()
        return v

    def forward(self, query: Tensor, keys: Tensor, coverage: Optional[Tensor] = None) -> Tensor:
        """query B [x T] x Q, keys B x S x A, coverage (one per query) B [x T] x S -> B [x T] x S."""
        q = over_positions(self.query_proj, query).to(keys.dtype)  # B x A  or  B x T x A
        if q.dim() == 2:
            q = q.unsqueeze(1)  # B x 1 x A (with keys B x S x A)
        else:
            q, keys = q.unsqueeze(2), keys.unsqueeze(1)  # B x T x 1 x A, B x 1 x S x A
        w_c = None
        if coverage is not None:  # B [x T] x S -> B [x T] x S x A
            if self.coverage_proj is None:
                raise ValueError("coverage given to a scorer built without coverage")
            if coverage.shape[:-1] != query.shape[:-1]:
                raise ValueError(f"coverage {tuple(coverage.shape)} needs one row per query "
                                 f"{tuple(query.shape)}")
            # U h_j + b + w_c cov_ij in one multiply-add over the B [x T] x S x A values: the
            # Linear(1, A) product and an add took 2.2 ms against 0.3 ms at beam 5, batch 32
            w_c = self.coverage_proj.weight[:, 0].to(keys.dtype)  # A
            coverage = coverage.unsqueeze(-1).to(keys.dtype)  # B [x T] x S x 1
        if not torch.is_grad_enabled():  # decoding: the same scores without an autograd node
            # (~20 us less per beam step); the coverage term added block by block
            return additive_scores(q, keys, self.v_weight(), coverage, w_c)
        if coverage is None:
            return AdditiveScore.apply(q, keys, self.v_weight())
        return AdditiveScore.apply(q, keys, self.v_weight(), coverage, w_c)


def for_elementwise(x: Tensor) -> Tensor:
    """x in fp32 if it is a bf16/fp16 tensor on the CPU, else as it is.

    torch's CPU kernels compute bf16 and fp16 element-wise operations in fp32, converting every
    value on load and store, so the additive score's chain (add, sigmoid, subtract, and the
    coverage term's multiply-add) over B x S x A values per decoder step runs faster on fp32
    operands than on bf16 ones, and exact to fp32: for beam 5 over 25 source words at A = 256,
    804 against 1,317 us at batch 32 and 44 against 90 us at batch 1 (AMD EPYC with AVX-512
    bf16, torch 2.13), with errors ~1e-6 instead of ~1e-2 against fp64. Matrix products keep
    bf16 (they are fast in it); on a GPU, half-precision element-wise work is native and stays.
    """
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return x.float()
    return x


def additive_hidden(q: Tensor, k: Tensor) -> Tensor:
    """tanh(q + k) for broadcastable q and k, in their dtype.

    On CPU, in fp32 and bf16, it is computed as 2 sigmoid(2 (q + k)) - 1 (the same function; the
    difference is fp32 rounding, ~1e-7 absolute): torch's CPU tanh is several times slower than
    its sigmoid (410k fp32 values: 846 us against 88 us on an AMD EPYC with AVX-512, torch
    2.13), and this tanh over B x S x A values per decoder step is the largest element-wise
    work of Bahdanau's step. fp64 and CUDA use torch.tanh.
    """
    x = q + k
    if x.is_cuda or x.dtype == torch.float64:
        return torch.tanh(x)
    return x.mul_(2).sigmoid_().mul_(2).sub_(1)


# the most values (B x [T x] S x A) of the additive score's element-wise work made at once on a
# CPU: 16 MB in fp32. A longer batch goes in blocks of rows: one 659-word sentence in a batch of
# 32 at beam 5 made a 108 MB fp32 block (27M values) whose passes ran from memory, 41 ms a step
# against 23 ms in blocks. Below this size one block is as fast (it stays in the L3 cache).
# Not on a GPU, where one large block fills the device.
SCORE_BLOCK_ELEMENTS = {"cpu": 1 << 22}


def additive_scores(q: Tensor, k: Tensor, v: Tensor, coverage: Optional[Tensor] = None,
                    w_c: Optional[Tensor] = None, training: bool = False) -> Tensor:
    """e = v^T tanh(q + k [+ coverage w_c]) over the last dimension, for broadcastable q and k
    of one number of dimensions, in their dtype: in training (the forward of ``AdditiveScore``)
    in one compiled loop where that is faster (``FUSED_SCORES``), else eagerly, coverage
    (... x S x 1) times w_c (A) added to the keys one block of rows at a time
    (``SCORE_BLOCK_ELEMENTS``). On a CPU in fp32 (training and decoding) one C loop instead
    (``native.additive_score``), which never writes the B x [G x] S x A values."""
    if native.score_usable(q, k, coverage):
        return native.additive_score(q, k, v, coverage, w_c)
    if (training and q.dim() == k.dim() and q.dtype == k.dtype
            and FUSED_SCORES.usable(k, _elements(q, k))):
        scores = FUSED_SCORES(q, k, v.to(k.dtype), coverage, w_c)
        if scores is not None:
            return scores
    limit = SCORE_BLOCK_ELEMENTS.get(k.device.type)
    if limit is not None and q.dim() == k.dim():
        per_row = math.prod(max(a, b) for a, b in zip(q.shape[1:], k.shape[1:]))  # [T x] S x A
        rows, total = max(1, limit // max(1, per_row)), max(q.size(0), k.size(0))
        if rows < total:
            def block(x: Optional[Tensor], r: int) -> Optional[Tensor]:
                return x if x is None or x.size(0) == 1 else x[r:r + rows]

            return torch.cat([_additive_scores(block(q, r), block(k, r), v, block(coverage, r), w_c)
                              for r in range(0, total, rows)])
    return _additive_scores(q, k, v, coverage, w_c)


def _additive_scores(q: Tensor, k: Tensor, v: Tensor, coverage: Optional[Tensor],
                     w_c: Optional[Tensor]) -> Tensor:
    """One block of ``additive_scores``.

    On CPU (fp32, bf16) as additive_hidden computes it, with the last two of its five passes over
    the ... x S x A values folded away: 2 sigmoid(2x) - 1 = 2 (sigmoid(2x) - 1/2), so
    e = (2v)^T (sigmoid(2q + 2k) - 1/2): one add (2q + 2k = 2 (q + k) exactly), the sigmoid and
    one subtraction, bit for bit the values of ``v^T additive_hidden(q, k)`` (scaling by 2 is
    exact). A decoder step of rnn_bahdanau spends its largest element-wise work here.
    """
    if coverage is not None:  # U h_j + b + w_c cov_ij in one multiply-add
        k = torch.addcmul(k, coverage, w_c)
    if q.is_cuda or k.is_cuda or torch.float64 in (q.dtype, k.dtype):
        hidden = additive_hidden(q, k)
        return torch.matmul(hidden, v.to(hidden.dtype).unsqueeze(-1)).squeeze(-1)
    x = torch.add(q * 2, k, alpha=2).sigmoid_().sub_(0.5)
    # a matrix-vector product in x's dtype (autocast leaves mv alone; a matmul it would run in
    # bf16 after casting all of x, one more pass)
    return x.view(-1, x.size(-1)).mv(v.to(x.dtype) * 2).view(x.shape[:-1])


def _elements(q: Tensor, k: Tensor) -> int:
    """How many values q + k has (B [x T] x S x A), for q and k of one number of dimensions
    (a few us; torch.broadcast_shapes took 11)."""
    return math.prod(max(a, b) for a, b in zip(q.shape, k.shape))


def _fused_scores(q: Tensor, k: Tensor, v: Tensor, coverage: Optional[Tensor],
                  w_c: Optional[Tensor]) -> Tensor:
    """``additive_scores`` as one loop over the B [x T] x S x A values (compiled, fused.py):
    e = (2v)^T (sigmoid(2q + 2k [+ 2 coverage w_c]) - 1/2), no B x S x A tensor written."""
    if coverage is not None:
        k = k + coverage * w_c
    return ((torch.sigmoid(2 * q + 2 * k) - 0.5) * (2 * v)).sum(-1)


def _fused_score_grads(q: Tensor, k: Tensor, v: Tensor, grad: Tensor, coverage: Optional[Tensor],
                       w_c: Optional[Tensor], coverage_grads: bool):
    """``AdditiveScore.backward``'s gradients (for q, k, v[, coverage, w_c]), compiled
    (fused.py): s = sigmoid(2 (q + k)) remade once (one exp per value), tanh = 2 s - 1,
    d e / d (q + k) = grad v tanh' = grad 4 v s (1 - s). Inductor makes one kernel of four
    loops over the values without coverage (s; v's sum; the gradient, written over s as k's;
    q's sum over the positions) where the eager path ran seven or more operations, each a pass."""
    keys = k if coverage is None else k + coverage * w_c
    s = torch.sigmoid(2 * q + 2 * keys)
    g = grad.unsqueeze(-1)  # ... x S x 1
    grad_v = (g * (2 * s - 1)).sum(dim=tuple(range(s.dim() - 1)))
    d_pre = g * (4 * v) * s * (1 - s)
    grad_cov = grad_w = None
    if coverage is not None and coverage_grads:
        grad_cov = _sum_to((d_pre * w_c).sum(-1, keepdim=True), coverage)
        grad_w = (d_pre * coverage).sum(dim=tuple(range(s.dim() - 1)))
    return _sum_to(d_pre, q), _sum_to(d_pre, k), grad_v, grad_cov, grad_w


# in training, the additive score's forward and backward each in one compiled loop on CPU (fp32
# values, the dtype of its element-wise work there, ``for_elementwise``); decoding stays eager
# (fused.py: compiling costs more than it saves in a fairseq-generate run); fused.ENABLED
# switches it off
FUSED_SCORES = Fused(_fused_scores)
FUSED_SCORE_GRADS = Fused(_fused_score_grads)

# backward on CPU from sigmoid(2 (q + k)) (AdditiveScore.backward); tests and
# scripts/train_ab.py set it to False for the tanh itself (additive_hidden)
SIGMOID_BACKWARD = True


class AdditiveScore(torch.autograd.Function):
    """e = v^T tanh(q + k [+ coverage w_c]), reduced over the last dimension, for broadcastable q
    and k (and coverage ... x S x 1 times w_c, A: Tu et al.'s coverage term).

    The tanh (B x S x A per decoder step) is not kept for backward but recomputed there from q,
    k and the coverage, which autograd keeps anyway: training memory then grows with B x S x A
    only during one step's backward, not for every step of the sentence (the same trade as
    activation checkpointing, one add and one sigmoid more per step; on CPU backward works from
    s = sigmoid(2 (q + k)) as the forward does: tanh = 2 s - 1, tanh' = 4 s (1 - s), two passes
    over the B x S x A values fewer than remaking the tanh, 917 against 1,071 us a step at
    B 70, S 30, A 256 on one core of an Intel Xeon with AMX). Nor are the keys with the
    coverage term added, a new B x S x A tensor at every step: the demo model's training tensor
    peak is 187.6 MB, against 199.8 MB when they were kept (in bf16). Computed in the dtype of q
    and k; on a CPU in fp32 each direction is one C loop (``native.additive_score``), else
    inductor's loops (``fused.py``) or eager passes.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, coverage: Optional[Tensor] = None,
                w_c: Optional[Tensor] = None) -> Tensor:
        ctx.save_for_backward(q, k, v, coverage, w_c)
        return additive_scores(q, k, v, coverage, w_c, training=True)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, coverage, w_c = ctx.saved_tensors
        if native.score_usable(q, k, coverage):  # CPU, fp32: one C loop, as the forward
            grad_q, grad_k, grad_v, grad_cov, grad_w = native.additive_score_grads(
                q, k, v, grad, coverage, w_c)
            needs = tuple(ctx.needs_input_grad[3:]) + (False, False)  # coverage, w_c
            return (grad_q, grad_k, grad_v.to(v.dtype), grad_cov if needs[0] else None,
                    grad_w.to(w_c.dtype) if needs[1] else None)
        if (q.dim() == k.dim() and q.dtype == k.dtype
                and FUSED_SCORE_GRADS.usable(k, _elements(q, k))):
            needs = tuple(ctx.needs_input_grad[3:]) + (False, False)  # coverage, w_c
            grads = FUSED_SCORE_GRADS(q, k, v.to(k.dtype), grad.to(k.dtype), coverage, w_c,
                                      needs[0] or needs[1])
            if grads is not None:
                grad_q, grad_k, grad_v, grad_cov, grad_w = grads
                return (grad_q, grad_k, grad_v.to(v.dtype), grad_cov if needs[0] else None,
                        grad_w.to(w_c.dtype) if needs[1] else None)
        keys = k if coverage is None else torch.addcmul(k, coverage, w_c)
        if (not SIGMOID_BACKWARD or q.is_cuda or keys.is_cuda
                or torch.float64 in (q.dtype, keys.dtype)):
            hidden = additive_hidden(q, keys)  # tanh(q + k)
            grad = grad.to(hidden.dtype).unsqueeze(-1)  # ... x S x 1
            # d e / d v = sum over positions of grad * tanh(q + k): one product, no B x S x A temporary
            grad_v = torch.matmul(grad.reshape(1, -1), hidden.reshape(-1, hidden.size(-1)))[0]
            # d e / d (q + k) = grad v (1 - tanh^2), the last factor in one fused kernel
            d_pre = torch.ops.aten.tanh_backward(grad * v.to(hidden.dtype), hidden)
        else:
            # CPU, as the forward: s = sigmoid(2 (q + k)), tanh = 2 s - 1, tanh' = 4 s (1 - s):
            # two passes over the B x S x A values fewer than making the tanh itself
            sig = torch.add(q * 2, keys, alpha=2).sigmoid_()
            grad = grad.to(sig.dtype).unsqueeze(-1)  # ... x S x 1
            flat = grad.reshape(1, -1)
            # sum of grad * tanh = 2 sum grad * s - sum grad
            grad_v = torch.matmul(flat, sig.reshape(-1, sig.size(-1)))[0].mul_(2).sub_(flat.sum())
            d_pre = torch.ops.aten.sigmoid_backward(grad * (4 * v.to(sig.dtype)), sig)
        grad_v = grad_v.to(v.dtype)
        grad_cov = grad_w = None
        # d e / d cov_ij = d_pre_ij . w_c; d e / d w_c = sum over positions of d_pre cov
        if coverage is not None and ctx.needs_input_grad[3]:
            grad_cov = _sum_to(torch.matmul(d_pre, w_c.to(d_pre.dtype)).unsqueeze(-1), coverage)
        if coverage is not None and ctx.needs_input_grad[4]:
            cov = coverage.to(d_pre.dtype).expand(*d_pre.shape[:-1], 1)
            grad_w = torch.matmul(cov.reshape(1, -1), d_pre.reshape(-1, d_pre.size(-1)))[0].to(w_c.dtype)
        return _sum_to(d_pre, q), _sum_to(d_pre, k), grad_v, grad_cov, grad_w


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """grad of a broadcast result, summed back to the shape (and dtype) of the input ``like``."""
    extra = grad.dim() - like.dim()
    if extra:
        grad = grad.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, n in enumerate(like.shape) if n == 1 and grad.size(i) != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad.to(like.dtype)


class DotScorer(nn.Module):
    """Luong et al. (2015), eq. (8) *dot*: score(h_t, h_s) = h_t^T h_s.

    scale: g h_t^T h_s with a learned scalar g initialised to 1 (tf-nmt's ``scaled_luong``).
    """

    def __init__(self, query_dim: int, value_dim: int, scale: bool = False):
        super().__init__()
        if query_dim != value_dim:
            raise ValueError(
                f"dot attention needs the decoder state size ({query_dim}) to equal the encoder "
                f"output size ({value_dim}); use 'general' or 'concat', or match the sizes"
            )
        self.g = nn.Parameter(torch.tensor(1.0)) if scale else None

    def keys(self, values: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        # values are a batch-first view of the T x B x C encoder output; a contiguous copy, made
        # once per sentence, makes every step's product several times faster (bf16 most of all)
        return values.contiguous()

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        return _scaled(_bdot(query, keys), self.g)


class GeneralScorer(nn.Module):
    """Luong et al. (2015), eq. (8) *general*: score(h_t, h_s) = h_t^T W_a h_s.

    The key W_a h_s is computed once per sentence; each step is then a dot product.
    scale: g h_t^T W_a h_s with a learned scalar g initialised to 1 (tf-nmt's ``scaled_luong``).
    """

    def __init__(self, query_dim: int, value_dim: int, scale: bool = False):
        super().__init__()
        self.key_proj = nn.Linear(value_dim, query_dim, bias=False)  # W_a
        self.g = nn.Parameter(torch.tensor(1.0)) if scale else None

    def keys(self, values: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        return over_positions(self.key_proj, values)  # B x S x Q

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        return _scaled(_bdot(query, keys), self.g)


class LocationScorer(nn.Module):
    """Luong et al. (2015), sec. 3.1 *location*: a_t = softmax(W_a h_t), scores from the query alone.

    W_a h_t has one score per source position up to ``max_positions`` (Luong's fixed maximum
    length); a sentence uses the scores of its first S positions, counted from its first real
    token (padding is masked). The key is that position index (B x S, long), computed once per
    sentence; fairseq skips sentences longer than --max-source-positions, and longer ones would
    share the last score.
    """

    def __init__(self, query_dim: int, max_positions: int):
        super().__init__()
        self.max_positions = max_positions
        self.proj = Linear(query_dim, max_positions, bias=False)  # W_a (every step)

    def keys(self, values: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        pos, _ = source_positions(padding_mask, values)
        return pos.clamp(0, self.max_positions - 1)  # B x S

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        scores = over_positions(self.proj, query)  # B x P  or  B x T x P
        if scores.dim() == 2:
            return scores.gather(1, keys)  # B x S
        index = keys.unsqueeze(1).expand(-1, scores.size(1), -1)  # B x T x S
        return scores.gather(2, index)


def _scaled(scores: Tensor, g: Optional[Tensor]) -> Tensor:
    return scores if g is None else scores * g.to(scores.dtype)


# Tests set this to False to run the context's products under autocast (bf16 with --cpu-bf16)
FP32_CONTEXT = True


def fp32_context(values: Tensor) -> bool:
    """Whether the context sum_j a_j h_j over these values (B x S x C) runs in fp32 (``context``):
    in training under CPU autocast. The decoder then hands the attention fp32 values, converted
    once per batch. Inference keeps bf16 products over a source side cast to bf16 once (beam
    search was measured and tuned in that form)."""
    return (FP32_CONTEXT and values.device.type == "cpu" and torch.is_grad_enabled()
            and torch.is_autocast_enabled("cpu"))


def context(weights: Tensor, values: Tensor) -> Tensor:
    """sum_j a_j h_j: B x M x S weights by B x S x C values -> B x M x C (M: steps or hypotheses).

    In training under CPU autocast (``fp32_context``), with fp32 values, the product runs in
    fp32, not in autocast's bf16: these are many tiny products (one per sentence, M = 1 per
    step), where torch's fp32 batched product is 2-4x as fast as its bf16 one (oneDNN). Measured
    on one core of the AMX Xeon (2026-12-06): B 32 x S 34 x C 256, forward and backward 267
    against 417 us; per --cpu-bf16 training update (sizes 256, scripts/train_ab.py) rnn_bahdanau
    1.03x, rnn_luong 1.03x, rnn_luong_nofeed (one product for all steps) 1.00x. (The scores'
    products in fp32 as well made rnn_luong 0.94x: they stay bf16.)
    """
    if values.dtype == torch.float32 and fp32_context(values):
        with torch.autocast("cpu", enabled=False):
            return stepgrad.bmm(weights.float(), values)
    return stepgrad.bmm(weights, values)


def _bdot(query: Tensor, keys: Tensor) -> Tensor:
    """Dot products of queries (B x Q or B x T x Q) with keys (B x S x Q): B x S or B x T x S."""
    # one query per sentence as a 1 x Q by Q x S product: on CPU this is ~8x faster than the
    # S x Q by Q x 1 form (a matrix-vector product per sentence)
    if query.dim() == 2:  # (in a training step loop, the keys' gradient once per batch)
        return stepgrad.bmm(query.unsqueeze(1), keys, transposed=True).squeeze(1)
    return torch.bmm(query, keys.transpose(1, 2))


# the scores that take v^T tanh(...): weight normalisation of v and coverage enter only these
ADDITIVE_SCORES = ("additive", "concat")


def build_scorer(name: str, query_dim: int, value_dim: int, attention_dim: int,
                 scale: bool = False, normalize: bool = False, coverage: bool = False,
                 max_positions: int = 1024) -> nn.Module:
    if name not in SCORERS:
        raise ValueError(f"unknown attention score {name!r}; choose one of {', '.join(SCORERS)}")
    additive = name in ADDITIVE_SCORES
    if scale and name not in ("dot", "general"):
        raise ValueError(f"attention scale (a learned gain g) applies to dot and general, not {name!r}")
    if normalize and not additive:
        raise ValueError(f"attention normalize (g v/||v||) applies to additive and concat, not {name!r}")
    if coverage and not additive:
        raise ValueError(f"coverage enters the additive/concat score, not {name!r}")
    if additive:
        return AdditiveScorer(query_dim, value_dim, attention_dim, normalize=normalize, coverage=coverage)
    if name == "dot":
        return DotScorer(query_dim, value_dim, scale=scale)
    if name == "general":
        return GeneralScorer(query_dim, value_dim, scale=scale)
    return LocationScorer(query_dim, max_positions)


def masked_softmax(scores: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
    """Softmax over the last (source) dimension with padded positions excluded.

    Padded positions get exactly zero weight. The softmax is computed in fp32 (fp64 stays fp64),
    so fp16/bf16 scores cannot overflow, and a row whose positions are all padding yields zeros,
    not NaN.
    padding_mask: B x S (or B x T x S), True at padding.
    """
    dtype = scores.dtype
    compute = torch.promote_types(dtype, torch.float32)  # fp32 at least; fp64 stays fp64
    if padding_mask is None:
        return F.softmax(scores.to(compute), dim=-1).to(dtype)
    if scores.dim() == 3 and padding_mask.dim() == 2:
        padding_mask = padding_mask.unsqueeze(1)  # B x 1 x S
    weights = F.softmax(scores.to(compute).masked_fill(padding_mask, -math.inf), dim=-1)
    # a row of only padding is NaN after the softmax (exp(-inf - -inf)); every one of its
    # positions is masked, so this sets it to zeros (elsewhere the masked weights are already 0)
    return weights.masked_fill(padding_mask, 0.0).to(dtype)


class Attention(nn.Module):
    """Attention over encoder outputs with a pluggable score function, global or local.

    global (Bahdanau eq. (5)-(6), Luong sec. 3.1): a = softmax(score(query, keys)) over the
        source (padding excluded), c = sum_j a_j h_j.
    local-m (Luong sec. 3.2): p_t = t (the 0-based target step, kept at most S-1 so that a step
        past the source's end still attends to its last words); a = softmax over the window
        [p_t - D, p_t + D] only (eq. 7 restricted to the window).
    local-p (Luong eq. (9)-(10)): p_t = S sigmoid(v_p^T tanh(W_p h_t)) with S the real source
        length; a_s = softmax over the window (as local-m) times exp(-(s - p_t)^2 / (2 sigma^2)),
        sigma = D / 2. These weights sum to less than 1, as in the paper.
    Positions s and p_t count from each sentence's first real token (see the module docstring),
    in the source as given, also with --reverse-source (the encoder maps its outputs back), so
    local-m's p_t = t assumes a monotone alignment with the source as the user wrote it.
    """

    def __init__(self, score: str, query_dim: int, value_dim: int, attention_dim: int,
                 mode: str = "global", window: int = 10, scale: bool = False,
                 normalize: bool = False, coverage: bool = False, max_positions: int = 1024):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown attention mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode != "global" and window < 1:
            raise ValueError(f"local attention needs a window D >= 1, got {window}")
        self.score_name = score
        self.mode = mode
        self.window = window
        self.coverage = coverage
        self.scorer = build_scorer(score, query_dim, value_dim, attention_dim, scale=scale,
                                   normalize=normalize, coverage=coverage, max_positions=max_positions)
        if mode == "local-p":
            self.position_proj = Linear(query_dim, attention_dim, bias=False)  # W_p (every step)
            self.position_v = nn.Linear(attention_dim, 1, bias=False)  # v_p

    def keys(self, values: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Source-side part of the score, once per sentence. values: B x S x C."""
        return self.scorer.keys(values, padding_mask)

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor,
        padding_mask: Optional[Tensor],
        step: Optional[Tensor] = None,
        coverage: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """query: N x Q or N x T x Q -> (context N x [T x] C, weights N x [T x] S), for keys,
        values and padding_mask of B source rows, N = groups * B: each source row serves
        ``groups`` consecutive queries (beam search's hypotheses of one sentence; 1 elsewhere),
        and is scored and summed once for all of them (one B x groups x Q product, not N).

        step: N (long), the 0-based target position of the (first) query, needed by local-m;
        an N x T x Q query covers steps step .. step + T - 1.
        coverage: N x S, sum of the previous steps' weights (one step at a time only).
        """
        groups = query.size(0) // keys.size(0)
        if groups * keys.size(0) != query.size(0):
            raise ValueError(f"{query.size(0)} queries for {keys.size(0)} source rows: each row "
                             f"serves the same number of consecutive queries")
        if groups > 1:  # beam search: consecutive runs of `groups` hypotheses share a source row
            grouped = query.reshape(keys.size(0), -1, query.size(-1))  # B x (groups [x T]) x Q
            if coverage is not None:
                coverage = coverage.reshape(keys.size(0), -1, coverage.size(-1))
            scores = self._scores(grouped, keys, coverage)  # B x (groups [x T]) x S
            if self.mode == "global":  # the sentence's padding mask serves all its queries
                weights = masked_softmax(scores, padding_mask).view(*query.shape[:-1], -1)
            else:  # local windows differ per query: one mask row per query
                mask = None if padding_mask is None else padding_mask.repeat_interleave(groups, dim=0)
                weights = self._local_weights(query, scores.view(*query.shape[:-1], -1), mask, step)
        else:
            scores = self._scores(query, keys, coverage)
            if self.mode == "global":
                weights = masked_softmax(scores, padding_mask)
            else:
                weights = self._local_weights(query, scores, padding_mask, step)
        # B x ([groups x] [T x]) S by B x S x C: one product per source row, in the values' dtype
        cast = weights.to(values.dtype)
        ctx = context(cast.reshape(values.size(0), -1, weights.size(-1)), values)
        if torch.is_autocast_enabled(values.device.type):
            # values cast to bf16 once for decoding (precision.cast_for_products) stand for fp32
            # values that autocast would cast inside the product: the weights returned (coverage
            # sums them) are what that path returns, not rounded to the values' dtype
            cast = weights.to(torch.promote_types(weights.dtype, values.dtype))
        return ctx.view(*weights.shape[:-1], -1), cast

    def _scores(self, query: Tensor, keys: Tensor, coverage: Optional[Tensor]) -> Tensor:
        return self.scorer(query, keys) if coverage is None else self.scorer(query, keys, coverage)

    def predict_position(self, query: Tensor, lengths: Tensor) -> Tensor:
        """local-p, Luong eq. (9): p_t = S sigmoid(v_p^T tanh(W_p h_t)); B [x T].

        Positions need more than half precision: with bf16's 8 bits the centre of a 300-word
        source moves in steps of up to S/256 positions, and the hard window drops or admits whole
        words. W_p h_t stays a product in the autocast dtype; from its result on, tanh, v_p^T and
        the sigmoid run in fp32 (an element-wise product and sum, which autocast leaves alone).
        """
        pre = over_positions(self.position_proj, query)  # B [x T] x A
        h = torch.tanh(pre.to(torch.promote_types(pre.dtype, torch.float32)))
        p = torch.sigmoid((h * self.position_v.weight[0].to(h.dtype)).sum(-1))  # B [x T]
        return lengths.view(-1, *([1] * (p.dim() - 1))).to(p.dtype) * p

    def _local_weights(self, query, scores, padding_mask, step):
        batched = scores.dim() == 3
        pos, lengths = source_positions(padding_mask, scores[:, 0] if batched else scores)  # B x S, B
        if self.mode == "local-m":
            if step is None:
                raise ValueError("local-m attention needs the target step")
            centre = step.view(-1, 1) + torch.arange(scores.size(1), device=step.device) if batched \
                else step
            centre = torch.minimum(centre, (lengths - 1).view(-1, *([1] * (centre.dim() - 1))))
            centre = centre.to(torch.promote_types(scores.dtype, torch.float32))
        else:
            centre = self.predict_position(query, lengths)  # B [x T]
        if batched:
            pos = pos.unsqueeze(1)  # B x 1 x S
        dist = pos.to(centre.dtype) - centre.unsqueeze(-1)  # B [x T] x S
        outside = dist.abs() > self.window
        if padding_mask is not None:
            outside = outside | (padding_mask.unsqueeze(1) if batched else padding_mask)
        weights = masked_softmax(scores, outside)
        if self.mode == "local-p":
            sigma = self.window / 2.0
            gauss = torch.exp(-dist.pow(2) / (2 * sigma * sigma))
            weights = weights * gauss.to(weights.dtype)
        return weights
