"""int8 weight matrices for decoding on CPU (``--cpu-int8``): the decoder's per-step products
through fbgemm's dynamic int8 kernel.

Beam search on a CPU spends about half its time in the decoder's per-step matrix products (the
output layer, vocabulary x dim, the largest: BENCHMARKS.md's profiles), each over few rows
(beam x batch) against a whole weight matrix. With ``--cpu-int8`` each of the decoder's step
weights (``RNNDecoder.step_weights``: the RNN's input and recurrent matrices, the per-step
projections, the output layer) gets an int8 copy, symmetric with one scale per output row
(w ~ scale_n * q, q in [-127, 127]: the rounding error of a row is at most half its scale, a
254th of its largest weight). At each call the input x is quantized too, to 7-bit unsigned
integers with one scale and zero point for the call (fbgemm's dynamic quantization with
``reduce_range``, which no CPU's int8 instructions can overflow), the product runs in integers
and is scaled back to fp32 with the bias added (``torch.ops.quantized.linear_dynamic``). The
output layer's logits stay fp32 (the log-softmax reads them so); the other products give what
the plain product gives (bf16 under --cpu-bf16's autocast).

It changes the numbers, unlike ``--cpu-bf16``'s storage and packing: scores move by the
activations' 7-bit rounding, and since one scale covers the call's rows, a hypothesis's scores
depend a little on the other hypotheses of its batch. What it costs in translations is measured
in README.md ("Speed and precision on CPU"). Training never uses it (the copies are made by
``RNNS2SModel.prepare_for_inference_`` only, for fairseq-generate, fairseq-interactive and the
hub), and a product that records a gradient runs the plain way.

``linear`` (called by ``packed.linear``, the decoder's product) uses a weight's int8 copy while
the weight holds the values it was made from (an in-place change bumps its version, a move or a
cast gives it new storage: then the plain product runs, as for ``packed.py``'s copies), on a CPU
input. ``ENABLED = False`` turns the copies off (tests).

torch marks its quantized tensor types (here a per-channel qint8 tensor hands the int8 weight
to fbgemm's packing) as deprecated, to be removed in a later release; where the operators are
missing, ``available`` is False and decoding runs without int8, with a warning.
"""

import logging
import warnings
import weakref
from typing import Dict, Iterable, Optional

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# tests turn the copies off: every product runs the plain way
ENABLED = True

# Smaller weights stay plain, as in packed.py (a product's fixed cost outweighs its work)
MIN_ELEMENTS = 1 << 13


def _op(name):
    try:
        return getattr(torch.ops.quantized, name)
    except (AttributeError, RuntimeError):  # a torch without it
        return None


# fbgemm's operators; tests replace LINEAR_DYNAMIC to count the calls
LINEAR_DYNAMIC, PREPACK, UNPACK = _op("linear_dynamic"), _op("linear_prepack"), _op("linear_unpack")

# fbgemm's 7-bit activations: CPUs without VNNI multiply pairs of u8 x s8 into int16 sums,
# which 8-bit activations can overflow; with reduce_range none can, on every x86 CPU
REDUCE_RANGE = True


class Int8Weight:
    """A weight's int8 copy (fbgemm's packed form), with what identifies the weight's values when
    it was made (as ``packed.PackedWeight``), and the copy packed with the bias last used with it
    (fbgemm adds a packed bias while it scales the integer sums back: no pass of its own)."""

    __slots__ = ("params", "data_ptr", "version", "rows", "fp32_out",
                 "bias", "bias_ptr", "bias_version", "with_bias")

    def __init__(self, weight: Tensor, params, fp32_out: bool = False):
        self.params = params
        self.data_ptr = weight.data_ptr()
        self.version = weight._version
        self.rows = weight.size(0)
        self.fp32_out = fp32_out
        self.bias: Optional[Tensor] = None
        self.bias_ptr = self.bias_version = -1
        self.with_bias = None

    def fits(self, weight: Tensor) -> bool:
        return weight.data_ptr() == self.data_ptr and weight._version == self.version

    def params_with(self, bias: Tensor):
        """The int8 weight packed with ``bias`` (as fp32), packed again only for another bias
        tensor or after a change of this one (in place, or of its storage)."""
        if (bias is not self.bias or bias._version != self.bias_version
                or bias.data_ptr() != self.bias_ptr):
            qweight, _ = UNPACK(self.params)
            self.with_bias = PREPACK(qweight, bias.detach().float())
            self.bias, self.bias_ptr, self.bias_version = bias, bias.data_ptr(), bias._version
        return self.with_bias


