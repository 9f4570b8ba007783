"""Cross-entropy with the output layer fused in: ``--criterion fused_cross_entropy`` and
``--criterion fused_label_smoothed_cross_entropy``, the same losses, options and logged values as
fairseq's ``cross_entropy`` and ``label_smoothed_cross_entropy``, computed with less memory and
fewer passes over the B x T x V logits.

Which fairseq behaviour this changes, and why: fairseq's criterions take the model's logits
(N x V for N = B x T target positions), make an fp32 log-softmax of them (``utils.log_softmax``)
that autograd keeps for backward, and backward builds two more N x V fp32 tensors (the loss's
gradient, a zero-filled tensor with one entry per row, then log-softmax's gradient) before the
output layer's products; under ``--cpu-bf16`` a bf16 copy of the last one as well. At the demo's
sizes (2,000 tokens x 5,992 pieces) each is 48 MB; they are the largest tensors of an update,
and every pass over them runs at memory speed. Here (``OutputLayerLoss``, Bahdanau et al. 2014
and Luong et al. 2015 both train with this loss):

- forward: logits z = x W^T + b in the products' dtype (bf16 under ``--cpu-bf16``, as autocast
  makes them; there oneDNN's product adds b as it writes z, ``_logits``); then, a few rows at a
  time (cache-sized chunks; on a CPU one row at a time in a C loop, ``native.loss_rows``) in
  fp32, each row's log-sum-exp
  lse and sum_j z_j give -log p(target) = lse - z_t and (with label smoothing)
  -sum_j log p_j = V lse - sum_j z_j;
- and the gradient: dL/dz = c_nll (p - onehot) + c_smooth (V p - 1) (the loss's two
  coefficients, for an upstream gradient of 1, fairseq-train's ``loss.backward()``), made in the
  same pass from each row's log-sum-exp while the chunk is in the cache and written over z
  itself (one rounding), padding rows zeroed. Backward is then the output layer's products alone,
  scaled by the upstream gradient. One N x V tensor in all instead of four, read by the loss
  once. On CUDA the forward reads the padding rows to the host once per update (not per step).
  (``FORWARD_GRADIENT`` off, and for fp16 logits, where fairseq's loss scale, the upstream
  gradient, keeps the gradient's small values out of fp16's subnormal range: torch's
  log_softmax row kernel forward, the gradient from its softmax in backward, the path this
  replaced; ``scripts/train_ab.py --levers loss`` measures the two.)

With ``--report-accuracy`` (label-smoothed) fairseq counts the rows whose argmax is the target;
torch's argmax over a row runs about 20x slower than its max on a CPU, and took ~35 ms of a
~200 ms ``--cpu-bf16`` update at the demo's sizes. On a CPU each chunk's hits come from its
maxima instead (``_argmax_hits``: one sign pass over z - max counts them; a row with one maximum
hits iff the target's entry is it); rows with ties or non-finite values take torch's argmax, so
the count is argmax's (``ARGMAX_BY_COUNT``; ``scripts/train_ab.py --levers accuracy
--report-accuracy`` measures the two).

In ``--cpu-bf16`` training the N rows (features and targets) are first padded to a bucket of
rows (``precision.padded_rows``; padding targets, so the extra rows add nothing to the loss, the
counts or the gradients): oneDNN compiles the output layer's three products once per bucket
instead of once per batch.

The loss is fairseq's: label_smoothed_nll_loss's (1 - eps - eps_i) nll + eps_i smooth with
eps_i = eps / (V - 1). Models other than ours (fairseq's ``lstm``, ``transformer``, ...) and
``reduce=False`` take the parent criterion's path unchanged.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from . import native, packed
from .precision import pad_rows, pads_rows

# elements per chunk of rows: about 1 MB of fp32 on a CPU (stays in its L2 cache across the
# chunk's passes); on a GPU large chunks, so that a chunk's kernels fill the device
CHUNK_ELEMENTS = {"cpu": 1 << 18}
GPU_CHUNK_ELEMENTS = 1 << 24

# the forward writes the loss's gradient over the logits while each chunk of rows is in the
# cache (_loss_and_gradient); tests and scripts/train_ab.py set it to False for torch's
# log_softmax (forward) and softmax (backward) row kernels, the path it replaced
FORWARD_GRADIENT = True

# fp32 logits: each chunk worked on in place (_loss_and_gradient); tests and
# scripts/train_ab.py set it to False for the copy into an fp32 buffer and back, as bf16 does
IN_PLACE_CHUNKS = True

# bf16 logits on a CPU: the bias added by oneDNN's product (_logits); tests and
# scripts/train_ab.py set it to False for torch's F.linear (addmm), the path it replaced
BIAS_IN_PRODUCT = True

# --report-accuracy on a CPU: whether each row's argmax is its target from the count of the row's
# maxima (_argmax_hits); tests and scripts/train_ab.py set it to False for torch's argmax of
# every row, the path it replaced
ARGMAX_BY_COUNT = True


def _rows_per_chunk(logits: Tensor) -> int:
    elements = CHUNK_ELEMENTS.get(logits.device.type, GPU_CHUNK_ELEMENTS)
    return max(1, elements // max(1, logits.size(1)))


class OutputLayerLoss(torch.autograd.Function):
    """The loss c_nll nll + c_smooth smooth (an fp32 scalar), nll (for logging) and the number of
    correct argmax predictions, from features x (N x C), the output layer's weight W (V x C) and
    bias b (V or None) and targets (N): nll = -sum log p(target) and smooth = -sum_j log p_j,
    summed over the rows whose target is not padding. Only the loss has a gradient.

    Per chunk of rows the fp32 work runs on a chunk that stays in the cache, never an N x V fp32
    tensor. With FORWARD_GRADIENT the forward also writes the loss's gradient for an upstream
    gradient of 1 (fairseq-train's ``loss.backward()``) over the chunk's logits
    (``_loss_and_gradient``), and backward scales the output layer's products by the upstream
    gradient: the N x V block is read once more by the loss instead of twice and written once
    instead of twice. Without it, torch's log_softmax row kernel forward and the gradient from its
    softmax in backward (``_log_softmax_rows``, ``_write_gradient``)."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                padding_idx: int, dtype: torch.dtype, c_nll: float, c_smooth: float,
                accuracy: bool):
        device = features.device.type
        smooth = c_smooth != 0
        with torch.autocast(device, enabled=False):
            x = features.to(dtype)  # N x C
            w = weight.to(dtype)  # V x C
            logits = _logits(x, w, None if bias is None else bias.to(dtype))  # N x V
            acc = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 models
            keep = target.ne(padding_idx)  # N
            # not in fp16 (--fp16 on a GPU), where the upstream gradient is fairseq's loss scale,
            # which lifts the gradient's small values out of fp16's subnormal range
            ctx.gradient_written = FORWARD_GRADIENT and dtype != torch.float16
            if ctx.gradient_written:
                nll, smooth_rows, hits = _loss_and_gradient(logits, target, acc, c_nll, c_smooth,
                                                            accuracy)
                logits.index_fill_(0, keep.logical_not().nonzero().squeeze(1), 0)  # padding rows
            else:  # torch's log_softmax row kernel, the log-probabilities of a chunk at a time
                nll, smooth_rows = _log_softmax_rows(logits, target, acc, smooth)
                hits = logits.argmax(1).eq(target) if accuracy else None
            zero = nll.new_zeros(())
            nll_sum = torch.where(keep, nll, zero).sum()
            # fairseq's smooth_loss: -sum_j log p_j over the row
            smooth_sum = torch.where(keep, smooth_rows, zero).sum() if smooth else zero
            # as label_smoothed_nll_loss: (1 - eps - eps_i) nll + eps_i smooth
            loss = c_nll * nll_sum + c_smooth * smooth_sum
            correct = (hits & keep).sum() if accuracy else zero.long()
        ctx.mark_non_differentiable(nll_sum, correct)
        ctx.coefficients = (c_nll, c_smooth)
        ctx.has_bias = bias is not None
        ctx.dtypes = (features.dtype, weight.dtype, None if bias is None else bias.dtype, acc)
        ctx.save_for_backward(x, w, logits, target, keep)
        return loss, nll_sum, correct

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss: Tensor, _g_nll, _g_correct):
        # saved_tensors checks that the logits were not overwritten since: without
        # FORWARD_GRADIENT a second backward through the same graph (retain_graph=True) raises
        # instead of using the gradient written below; with it, it gives the same gradients
        x, w, logits, target, keep = ctx.saved_tensors
        acc = ctx.dtypes[3]
        g = float(g_loss)
        with torch.autocast(x.device.type, enabled=False):
            if ctx.gradient_written:  # dL/dz for an upstream gradient of 1: scale the products
                scale = g
            else:  # dL/dz = g (c_nll (p - onehot) + c_smooth (V p - 1))
                c_nll, c_smooth = ctx.coefficients
                _write_gradient(logits, target, acc, g * c_nll, g * c_smooth)
                logits.index_fill_(0, keep.logical_not().nonzero().squeeze(1), 0)
                scale = 1.0
            grad = logits  # N x V
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = _scaled(grad.mm(w), scale, ctx.dtypes[0])  # N x C
            if ctx.needs_input_grad[1]:
                grad_w = _scaled(grad.t().mm(x), scale, ctx.dtypes[1])  # V x C
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = _scaled(_column_sums(grad, acc, _rows_per_chunk(grad)), scale, ctx.dtypes[2])
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _logits(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """F.linear(x, w, b): x N x C, w V x C, b V -> N x V, with the same bits. For bf16 on a CPU
    through oneDNN's product with the bias (``packed.PACKED_LINEAR`` on the plain weight), which
    adds it as it writes the output: torch's addmm first writes the bias over the whole N x V
    output and has the product add to it (measured on an Intel Xeon with AMX, one thread, 2,048 x
    256 x 5,992: 6.1 against 4.4 ms, the product alone 4.4; fp32 products go to MKL, where the
    bias costs nothing). Elsewhere F.linear (and for a strided x, for which oneDNN's plain path
    may run another kernel than F.linear's)."""
    if (BIAS_IN_PRODUCT and b is not None and x.dtype == torch.bfloat16
            and x.device.type == "cpu" and x.is_contiguous() and packed.onednn_bf16()):
        return packed.PACKED_LINEAR(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _scaled(x: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """x in ``dtype``, times ``scale`` (after the conversion: one rounding of the product)."""
    x = x.to(dtype)
    return x if scale == 1.0 else x.mul_(scale)


def _loss_and_gradient(logits: Tensor, target: Tensor, acc: torch.dtype, c_nll: float,
                       c_smooth: float, accuracy: bool
                       ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Per row of the logits z (N x V): -log p(target) = lse - z_t, (for c_smooth != 0)
    -sum_j log p_j = V lse - sum_j z_j (lse = log sum_j exp z_j), in ``acc``, and (with accuracy)
    whether argmax_j z_j is the target (``_argmax_hits`` on a CPU); N each. Overwrites z with the
    gradient of c_nll nll + c_smooth smooth, dL/dz = c_nll (p - onehot) + c_smooth (V p - 1) =
    scale p - c_smooth - c_nll onehot(target), scale = c_nll + V c_smooth (one rounding to z's
    dtype).

    A chunk of rows at a time in one ``acc`` buffer that stays in the cache: copy in
    (converting), row maxima m, row sums, e = exp(z - m) in place and its row sums s (lse =
    m + log s), then scale p = e (scale / s), the constant and the target's term, copy out.
    Logits already in ``acc`` (fp32 training) are their own buffer: each chunk is worked on in
    place, without the two copies (not with --report-accuracy, whose hits read the logits next
    to the shifted values). On a CPU (fp32 or bf16 logits, without accuracy) the same in one C
    loop over the rows instead (``native.loss_rows``)."""
    n, vocab = logits.shape
    smooth = c_smooth != 0
    scale = c_nll + vocab * c_smooth
    z_target = logits.gather(1, target.unsqueeze(1)).squeeze(1).to(acc)  # N
    if not accuracy and native.loss_rows_usable(logits, target, acc):  # CPU: one C loop
        lse, total = native.loss_rows(logits, target, c_nll, c_smooth, smooth)
        return lse - z_target, (lse * vocab - total) if smooth else None, None
    lse = logits.new_empty(n, dtype=acc)  # N
    total = logits.new_empty(n, dtype=acc) if smooth else None  # N: sum_j z_j
    hits = logits.new_empty(n, dtype=torch.bool) if accuracy else None
    rows = _rows_per_chunk(logits)
    fast_hits = accuracy and ARGMAX_BY_COUNT and logits.device.type == "cpu"
    # (not with accuracy: its hits, counted or by argmax, read the logits next to the shifted z)
    in_place = IN_PLACE_CHUNKS and logits.dtype == acc and not accuracy
    buf = None if in_place else logits.new_empty(min(rows, n), vocab, dtype=acc)
    scratch = torch.empty_like(buf) if fast_hits else None
    onehot = logits.new_full((min(rows, n), 1), -c_nll, dtype=acc)
    for r in range(0, n, rows):
        chunk = logits[r:r + rows]  # k x V, overwritten by dL/dz
        k = chunk.size(0)
        z = chunk if in_place else buf[:k].copy_(chunk)
        m = z.amax(1)  # k
        if smooth:
            torch.sum(z, 1, out=total[r:r + k])
        z.sub_(m.unsqueeze(1))  # z - max: <= 0, 0 at the row's maxima
        if fast_hits:
            _argmax_hits(z, m, chunk, target[r:r + k], scratch[:k], hits[r:r + k])
        elif accuracy:  # (a GPU's argmax is fast, and this needs no host read)
            torch.eq(chunk.argmax(1), target[r:r + k], out=hits[r:r + k])
        z.exp_()
        s = z.sum(1)  # k
        torch.add(s.log(), m, out=lse[r:r + k])
        z.mul_(s.reciprocal_().mul_(scale).unsqueeze(1))  # scale p
        if smooth:
            z.sub_(c_smooth)
        z.scatter_add_(1, target[r:r + k].unsqueeze(1), onehot[:k])
        if not in_place:
            chunk.copy_(z)
    return lse - z_target, (lse * vocab - total) if smooth else None, hits


def _argmax_hits(shifted: Tensor, row_max: Tensor, logits: Tensor, target: Tensor,
                 scratch: Tensor, out: Tensor) -> None:
    """out (k, bool) = whether torch.argmax of each row of ``logits`` (k x V) is its target, from
    shifted = logits - row_max (in ``acc``, <= 0, exactly 0 at the row's maxima). For
    --report-accuracy: torch's argmax over a row is about 20x slower than its max on a CPU (345
    against 16 us for 43 x 5,992 fp32 rows; ~35 ms of a --cpu-bf16 update at the demo's sizes).
    A row's maxima are counted with one sign pass, V + sum_j sign(shifted_j); where there is one,
    argmax hits the target iff shifted is 0 there. Rows with several maxima (ties) and rows whose
    max is not finite (NaN, whose sign counts as 0, or +-inf) take torch's argmax of their
    logits, the first maximum: the same answers as argmax everywhere."""
    torch.sign(shifted, out=scratch)
    count = scratch.sum(1).add_(shifted.size(1))  # k: the row's maxima (exact below 2^24)
    at_target = shifted.gather(1, target.unsqueeze(1)).squeeze(1).eq(0)
    single = count.eq(1).logical_and_(row_max.isfinite())
    torch.logical_and(at_target, single, out=out)
    ties = single.logical_not_().nonzero().squeeze(1)  # a host read: CPU only
    if ties.numel():
        out[ties] = logits[ties].argmax(1).eq(target[ties])


def _log_softmax_rows(logits: Tensor, target: Tensor, acc: torch.dtype, smooth: bool
                      ) -> Tuple[Tensor, Optional[Tensor]]:
    """The same -log p(target) and -sum_j log p_j (N each) from torch's log_softmax row kernel
    over a chunk of rows at a time (the plain path: FORWARD_GRADIENT off)."""
    n = logits.size(0)
    logp = logits.new_empty(n, dtype=acc)  # N: log p(target)
    total = logits.new_empty(n, dtype=acc) if smooth else None  # N: sum_j log p_j
    rows = _rows_per_chunk(logits)
    for r in range(0, n, rows):
        lprobs = torch.log_softmax(logits[r:r + rows], 1, dtype=acc)  # n x V
        torch.gather(lprobs, 1, target[r:r + rows].unsqueeze(1), out=logp[r:r + rows, None])
        if smooth:
            torch.sum(lprobs, 1, out=total[r:r + rows])
    return logp.neg_(), total.neg_() if smooth else None


def _write_gradient(logits: Tensor, target: Tensor, acc: torch.dtype, g_nll: float,
                    g_smooth: float) -> None:
    """Overwrites the logits z (N x V) with dL/dz = scale p - g_smooth - g_nll onehot(target),
    scale = g_nll + V g_smooth, p from torch's softmax row kernel, a chunk of rows at a time
    (one rounding to z's dtype): the backward of FORWARD_GRADIENT off."""
    scale = g_nll + logits.size(1) * g_smooth
    rows = _rows_per_chunk(logits)
    for r in range(0, logits.size(0), rows):
        chunk = logits[r:r + rows]  # n x V, overwritten by dL/dz
        p = torch.softmax(chunk, 1, dtype=acc)  # n x V
        if scale != 1.0:
            p.mul_(scale)
        if g_smooth:
            p.sub_(g_smooth)
        onehot = p.new_full((p.size(0), 1), -g_nll)
        p.scatter_add_(1, target[r:r + rows].unsqueeze(1), onehot)
        chunk.copy_(p)


def _column_sums(x: Tensor, dtype: torch.dtype, rows: int) -> Tensor:
    """x.sum(0, dtype=dtype) for x: N x V, summed ``rows`` rows at a time. For a bf16 x torch's
    sum first converts all of x to fp32, an N x V copy (48 MB at the demo's sizes, written and
    read back at memory speed); a chunk's copy stays in the cache."""
    if x.dtype == dtype or x.size(0) <= rows:
        return x.sum(0, dtype=dtype)
    total = x[:rows].sum(0, dtype=dtype)  # V
    for r in range(rows, x.size(0), rows):
        total += x[r:r + rows].sum(0, dtype=dtype)
    return total


def fusable(model) -> bool:
    """Whether the model's decoder is ours, which gives its output layer as one weight and bias
    (``RNNDecoder.output_projection()``). Not a duck-typed check: fairseq's TransformerDecoder has
    an ``output_projection`` too, an nn.Linear (callable, with an input), and training a
    transformer with these criterions died with a TypeError at the first update."""
    from .decoder import RNNDecoder

    return isinstance(getattr(model, "decoder", None), RNNDecoder)


def fused_losses(criterion, model, sample, eps: float, accuracy: bool
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """The loss with label smoothing ``eps``, fairseq's label_smoothed_nll_loss's
    (1 - eps - eps_i) nll + eps_i smooth with eps_i = eps / (V - 1) (eps 0: nll, cross-entropy),
    nll and n_correct, sums over the batch's non-padding targets, for a model with
    ``decoder.output_projection()``."""
    net_output = model(**sample["net_input"], features_only=True)
    features = net_output[0]  # B x T x C
    target = model.get_targets(sample, net_output)  # B x T
    prefix = getattr(criterion, "ignore_prefix_size", 0)
    if prefix > 0:
        features, target = features[:, prefix:], target[:, prefix:]
    weight, bias = model.decoder.output_projection()
    device = features.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = features.dtype
    features, target = features.reshape(-1, features.size(-1)), target.reshape(-1)  # N x C, N
    if pads_rows(features):  # rows in a few sizes for oneDNN's per-shape kernels (precision.py)
        features, target = pad_rows(features), pad_rows(target, criterion.padding_idx)
    eps_i = eps / (weight.size(0) - 1)
    return OutputLayerLoss.apply(features, weight, bias, target, criterion.padding_idx, dtype,
                                 1.0 - eps - eps_i, eps_i, accuracy)


def _logging_output(loss, nll, sample, sample_size):
    return {"loss": loss.data, "nll_loss": nll.data, "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0), "sample_size": sample_size}


@dataclass
class FusedCrossEntropyConfig(CrossEntropyCriterionConfig):
    pass


@register_criterion("fused_cross_entropy", dataclass=FusedCrossEntropyConfig)
class FusedCrossEntropyCriterion(CrossEntropyCriterion):
    """fairseq's ``cross_entropy`` with the output layer fused in (see the module's docstring)."""

    def forward(self, model, sample, reduce=True):
        if not reduce or not fusable(model):
            return super().forward(model, sample, reduce=reduce)
        loss, _, _ = fused_losses(self, model, sample, eps=0.0, accuracy=False)  # loss = nll
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = _logging_output(loss, loss, sample, sample_size)
        del logging_output["nll_loss"]  # fairseq's cross_entropy logs none
        return loss, sample_size, logging_output


@dataclass
class FusedLabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    pass


@register_criterion("fused_label_smoothed_cross_entropy",
                    dataclass=FusedLabelSmoothedCrossEntropyConfig)
class FusedLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """fairseq's ``label_smoothed_cross_entropy`` with the output layer fused in (see the
    module's docstring); ``--label-smoothing``, ``--report-accuracy`` and
    ``--ignore-prefix-size`` as there."""

    def forward(self, model, sample, reduce=True):
        if not reduce or not fusable(model):
            return super().forward(model, sample, reduce=reduce)
        loss, nll, correct = fused_losses(self, model, sample, eps=self.eps,
                                          accuracy=self.report_accuracy)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = _logging_output(loss, nll, sample, sample_size)
        if self.report_accuracy:
            target = model.get_targets(sample, None)[:, self.ignore_prefix_size:]
            logging_output["n_correct"] = int(correct)
            logging_output["total"] = int(target.ne(self.padding_idx).sum())
        return loss, sample_size, logging_output
