"""Weight gradients of a decoder's step loop, one matrix product per weight and batch (CPU
training).

A decoder that loops over the target steps (Bahdanau, Luong with input feeding, coverage) runs
the same products at every step i: y_i = x_i W^T (+ b), x_i: B x K for the batch's B sentences
(the recurrent matrix W_h, the context's part W_x of the first layer's input, the attention's
query projection, Luong's readout W_c). Autograd makes W's gradient at every step,
dW += g_i^T x_i, a product whose inner dimension is B, and adds it to the sum so far: T small
products and T sums of an N x K matrix per weight. Under ``--cpu-bf16`` autocast those sums run
in bf16 (autograd sums the gradients of autocast's bf16 copy of W), T roundings.

Here the loop's products keep x_i and, in backward, g_i (``StepProduct``); W's gradient is made
after the last of them, by the node that gave the loop its copy of W (``LoopWeight``):
dW = G^T X with the steps' rows stacked (G: T B x N, X: T B x K), one product with T B for its
inner dimension, accumulated inside the product and rounded once; db = the column sums of G.
The products' outputs and the inputs' gradients g_i W are those of the plain path, bit for bit
(the same kernels on the same values): only the weights' and biases' gradients change, to
rounding. Measured on the demo's batches by ``scripts/train_ab.py --levers stepgrad``.

The loop's attention does the same with the source side: every step multiplies a B x S x D
tensor made once per batch (the dot and general scores' keys, the context's values) with the
step's B x 1 x K rows (the query; the weights), m_i = x_i M^T or x_i M. Autograd makes M's
gradient at every step as an outer product per sentence (g_i^T x_i or x_i^T g_i, B x S x D,
inner dimension 1) and adds it to the sum so far: two operations over B x S x D per step.
Here (``bmm``, ``LoopSourceNode``) the steps keep x_i and g_i and M's gradient is one batched
product over the stacked steps, G^T X or X^T G (inner dimension T), summed in fp32 and rounded
once (autograd sums a bf16 M's gradient in bf16, a rounding per step). Measured by
``scripts/train_ab.py --levers sources``: rnn_luong 1.09x per fp32 update, 1.06x with
``--cpu-bf16``. The decoder gives the loop its sources for the dot and general scores only: with
the additive score only the values would be deferred (its keys enter the score's own
backward), 1.01x for rnn_bahdanau, within the noise.

``step_loop(weights, like, sources)`` opens a loop: within it ``linear`` (``packed.linear``,
every ``packed.Linear``) and ``addmm`` below route the 2-D products of those weights here, and
``bmm`` the products with those sources. On for training on a CPU (autograd recording), fp32 or
``--cpu-bf16``; elsewhere (GPUs, decoding, validation) nothing changes.
"""

import contextlib
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

# tests and scripts/train_ab.py set it to False for the plain path (autograd's per-step sums)
DEFER = True
# the same for the source side's gradients alone (``bmm``): the ``sources`` lever
DEFER_SOURCES = True

# id(weight) -> its LoopWeight while a step loop is open (see step_loop), else None
_LOOP: Optional[Dict[int, "LoopWeight"]] = None
# while a loop is open: id(source) -> the source (kept alive, so that its id stays its own), and
# (id(source), transposed) -> its LoopSource, made at the source's first product
_SOURCES: Dict[int, Tensor] = {}
_SOURCE_PRODUCTS: Dict[Tuple[int, bool], "LoopSource"] = {}


def enabled(like: Tensor) -> bool:
    """Whether a step loop over tensors like ``like`` defers its weight gradients: training on a
    CPU (autograd recording). CUDA keeps autograd's per-step sums (not measured there)."""
    return DEFER and like.device.type == "cpu" and torch.is_grad_enabled()


@contextlib.contextmanager
def step_loop(weights: Iterable[Tensor], like: Tensor, sources: Iterable[Optional[Tensor]] = ()):
    """Defers the gradients of ``weights`` over the products made within (``linear``,
    ``addmm``) and those of ``sources`` (B x S x D, the attention's keys and values) over the
    batched products made within (``bmm``); tensors needing no gradient are left alone. A no-op
    where ``enabled(like)`` is false. Not re-entrant: an inner loop changes nothing."""
    global _LOOP
    if not enabled(like) or _LOOP is not None:
        yield
        return
    _LOOP = {}
    try:
        for w in weights:
            add(w)
        if DEFER_SOURCES:
            _SOURCES.update((id(m), m) for m in sources if m is not None and m.requires_grad)
        yield
    finally:
        _LOOP = None
        _SOURCES.clear()
        _SOURCE_PRODUCTS.clear()


def add(weight: Tensor) -> None:
    """Adds a weight to the open loop (one made within it, e.g. a slice of a parameter); a
    no-op without an open loop or for a weight that needs no gradient."""
    if _LOOP is not None and weight.requires_grad:
        _LOOP.setdefault(id(weight), LoopWeight(weight))


def deferred(weight: Tensor) -> Optional["LoopWeight"]:
    """The open loop's LoopWeight of ``weight``, or None."""
    return _LOOP.get(id(weight)) if _LOOP else None


