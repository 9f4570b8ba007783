"""Weight matrices prepacked for oneDNN, for ``--cpu-bf16`` decoding on CPU.

On CPU torch runs a bf16 product x W^T (``F.linear``) through oneDNN, which first reorders W
(N x K, row-major) into its own blocked layout, at every call. In beam search the decoder's
products have few rows (beam x batch: 5 at batch 1, 80 at batch 16) against the whole matrix
(the output layer: 5,992 x 256), so that reorder is a large part of each product. Reordered
once (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's weight freezing uses) and
multiplied with ``torch.ops.mkldnn._linear_pointwise``, the same products give the same bits
(oneDNN runs the same kernel on the same values; checked for every weight when it is packed) in
less time: measured on an AMD EPYC (Zen 4, one thread), the 5,992 x 256 output layer about 2x
as fast for 1-5 rows, 1.4-1.5x for 16, 1.0-1.1x for 80 (BENCHMARKS.md, 2026-12-04 18:49).

``pack_for_decoding_`` packs the decoder's per-step bf16 weight matrices (not tiny ones, see
MIN_ELEMENTS)
(``RNNS2SModel.prepare_for_inference_`` calls it after storing them in bf16: fairseq-generate,
fairseq-interactive and the hub; training and validation never pack). ``linear`` uses a
weight's packed copy where it gives the plain product's bits, and ``F.linear`` everywhere
else: with autograd recording, for a weight changed since it was packed (a new tensor, e.g.
moved off the CPU, or changed in place), or for an input that is not contiguous (the attention
keys of a B x S x C view: oneDNN's plain path then runs another kernel). ``S2S_PACK_WEIGHTS=0``
in the environment turns packing off.
"""

import logging
import os
import weakref
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import int8, stepgrad

logger = logging.getLogger(__name__)

# Smaller weights stay unpacked: the packed product costs about 15 us however small it is, and
# torch multiplies a matrix of up to 4,096 elements by one row in 3-5 us (measured on the AMD
# EPYC of BENCHMARKS.md: 128 x 32 at 1 row 5 us plain, 16 us packed; from 128 x 64 on, the
# packed product was the faster one at 1, 5 and 80 rows). Tests set it to 0.
MIN_ELEMENTS = 1 << 13

# the two oneDNN operators; tests replace PACKED_LINEAR to count the calls
REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
PACKED_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


class PackedWeight:
    """A weight's oneDNN copy, with what identifies the weight's values when it was made, and
    the bf16 copy of the fp32 bias last used with it (the RNN biases stay fp32 in --cpu-bf16
    models: cast at every step, as autocast's plain product does, they cost a cast per product)."""

    __slots__ = ("packed", "data_ptr", "version", "bias", "bias_ptr", "bias_version", "bias_bf16")

    def __init__(self, weight: Tensor, packed: Tensor):
        self.packed = packed
        self.data_ptr = weight.data_ptr()
        self.version = weight._version
        self.bias: Optional[Tensor] = None
        self.bias_ptr = self.bias_version = -1
        self.bias_bf16: Optional[Tensor] = None

    def fits(self, weight: Tensor) -> bool:
        """Whether ``weight`` still holds the values packed (the same storage, not changed in
        place: every in-place change, an optimizer's too, bumps the version counter)."""
        return weight.data_ptr() == self.data_ptr and weight._version == self.version

    def bf16_bias(self, bias: Tensor) -> Tensor:
        """``bias.to(torch.bfloat16)``, made again only for another bias tensor or after a
        change of this one: in place (its version counter) or of its storage (``bias.data = ...``
        keeps the version)."""
        if (bias is not self.bias or bias._version != self.bias_version
                or bias.data_ptr() != self.bias_ptr):
            self.bias_bf16 = bias.detach().to(torch.bfloat16)
            self.bias, self.bias_ptr, self.bias_version = bias, bias.data_ptr(), bias._version
        return self.bias_bf16


# id(weight) -> its packed copy; an entry goes when its weight is freed (weakref.finalize)
_PACKED: Dict[int, PackedWeight] = {}


