"""Attention: one module, interchangeable score functions.

Every scorer splits its work into a part that depends only on the source (``keys``, computed
once per sentence and cached across decoder steps) and a part that depends on the decoder state
(``forward``, computed per step or, where the math allows, for all steps at once).

Shapes (B = batch, S = source length, T = target steps, C = encoder output size,
Q = decoder query size, A = attention hidden size):

    values: B x S x C      keys: B x S x K      query: B x Q  or  B x T x Q
    scores / weights: B x S  or  B x T x S       context: B x C  or  B x T x C
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SCORERS = ("additive", "dot", "general", "concat")


class AdditiveScorer(nn.Module):
    """Bahdanau et al. (2014), eq. (6) / Appendix A.1.2: e_ij = v^T tanh(W s + U h_j).

    Luong et al. (2015)'s *concat* score, v^T tanh(W_a [h_t; h_s]), is the same function
    (W_a [h_t; h_s] = W h_t + U h_s), so ``concat`` is served by this class.
    U h_j (with the bias) is the key, computed once per sentence.
    """

    def __init__(self, query_dim: int, value_dim: int, attention_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)  # W
        self.key_proj = nn.Linear(value_dim, attention_dim, bias=True)  # U (+ bias)
        self.v = nn.Linear(attention_dim, 1, bias=False)  # v

    def keys(self, values: Tensor) -> Tensor:
        # B x S x C -> B x S x A
        return self.key_proj(values)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        q = self.query_proj(query)  # B x A  or  B x T x A
        if q.dim() == 2:
            return self.v(torch.tanh(keys + q.unsqueeze(1))).squeeze(-1)  # B x S
        # B x T x 1 x A + B x 1 x S x A -> B x T x S
        return self.v(torch.tanh(keys.unsqueeze(1) + q.unsqueeze(2))).squeeze(-1)


class DotScorer(nn.Module):
    """Luong et al. (2015), eq. (8) *dot*: score(h_t, h_s) = h_t^T h_s."""

    def __init__(self, query_dim: int, value_dim: int):
        super().__init__()
        if query_dim != value_dim:
            raise ValueError(
                f"dot attention needs the decoder state size ({query_dim}) to equal the encoder "
                f"output size ({value_dim}); use 'general' or 'concat', or match the sizes"
            )

    def keys(self, values: Tensor) -> Tensor:
        return values

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        return _bdot(query, keys)


class GeneralScorer(nn.Module):
    """Luong et al. (2015), eq. (8) *general*: score(h_t, h_s) = h_t^T W_a h_s.

    The key W_a h_s is computed once per sentence; each step is then a dot product.
    """

    def __init__(self, query_dim: int, value_dim: int):
        super().__init__()
        self.key_proj = nn.Linear(value_dim, query_dim, bias=False)  # W_a

    def keys(self, values: Tensor) -> Tensor:
        return self.key_proj(values)  # B x S x Q

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        return _bdot(query, keys)


def _bdot(query: Tensor, keys: Tensor) -> Tensor:
    """Dot products of queries (B x Q or B x T x Q) with keys (B x S x Q): B x S or B x T x S."""
    if query.dim() == 2:
        return torch.bmm(keys, query.unsqueeze(2)).squeeze(2)
    return torch.bmm(query, keys.transpose(1, 2))


def build_scorer(name: str, query_dim: int, value_dim: int, attention_dim: int) -> nn.Module:
    if name in ("additive", "concat"):
        return AdditiveScorer(query_dim, value_dim, attention_dim)
    if name == "dot":
        return DotScorer(query_dim, value_dim)
    if name == "general":
        return GeneralScorer(query_dim, value_dim)
    raise ValueError(f"unknown attention score {name!r}; choose one of {', '.join(SCORERS)}")


def masked_softmax(scores: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
    """Softmax over the last (source) dimension with padded positions excluded.

    Padded positions get exactly zero weight. The softmax is computed in fp32 (fp64 stays fp64),
    so fp16/bf16 scores cannot overflow, and a row whose positions are all padding yields zeros,
    not NaN.
    padding_mask: B x S, True at padding.
    """
    dtype = scores.dtype
    compute = torch.promote_types(dtype, torch.float32)  # fp32 at least; fp64 stays fp64
    if padding_mask is None:
        return F.softmax(scores.to(compute), dim=-1).to(dtype)
    if scores.dim() == 3:
        padding_mask = padding_mask.unsqueeze(1)  # B x 1 x S
    scores = scores.to(compute).masked_fill(padding_mask, -math.inf)
    # a row of only padding: max is -inf; subtract 0 there so exp() gives 0, not NaN
    row_max = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(compute).min)
    expo = torch.exp(scores - row_max)
    denom = expo.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(compute).tiny)
    return (expo / denom).to(dtype)


class Attention(nn.Module):
    """Global attention over encoder outputs with a pluggable score function.

    weights a = softmax(score(query, keys)) over source positions (padding excluded),
    context c = sum_j a_j h_j (Bahdanau eq. (5), Luong eq. (7) / sec. 3.1).
    """

    def __init__(self, score: str, query_dim: int, value_dim: int, attention_dim: int):
        super().__init__()
        self.score_name = score
        self.scorer = build_scorer(score, query_dim, value_dim, attention_dim)

    def keys(self, values: Tensor) -> Tensor:
        """Source-side part of the score, once per sentence. values: B x S x C."""
        return self.scorer.keys(values)

    def forward(
        self, query: Tensor, keys: Tensor, values: Tensor, padding_mask: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """query: B x Q or B x T x Q -> (context B x [T x] C, weights B x [T x] S)."""
        weights = masked_softmax(self.scorer(query, keys), padding_mask).to(values.dtype)
        if weights.dim() == 2:
            context = torch.bmm(weights.unsqueeze(1), values).squeeze(1)
        else:
            context = torch.bmm(weights, values)
        return context, weights