def addmm(add_to: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """add_to + x W^T (B x N, B x K, N x K), the weight's gradient deferred within a loop."""
    loop_weight = deferred(weight)
    if loop_weight is not None:
        return loop_weight(x, None, add_to)
    return torch.addmm(add_to, x, weight.t())


def bmm(x: Tensor, source: Tensor, transposed: bool = False) -> Tensor:
    """x source^T (``transposed``: B x R x D by B x S x D -> B x R x S) or x source (B x R x S by
    B x S x D -> B x R x D): torch.bmm, with the source's gradient deferred where it is a source
    of the open loop (``step_loop``), as autocast would run it (bf16 products under
    ``--cpu-bf16``)."""
    if _SOURCES and id(source) in _SOURCES:
        key = (id(source), transposed)
        product = _SOURCE_PRODUCTS.get(key)
        if product is None:
            product = _SOURCE_PRODUCTS[key] = LoopSource(source, transposed)
        return product(x)
    return torch.bmm(x, source.transpose(1, 2) if transposed else source)


class Tape:
    """A loop weight's (or source's) record of its steps: per step the input x_i (B x K, in the
    products' dtype, detached) and, once backward has reached that step, its output's gradient
    g_i (B x N). The autograd nodes hold it; it holds no tensor with a graph: a reference back into
    the graph (an input's grad_fn, the weight's copy) would make a cycle through autograd's
    nodes, which Python's garbage collector cannot see, and keep every batch's steps alive."""

    def __init__(self):
        self.inputs: List[Tensor] = []
        self.grads: List[Optional[Tensor]] = []

    def record(self, ctx, x: Tensor) -> None:
        """A step's forward: keeps its input x (without its graph) and tells its node where."""
        ctx.tape, ctx.index = self, len(self.inputs)
        self.inputs.append(x.detach())
        self.grads.append(None)

    def steps(self) -> List[Tuple[Tensor, Tensor]]:
        """The loop node's backward: the (x_i, g_i) of the steps that got a gradient, whose
        gradients it then frees (a retained graph's next backward records them again)."""
        steps = [(x, g) for x, g in zip(self.inputs, self.grads) if g is not None]
        self.grads = [None] * len(self.grads)
        return steps


class LoopWeight:
    """One weight (and the bias used with it) of an open step loop: ``__call__`` runs a step's
    product, the gradients come from ``LoopWeightNode`` once per loop. Its bf16 copy (under
    --cpu-bf16) is made at the first product, as autocast's cache makes it."""

    def __init__(self, weight: Tensor):
        self.weight = weight
        self.bias: Optional[Tensor] = None
        self.copies: Optional[Tuple[Tensor, Optional[Tensor]]] = None  # W, b in the products' dtype
        self.tape = Tape()

    def __call__(self, x: Tensor, bias: Optional[Tensor] = None, add_to: Optional[Tensor] = None):
        """add_to + x W^T + b for one step (x: B x K); falls back to the plain product for
        another bias than the first call's, or for an input that is not a matrix."""
        if self.copies is None:
            self.bias = bias
            dtype = self.weight.dtype
            if torch.is_autocast_enabled(x.device.type):
                dtype = torch.get_autocast_dtype(x.device.type)
            self.copies = LoopWeightNode.apply(self.weight, bias, dtype, self.tape)
        if bias is not self.bias or x.dim() != 2 or (bias is not None and add_to is not None):
            out = torch.nn.functional.linear(x, self.weight, bias)
            return out if add_to is None else add_to + out
        w, b = self.copies
        return StepProduct.apply(x, w, b, add_to, self.tape)


class LoopWeightNode(torch.autograd.Function):
    """The loop's copy of W (and b) in the products' dtype; its backward, which autograd runs
    after every step's (they all use the copy), makes dW = G^T X and db = sum G over the steps'
    stacked rows. The steps give it no gradient of their own (None)."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype, tape: Tape):
        ctx.set_materialize_grads(False)
        ctx.tape = tape
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        w = weight.to(dtype) if weight.dtype != dtype else weight.view_as(weight)
        if bias is None:
            return w, None
        return w, (bias.to(dtype) if bias.dtype != dtype else bias.view_as(bias))

    @staticmethod
    def backward(ctx, g_w: Optional[Tensor], g_b: Optional[Tensor]):
        steps = ctx.tape.steps()
        grad_w = grad_b = None
        if steps:
            x = _stacked([x for x, _ in steps])  # T B x K
            g = _stacked([g for _, g in steps])  # T B x N
            if ctx.needs_input_grad[0]:
                grad_w = g.t().mm(x).to(ctx.dtypes[0])  # N x K
            if ctx.needs_input_grad[1]:
                grad_b = g.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(ctx.dtypes[1])
        if g_w is not None:  # the copy was used outside the steps' products as well
            grad_w = g_w.to(ctx.dtypes[0]) if grad_w is None else grad_w + g_w
        if g_b is not None:
            grad_b = g_b.to(ctx.dtypes[1]) if grad_b is None else grad_b + g_b
        return grad_w, grad_b, None, None


def _stacked(rows: List[Tensor]) -> Tensor:
    """The steps' rows stacked (T B x D); in bf16, with zero rows appended up to a bucket of
    rows (``precision.padded_rows``): T B is a new number at nearly every batch, and oneDNN
    compiles its bf16 product for every new shape. Zero rows add nothing to G^T X or to sum G."""
    from . import precision  # precision imports packed, which imports this module

    n = sum(r.size(0) for r in rows)
    size = precision.padded_rows(n) if precision.PAD_ROWS and rows[0].dtype == torch.bfloat16 else n
    out = rows[0].new_empty(size, rows[0].size(1))
    torch.cat(rows, out=out[:n])
    out[n:].zero_()
    return out


class StepProduct(torch.autograd.Function):
    """add_to + x W^T + b for one step (x: B x K in any float dtype, W, b: the loop's copies);
    backward returns the gradients of x and add_to and records g for W's (LoopWeightNode)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], add_to: Optional[Tensor],
                tape: Tape):
        ctx.set_materialize_grads(False)
        x_c = x.to(w.dtype)  # autocast's cast of the input (none in fp32)
        if add_to is not None:
            out = torch.addmm(add_to.to(w.dtype), x_c, w.t())  # B x N
        elif b is not None:
            out = torch.addmm(b, x_c, w.t())
        else:
            out = torch.mm(x_c, w.t())
        ctx.save_for_backward(w)
        ctx.dtypes = (x.dtype, None if add_to is None else add_to.dtype)
        tape.record(ctx, x_c)
        return out

    @staticmethod
    def backward(ctx, g: Optional[Tensor]):
        if g is None:
            return None, None, None, None, None
        (w,) = ctx.saved_tensors
        ctx.tape.grads[ctx.index] = g
        grad_x = g.mm(w).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None  # B x K
        grad_add = g.to(ctx.dtypes[1]) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_add, None


class LoopSource:
    """One source tensor M (B x S x D) of an open loop, in products of one orientation: its copy
    in the products' dtype (made at the first product, once per batch) and the steps' tape."""

    def __init__(self, source: Tensor, transposed: bool):
        self.source = source
        self.transposed = transposed
        self.copy: Optional[Tensor] = None
        self.tape = Tape()

    def __call__(self, x: Tensor) -> Tensor:
        if self.copy is None:
            dtype = self.source.dtype
            device = x.device.type
            if torch.is_autocast_enabled(device) and dtype in (torch.float32, torch.float16,
                                                               torch.bfloat16):
                dtype = torch.get_autocast_dtype(device)  # autocast's bmm casts both operands
            self.copy = LoopSourceNode.apply(self.source, dtype, self.transposed, self.tape)
        return StepBmm.apply(x, self.copy, self.transposed, self.tape)


class LoopSourceNode(torch.autograd.Function):
    """The loop's copy of a source M in the products' dtype; its backward, after every step's,
    makes M's gradient from the steps' stacked rows (X: B x T R x K, G: B x T R x N):
    G^T X for products x M^T, X^T G for products x M, in the products' dtype (a bf16 product
    sums in fp32 inside and rounds once)."""

    @staticmethod
    def forward(ctx, source: Tensor, dtype: torch.dtype, transposed: bool, tape: Tape):
        ctx.set_materialize_grads(False)
        ctx.tape, ctx.transposed, ctx.dtype = tape, transposed, source.dtype
        return source.to(dtype) if source.dtype != dtype else source.view_as(source)

    @staticmethod
    def backward(ctx, g_copy: Optional[Tensor]):
        steps = ctx.tape.steps()
        grad = None
        if steps:
            with torch.autocast(steps[0][0].device.type, enabled=False):
                x = torch.cat([x for x, _ in steps], 1)  # B x T R x K
                g = torch.cat([g for _, g in steps], 1)  # B x T R x N
                grad = (torch.bmm(g.transpose(1, 2), x) if ctx.transposed
                        else torch.bmm(x.transpose(1, 2), g)).to(ctx.dtype)  # B x S x D
        if g_copy is not None:  # the copy was used outside the steps' products as well
            grad = g_copy.to(ctx.dtype) if grad is None else grad + g_copy
        return grad, None, None, None


class StepBmm(torch.autograd.Function):
    """One step's x M^T or x M (x: B x R x K in any float dtype, M: the loop's copy); backward
    returns x's gradient and records g for M's (LoopSourceNode)."""

    @staticmethod
    def forward(ctx, x: Tensor, m: Tensor, transposed: bool, tape: Tape):
        ctx.set_materialize_grads(False)
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(m.dtype)  # autocast's cast of the rows (none in fp32)
            out = torch.bmm(x_c, m.transpose(1, 2) if transposed else m)
        ctx.save_for_backward(m)
        ctx.transposed, ctx.dtype = transposed, x.dtype
        tape.record(ctx, x_c)
        return out

    @staticmethod
    def backward(ctx, g: Optional[Tensor]):
        if g is None:
            return None, None, None, None
        (m,) = ctx.saved_tensors
        ctx.tape.grads[ctx.index] = g
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(g, m if ctx.transposed else m.transpose(1, 2)).to(ctx.dtype)
        return grad_x, None, None, None