def packed_weight(weight: Tensor) -> Optional[PackedWeight]:
    entry = _PACKED.get(id(weight))
    return entry if entry is not None and entry.fits(weight) else None


def available() -> bool:
    """oneDNN with bf16 kernels on this CPU (``onednn_bf16``), unless S2S_PACK_WEIGHTS=0."""
    if os.environ.get("S2S_PACK_WEIGHTS", "1") == "0":
        return False
    return onednn_bf16()


def onednn_bf16() -> bool:
    """oneDNN's two operators with bf16 kernels on this CPU (avx512_bf16 or AMX; older CPUs
    emulate bf16 more slowly, and torch may then route a bf16 product elsewhere)."""
    if REORDER is None or PACKED_LINEAR is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pack(weight: Tensor) -> Optional[PackedWeight]:
    """Packs a 2-D bf16 CPU weight of at least MIN_ELEMENTS elements, or returns None (also
    where the packed product would not give F.linear's bits on a few rows, or the operators
    fail)."""
    if (weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu"
            or weight.numel() < MIN_ELEMENTS or not available()):
        return None
    try:
        with torch.no_grad():
            packed = REORDER(weight.detach(), None)
            probe = torch.linspace(-1, 1, 5 * weight.size(1)).view(5, -1).to(weight.dtype)
            same = torch.equal(PACKED_LINEAR(probe, packed, None, "none", [], ""), F.linear(probe, weight))
    except (RuntimeError, TypeError) as err:  # an operator (or signature) this torch lacks
        logger.debug(f"oneDNN packing failed for a {tuple(weight.shape)} weight: {err}")
        return None
    if not same:
        return None
    entry = PackedWeight(weight, packed)
    key = id(weight)
    _PACKED[key] = entry
    weakref.finalize(weight, _PACKED.pop, key, None)
    return entry


def unpack(weights: Iterable[Tensor]) -> None:
    """Frees the packed copies of these weights."""
    for w in weights:
        _PACKED.pop(id(w), None)


def packed_bytes(weights: Iterable[Tensor]) -> int:
    """Bytes held by the packed copies of these weights (oneDNN's layout may pad a little)."""
    entries = [packed_weight(w) for w in weights]
    return sum(e.packed.numel() * e.packed.element_size() for e in entries if e is not None)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, weight, bias), through the weight's packed copy where it gives the same bits.

    x: ... x K (bf16, or any float dtype under CPU bf16 autocast, which casts x and the bias to
    bf16 for the plain product as here), weight N x K, bias N -> ... x N. Within a training step
    loop the weight's gradient is made once per batch instead (``stepgrad.py``); with
    ``--cpu-int8`` decoding runs through the weight's int8 copy (``int8.py``)."""
    loop_weight = stepgrad.deferred(weight)
    if loop_weight is not None:
        return loop_weight(x, bias)
    int8_copy = int8.usable(x, weight) if int8._INT8 else None
    if int8_copy is not None:  # --cpu-int8 decoding
        return int8.linear(x, int8_copy, bias)
    entry = _PACKED.get(id(weight)) if _PACKED else None
    if entry is None or torch.is_grad_enabled() or not x.is_contiguous() or not entry.fits(weight):
        return F.linear(x, weight, bias)
    if x.dtype != torch.bfloat16:
        if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            return F.linear(x, weight, bias)  # what the plain call does with these dtypes
        x = x.to(torch.bfloat16)
    if bias is not None and bias.dtype != torch.bfloat16:
        bias = entry.bf16_bias(bias)
    return PACKED_LINEAR(x, entry.packed, bias, "none", [], "")  # ... x K -> ... x N, as F.linear


class Linear(nn.Linear):
    """nn.Linear whose product goes through ``linear``: its packed weight once decoding on CPU
    in bf16 has packed it, F.linear otherwise. The same parameters and state-dict keys."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def pack_for_decoding_(weights: Iterable[Tensor]) -> int:
    """Packs each 2-D bf16 CPU weight of ``weights``; returns how many were packed."""
    return sum(pack(w) is not None for w in weights)
