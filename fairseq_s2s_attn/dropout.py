"""Dropout (Srivastava et al. 2014) with cheaper random masks on the CPU.

``Dropout`` is fairseq's ``FairseqDropout`` (same options, ``apply_during_inference`` for
``--retain-dropout``), used at every dropout site of the encoder and decoder. On the CPU, torch's
dropout (``F.dropout``) fills a tensor of x's size with ``bernoulli_(1 - p)``, one draw of the
generator and one Bernoulli transform per element, scales it and keeps it for backward: measured
on one core (Intel Xeon with AMX, 2026-12-06) 4.0 ms for a 400 x 5 x 256 tensor, the largest
single cost of the element-wise work of a training update after the loss (5% of an rnn_bahdanau
--cpu-bf16 update at sizes 256).

A mask needs fewer random bits. Here every element gets 16 of them, four elements per 64-bit draw
of torch's generator (``random_`` over the whole int64 range, so that every bit is random), and
is kept when its 16 bits, read as a signed int16, are at least ``round(p * 2^16) - 2^15``:

  P(drop) = p' = round(p * 2^16) / 2^16   (|p' - p| <= 2^-17; 0.1 -> 0.100006)
  y = x * m / (1 - p'),  m in {0, 1}      (E[y] = x exactly)

The mask is kept as bool for backward (torch keeps an x-sized float tensor). One draw per four
elements and one comparison instead of a transform per element: 2.2 ms instead of 4.0-4.8 for that
tensor. The draws come from torch's default generator, so ``torch.manual_seed`` (fairseq seeds it
at every update) makes the masks reproducible as before; they are other masks than torch's for the
same seed. On other devices (CUDA: one fused kernel already) and for p >= 1, ``F.dropout``.

For fp32 and bf16 tensors the same masks' rule (16 bits per element against the same threshold)
runs in one C loop each way (``native.dropout``), whose bits come from a counter-based generator
seeded by one draw of torch's generator per call, and backward makes the mask again instead of
keeping it: forward and backward of 104 x 256 fp32 on one core 92 against 208 us. The eager path
above remains for other dtypes, under torch.compile, and where the C loops are off
(``S2S_NATIVE=0``, no compiler).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq.modules import FairseqDropout

from . import native

BITS = 16  # random bits per element


def drop_threshold(p: float) -> int:
    """The int16 threshold for P(drop) = round(p * 2^16) / 2^16: keep when bits >= it."""
    return round(p * (1 << BITS)) - (1 << (BITS - 1))


def effective_p(p: float) -> float:
    """The probability of dropping an element that the masks realise for a requested p."""
    return round(p * (1 << BITS)) / (1 << BITS)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """A bool mask of ``shape``: True with probability 1 - effective_p(p), independently."""
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    draws.random_(-(1 << 63), None)  # all 64 bits random (random_() leaves the sign bit 0)
    return draws.view(torch.int16)[:n].view(shape) >= drop_threshold(p)


class _MaskedScale(torch.autograd.Function):
    """y = x * keep * scale with keep (bool) saved for backward: dL/dx = dL/dy * keep * scale."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


def cpu_dropout(x: Tensor, p: float) -> Tensor:
    """Dropout of x (0 < p < 1) with 16-bit masks, in x's dtype: for fp32 and bf16 one C loop
    each way (``native.dropout``), else ``keep_mask``'s masks and two products."""
    scale = 1.0 / (1.0 - effective_p(p))
    if native.dropout_usable(x):
        return native.dropout(x, drop_threshold(p), scale)
    keep = keep_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, keep, scale)


class Dropout(FairseqDropout):
    """``FairseqDropout`` whose CPU masks come from ``keep_mask`` (see the module's docstring)."""

    def forward(self, x: Tensor, inplace: bool = False):
        if (self.p > 0 and (self.training or self.apply_during_inference) and not inplace
                and x.device.type == "cpu" and effective_p(self.p) < 1):
            return cpu_dropout(x, self.p)
        return super().forward(x, inplace=inplace)
