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
  makes them); then, a few rows at a time (cache-sized chunks) in fp32, each row's log-sum-exp
  lse and sum_j z_j give -log p(target) = lse - z_t and (with label smoothing)
  -sum_j log p_j = V lse - sum_j z_j. z and lse (N values) are kept for backward.
- backward: dL/dz = g_nll (p - onehot) + g_smooth (V p - 1), with p = exp(z - lse) in fp32 (one
  pass, not a softmax's three), written over z itself chunk by chunk (one rounding), padding rows
  zeroed, then the output layer's products. One N x V tensor in all instead of four. On CUDA the
  backward reads the two loss gradients and the padding rows to the host once per update (not
  per step). (``REUSE_LSE`` off: torch's log_softmax and softmax row kernels per chunk instead,
  the path this replaced; per --cpu-bf16 update 1.05x faster with lse, ``scripts/train_ab.py
  --levers loss``.)

In ``--cpu-bf16`` training the N rows (features and targets) are first padded to a bucket of
rows (``precision.padded_rows``; padding targets, so the extra rows add nothing to the loss, the
counts or the gradients): oneDNN compiles the output layer's three products once per bucket
instead of once per batch.

The loss is fairseq's: label_smoothed_nll_loss's (1 - eps - eps_i) nll + eps_i smooth with
eps_i = eps / (V - 1). Models other than ours (fairseq's ``lstm``, ``transformer``, ...) and
``reduce=False`` take the parent criterion's path unchanged.
"""

import math
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

from .precision import pad_rows, pads_rows

# elements per chunk of rows: about 1 MB of fp32 on a CPU (stays in its L2 cache across the
# chunk's passes); on a GPU large chunks, so that a chunk's kernels fill the device
CHUNK_ELEMENTS = {"cpu": 1 << 18}
GPU_CHUNK_ELEMENTS = 1 << 24

# backward makes p from the forward's log-sum-exp in one pass (_log_sum_exp, _write_gradient);
# tests and scripts/train_ab.py set it to False for torch's log_softmax / softmax row kernels
REUSE_LSE = True


def _rows_per_chunk(logits: Tensor) -> int:
    elements = CHUNK_ELEMENTS.get(logits.device.type, GPU_CHUNK_ELEMENTS)
    return max(1, elements // max(1, logits.size(1)))


class OutputLayerLoss(torch.autograd.Function):
    """nll, smooth (fp32 scalars) and the number of correct argmax predictions from features
    x (N x C), the output layer's weight W (V x C) and bias b (V or None) and targets (N).

    Per chunk of rows the fp32 work runs on a chunk that stays in the cache, never an N x V fp32
    tensor (``_log_sum_exp`` forward, ``_write_gradient`` backward)."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                padding_idx: int, dtype: torch.dtype, smooth: bool, accuracy: bool):
        device = features.device.type
        with torch.autocast(device, enabled=False):
            x = features.to(dtype)  # N x C
            w = weight.to(dtype)  # V x C
            logits = F.linear(x, w, None if bias is None else bias.to(dtype))  # N x V
            acc = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 models
            keep = target.ne(padding_idx)  # N
            zero = logits.new_zeros((), dtype=acc)
            if REUSE_LSE:
                lse, nll, smooth_rows = _log_sum_exp(logits, target, acc, smooth)  # N each
            else:  # torch's log_softmax row kernel, the log-probabilities of a chunk at a time
                lse, nll, smooth_rows = None, *_log_softmax_rows(logits, target, acc, smooth)
            nll_sum = torch.where(keep, nll, zero).sum()
            # fairseq's smooth_loss: -sum_j log p_j over the row
            smooth_sum = torch.where(keep, smooth_rows, zero).sum() if smooth else zero.clone()
            correct = (logits.argmax(1).eq(target) & keep).sum() if accuracy else zero.long()
        ctx.mark_non_differentiable(correct)
        ctx.has_bias = bias is not None
        ctx.dtypes = (features.dtype, weight.dtype, None if bias is None else bias.dtype, acc)
        ctx.save_for_backward(x, w, logits, target, keep, lse)
        return nll_sum, smooth_sum, correct

    @staticmethod
    @once_differentiable
    def backward(ctx, g_nll: Tensor, g_smooth: Tensor, _g_correct):
        # saved_tensors checks that logits was not overwritten: a second backward through the
        # same graph (retain_graph=True) raises instead of using the gradient written below
        x, w, logits, target, keep, lse = ctx.saved_tensors
        acc = ctx.dtypes[3]
        # dL/dz = g_nll (p - onehot) + g_smooth (V p - 1) = scale p - g_smooth - g_nll onehot
        g_nll, g_smooth = float(g_nll), float(g_smooth)
        with torch.autocast(x.device.type, enabled=False):
            _write_gradient(logits, target, lse, acc, g_nll, g_smooth)
            grad = logits.index_fill_(0, keep.logical_not().nonzero().squeeze(1), 0)  # N x V
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = grad.mm(w).to(ctx.dtypes[0])  # N x C
            if ctx.needs_input_grad[1]:
                grad_w = grad.t().mm(x).to(ctx.dtypes[1])  # V x C
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = _column_sums(grad, acc, _rows_per_chunk(grad)).to(ctx.dtypes[2])  # V
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _log_sum_exp(logits: Tensor, target: Tensor, acc: torch.dtype, smooth: bool
                 ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per row of the logits z (N x V): lse = log sum_j exp z_j, -log p(target) = lse - z_t and
    (with smoothing) -sum_j log p_j = V lse - sum_j z_j, all in ``acc``; N each.

    A chunk of rows at a time in one ``acc`` buffer that stays in the cache: copy (converting),
    row maxima m, row sums, exp(z - m) in place, its row sums. lse is kept for backward, which
    then makes p = exp(z - lse) in one pass instead of torch's softmax (max, sum and divide).
    Measured on the demo's chunks (43 x 5,992 bf16, one core of an Intel Xeon with AMX):
    161 us against 247 us for torch's log_softmax(dtype=float32), the gather and the sum."""
    n, vocab = logits.shape
    lse = logits.new_empty(n, dtype=acc)
    nll = logits.gather(1, target.unsqueeze(1)).squeeze(1).to(acc)  # N: z_t
    total = logits.new_empty(n, dtype=acc) if smooth else None  # N: sum_j z_j
    rows = _rows_per_chunk(logits)
    buf = logits.new_empty(min(rows, n), vocab, dtype=acc)
    for r in range(0, n, rows):
        z = buf[:min(rows, n - r)].copy_(logits[r:r + rows])  # n x V
        m = z.amax(1)  # n
        if smooth:
            torch.sum(z, 1, out=total[r:r + rows])
        z.sub_(m.unsqueeze(1)).exp_()
        torch.sum(z, 1, out=lse[r:r + rows])
        lse[r:r + rows].log_().add_(m)
    nll = lse - nll
    return lse, nll, (lse * vocab - total) if smooth else None


def _log_softmax_rows(logits: Tensor, target: Tensor, acc: torch.dtype, smooth: bool
                      ) -> Tuple[Tensor, Optional[Tensor]]:
    """The same -log p(target) and -sum_j log p_j (N each) from torch's log_softmax row kernel
    over a chunk of rows at a time (the plain path: REUSE_LSE off)."""
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


def _write_gradient(logits: Tensor, target: Tensor, lse: Optional[Tensor], acc: torch.dtype,
                    g_nll: float, g_smooth: float) -> None:
    """Overwrites the logits z (N x V) with dL/dz = scale p - g_smooth - g_nll onehot(target),
    scale = g_nll + V g_smooth, a chunk of rows at a time (one rounding to z's dtype). With the
    forward's lse, scale p = exp(z - lse + log scale) in one pass; without (REUSE_LSE off) p is
    torch's softmax, scaled after."""
    n, vocab = logits.shape
    scale = g_nll + vocab * g_smooth
    rows = _rows_per_chunk(logits)
    buf = logits.new_empty(min(rows, n), vocab, dtype=acc) if lse is not None else None
    if lse is not None:  # the shift in fp64: scale p to fp32 rounding, however large lse
        shift = (lse.double() - math.log(scale) if scale > 0 else lse.double()).to(acc)
    for r in range(0, n, rows):
        chunk = logits[r:r + rows]  # n x V, overwritten by dL/dz
        if lse is None:
            p = torch.softmax(chunk, 1, dtype=acc)  # n x V
            if scale != 1.0:
                p.mul_(scale)
        else:
            p = buf[:chunk.size(0)].copy_(chunk)
            p.sub_(shift[r:r + rows].unsqueeze(1)).exp_()
            if scale <= 0:
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


def fused_losses(criterion, model, sample, smooth: bool, accuracy: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, int]:
    """nll, smooth, n_correct (sums over the batch's non-padding targets) and the vocabulary size,
    for a model with ``decoder.output_projection()``."""
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
    nll, smooth_sum, correct = OutputLayerLoss.apply(
        features, weight, bias, target, criterion.padding_idx, dtype, smooth, accuracy)
    return nll, smooth_sum, correct, weight.size(0)


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
        nll, _, _, _ = fused_losses(self, model, sample, smooth=False, accuracy=False)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = _logging_output(nll, nll, sample, sample_size)
        del logging_output["nll_loss"]  # fairseq's cross_entropy logs none
        return nll, sample_size, logging_output


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
        nll, smooth, correct, vocab = fused_losses(
            self, model, sample, smooth=self.eps > 0, accuracy=self.report_accuracy)
        eps_i = self.eps / (vocab - 1)
        loss = (1.0 - self.eps - eps_i) * nll + eps_i * smooth
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = _logging_output(loss, nll, sample, sample_size)
        if self.report_accuracy:
            target = model.get_targets(sample, None)[:, self.ignore_prefix_size:]
            logging_output["n_correct"] = int(correct)
            logging_output["total"] = int(target.ne(self.padding_idx).sum())
        return loss, sample_size, logging_output