# id(weight) -> its int8 copy; an entry goes when its weight is freed (weakref.finalize)
_INT8: Dict[int, Int8Weight] = {}
_AVAILABLE: Optional[bool] = None


def quantize_rows(weight: Tensor):
    """A 2-D weight (N x K, any float dtype) as int8 with one scale per row: (q int8 N x K,
    scale fp64 N), weight ~ scale[:, None] * q. An all-zero row gets scale 1."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1).double() / 127).masked_fill_(w.abs().amax(dim=1) == 0, 1.0)
    q = torch.round(w.double() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _prepack(weight: Tensor):
    q, scale = quantize_rows(weight)
    with warnings.catch_warnings():  # torch's notice that its quantized tensor types will go
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
        qw = torch._make_per_channel_quantized_tensor(q, scale, torch.zeros_like(scale, dtype=torch.long), 0)
    return PREPACK(qw, None)


def available() -> bool:
    """Whether this torch has fbgemm's dynamic int8 product for this CPU (checked once, on a
    small product)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            w = torch.linspace(-1, 1, 64).view(8, 8)
            y = LINEAR_DYNAMIC(torch.ones(2, 8), _prepack(w), REDUCE_RANGE)
            _AVAILABLE = bool(torch.allclose(y, torch.ones(2, 8) @ w.t(), atol=0.1))
        except (TypeError, RuntimeError, NotImplementedError) as err:  # TypeError: an op is None
            logger.debug(f"no int8 dynamic product: {err}")
            _AVAILABLE = False
    return _AVAILABLE


def pack(weight: Tensor, fp32_out: bool = False) -> Optional[Int8Weight]:
    """Makes the int8 copy of a 2-D CPU weight of at least MIN_ELEMENTS elements, or returns
    None. ``fp32_out``: its products stay fp32 (the output layer's logits, which the
    log-softmax reads in fp32 anyway)."""
    if (weight.dim() != 2 or not weight.is_floating_point() or weight.device.type != "cpu"
            or weight.numel() < MIN_ELEMENTS or not available()):
        return None
    entry = Int8Weight(weight, _prepack(weight), fp32_out)
    key = id(weight)
    _INT8[key] = entry
    weakref.finalize(weight, _INT8.pop, key, None)
    return entry


def int8_weight(weight: Tensor) -> Optional[Int8Weight]:
    entry = _INT8.get(id(weight))
    return entry if entry is not None and entry.fits(weight) else None


def pack_for_decoding_(weights: Iterable[Tensor], output: Optional[Tensor] = None) -> int:
    """Makes the int8 copy of each CPU weight of ``weights`` (``output``: the output layer's,
    whose logits stay fp32); returns how many were made. Warns where this torch cannot."""
    weights = [w for w in weights if w.device.type == "cpu"]
    if weights and not available():
        logger.warning("--cpu-int8: this torch has no int8 dynamic product for this CPU "
                       "(torch.ops.quantized.linear_dynamic); decoding runs without int8")
        return 0
    return sum(pack(w, fp32_out=w is output) is not None for w in weights)


def unpack(weights: Iterable[Tensor]) -> None:
    for w in weights:
        _INT8.pop(id(w), None)


def usable(x: Tensor, weight: Tensor) -> Optional[Int8Weight]:
    """The int8 copy of ``weight`` to multiply x with, or None (no copy, a stale one, turned
    off, a gradient recorded, an input off the CPU)."""
    entry = _INT8.get(id(weight)) if _INT8 and ENABLED else None
    if entry is None or torch.is_grad_enabled() or x.device.type != "cpu" or not entry.fits(weight):
        return None
    return entry


def linear(x: Tensor, entry: Int8Weight, bias: Optional[Tensor] = None) -> Tensor:
    """x W^T + b through W's int8 copy. x: ... x K (any float dtype), bias N or None -> ... x N,
    in the dtype the plain product gives (the autocast dtype under CPU autocast: bf16 with
    --cpu-bf16; else x's), or fp32 for the output layer."""
    lead = x.shape[:-1]
    params = entry.params if bias is None else entry.params_with(bias)
    y = LINEAR_DYNAMIC(x.reshape(-1, x.size(-1)).float(), params, REDUCE_RANGE)  # rows x N, fp32
    y = y.view(*lead, entry.rows)
    if entry.fp32_out:
        return y
    return y.to(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype)
