"""The fused criterions (fairseq_s2s_attn/criterion.py) against fairseq's own: the same loss,
logged values and gradients, with one B x T x V tensor instead of several."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions.cross_entropy import CrossEntropyCriterion
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from clitools import REPO, run
from conftest import FakeTask, build_model, make_dict, random_tokens
from fairseq_s2s_attn import criterion as fused_loss
from fairseq_s2s_attn import native, packed
from fairseq_s2s_attn.criterion import (FusedCrossEntropyCriterion,
                                        FusedLabelSmoothedCrossEntropyCriterion)

USER_DIR = ("--user-dir", REPO / "fairseq_s2s_attn")

VARIANTS = {
    "vanilla": ("rnn_vanilla_tiny", {}),
    "bahdanau-gru-coverage": ("rnn_bahdanau_tiny", dict(rnn_type="gru", coverage=True)),
    "luong-feed": ("rnn_luong_tiny", dict(input_feeding=True)),
    "bahdanau-paper-maxout": ("rnn_bahdanau_paper", dict(
        encoder_embed_dim=12, decoder_embed_dim=10, encoder_hidden_size=16, decoder_hidden_size=20,
        attention_dim=14, maxout_dim=9)),
    "tied-embeddings": ("rnn_luong_tiny", dict(share_decoder_input_output_embed=True,
                                               decoder_embed_dim=16, decoder_out_embed_dim=16)),
}

# (fused class, fairseq's class, constructor options)
CRITERIONS = {
    "cross-entropy": (FusedCrossEntropyCriterion, CrossEntropyCriterion, dict(sentence_avg=False)),
    "cross-entropy-sentence-avg": (FusedCrossEntropyCriterion, CrossEntropyCriterion,
                                   dict(sentence_avg=True)),
    "label-smoothed": (FusedLabelSmoothedCrossEntropyCriterion, LabelSmoothedCrossEntropyCriterion,
                       dict(sentence_avg=False, label_smoothing=0.1)),
    "label-smoothed-accuracy-prefix": (
        FusedLabelSmoothedCrossEntropyCriterion, LabelSmoothedCrossEntropyCriterion,
        dict(sentence_avg=False, label_smoothing=0.2, report_accuracy=True, ignore_prefix_size=1)),
    "no-smoothing": (FusedLabelSmoothedCrossEntropyCriterion, LabelSmoothedCrossEntropyCriterion,
                     dict(sentence_avg=False, label_smoothing=0.0)),
    # --sentence-avg: the sample size (the gradient's denominator) is the number of sentences
    "label-smoothed-sentence-avg": (FusedLabelSmoothedCrossEntropyCriterion,
                                    LabelSmoothedCrossEntropyCriterion,
                                    dict(sentence_avg=True, label_smoothing=0.1)),
}


def make_sample(d, gen, src_lengths=(5, 3, 4), tgt_lengths=(4, 6, 2)):
    """A batch as fairseq's LanguagePairDataset collates it: left-padded source, right-padded
    target, prev_output_tokens = eos + target shifted right."""
    src = random_tokens(d, src_lengths, left_pad=True, generator=gen)
    target = random_tokens(d, tgt_lengths, left_pad=False, generator=gen)
    prev = torch.full_like(target, d.pad())
    prev[:, 0] = d.eos()
    for b, n in enumerate(tgt_lengths):
        prev[b, 1:n] = target[b, :n - 1]
    return {"net_input": {"src_tokens": src, "src_lengths": torch.tensor(src_lengths),
                          "prev_output_tokens": prev},
            "target": target, "ntokens": int(sum(tgt_lengths))}


def loss_and_grads(criterion, model, sample):
    model.zero_grad(set_to_none=True)
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), sample_size, log, grads


@pytest.mark.parametrize("crit", sorted(CRITERIONS))
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fused_criterion_equals_fairseqs(name, crit, gen, monkeypatch):
    """fp64: loss, logged values and every parameter's gradient equal fairseq's criterion's.
    (fairseq's log-softmax is fp32 whatever the model; here it keeps the fp64 of the model, so
    that the two compare the math, not fp32 rounding.)"""
    import fairseq.utils

    monkeypatch.setattr(fairseq.utils, "log_softmax",
                        lambda x, dim, onnx_trace=False: F.log_softmax(x, dim=dim, dtype=x.dtype))
    arch, overrides = VARIANTS[name]
    model = build_model(arch, dtype=torch.float64, **overrides)
    model.train()
    task = FakeTask(make_dict(), make_dict())
    fused_cls, plain_cls, options = CRITERIONS[crit]
    sample = make_sample(task.target_dictionary, gen)
    loss, size, log, grads = loss_and_grads(fused_cls(task, **options), model, sample)
    loss0, size0, log0, grads0 = loss_and_grads(plain_cls(task, **options), model, sample)
    assert size == size0
    assert sorted(log) == sorted(log0)
    torch.testing.assert_close(loss, loss0, rtol=1e-12, atol=1e-12)
    for key in log:
        torch.testing.assert_close(torch.as_tensor(log[key], dtype=torch.float64),
                                   torch.as_tensor(log0[key], dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12, msg=key)
    assert sorted(grads) == sorted(grads0)
    for n in grads:
        torch.testing.assert_close(grads[n], grads0[n], rtol=1e-9, atol=1e-12, msg=n)


def test_label_smoothing_and_padding_change_the_loss(gen):
    """The equality above is not vacuous: smoothing and the padded positions matter."""
    model = build_model("rnn_bahdanau_tiny", dtype=torch.float64)
    task = FakeTask(make_dict(), make_dict())
    sample = make_sample(task.target_dictionary, gen)
    smoothed = FusedLabelSmoothedCrossEntropyCriterion(task, False, 0.1)(model, sample)[0]
    plain = FusedLabelSmoothedCrossEntropyCriterion(task, False, 0.0)(model, sample)[0]
    assert abs(float(smoothed) - float(plain)) > 1e-3
    # the padded positions of the target (pad index) contribute nothing
    unpadded = dict(sample, target=sample["target"].clone())
    unpadded["target"][unpadded["target"].eq(task.target_dictionary.pad())] = 4
    assert abs(float(FusedCrossEntropyCriterion(task, False)(model, unpadded)[0])
               - float(FusedCrossEntropyCriterion(task, False)(model, sample)[0])) > 1e-3


@pytest.mark.parametrize("name", ["bahdanau-gru-coverage", "luong-feed", "vanilla"])
def test_fused_criterion_under_cpu_bf16_follows_the_autocast_path(name, gen):
    """--cpu-bf16: logits in bf16 as autocast makes them, log-sum-exp and loss in fp32; the loss
    equals fairseq's criterion's to fp32 rounding, the gradients to bf16 rounding."""
    arch, overrides = VARIANTS[name]
    model = build_model(arch, cpu_bf16=True, **overrides)
    task = FakeTask(make_dict(), make_dict())
    sample = make_sample(task.target_dictionary, gen)
    options = dict(sentence_avg=False, label_smoothing=0.1)
    loss, _, log, grads = loss_and_grads(FusedLabelSmoothedCrossEntropyCriterion(task, **options),
                                         model, sample)
    loss0, _, log0, grads0 = loss_and_grads(LabelSmoothedCrossEntropyCriterion(task, **options),
                                            model, sample)
    torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log["nll_loss"], log0["nll_loss"], rtol=1e-5, atol=1e-5)
    for n in grads:
        assert grads[n].dtype == torch.float32
        scale = grads0[n].abs().max().clamp_min(1e-3)
        assert (grads[n] - grads0[n]).abs().max() <= 2 ** -7 * scale, n


@pytest.mark.parametrize("crit", ["label-smoothed-accuracy-prefix", "cross-entropy-sentence-avg"])
def test_fused_criterion_over_padded_rows_gives_the_unpadded_loss(crit, gen, monkeypatch):
    """--cpu-bf16 training pads the output layer's rows to a bucket (precision.padded_rows: 36
    target positions become 64) with padding targets: the loss, logged values and accuracy are
    those over the batch's own rows, the gradients too (to rounding of the weight's sums)."""
    cls, _, options = CRITERIONS[crit]
    model = build_model("rnn_bahdanau_tiny", cpu_bf16=True)
    task = FakeTask(make_dict(), make_dict())
    sample = make_sample(task.target_dictionary, gen, (7, 5, 6, 4), (9, 7, 8, 6))
    rows = []
    apply = fused_loss.OutputLayerLoss.apply
    monkeypatch.setattr(fused_loss.OutputLayerLoss, "apply",
                        lambda x, *args: rows.append(x.size(0)) or apply(x, *args))
    results = {}
    for pad in (True, False):  # the model's own products padded in both
        monkeypatch.setattr(fused_loss, "pads_rows", lambda x, pad=pad: pad)
        results[pad] = loss_and_grads(cls(task, **options), model, sample)
    prefix = options.get("ignore_prefix_size", 0)
    assert rows == [64, 4 * (9 - prefix)]
    (loss, size, log, grads), (loss0, size0, log0, grads0) = results[True], results[False]
    torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-5)
    assert size == size0
    for key in log0:
        torch.testing.assert_close(torch.as_tensor(log[key]).double(),
                                   torch.as_tensor(log0[key]).double(), rtol=1e-5, atol=1e-5)
    for n in grads0:
        scale = grads0[n].abs().max().clamp_min(1e-3)
        assert (grads[n] - grads0[n]).abs().max() <= 2 ** -7 * scale, n


class LargeOutputs(TorchDispatchMode):
    """Counts the ops that allocate an N x V tensor (`numel` elements or more, the last
    dimension `vocab`: under --cpu-bf16 the products' rows are padded to a bucket; outputs
    written into an input's storage, as in-place ops do, are not new), and their bytes."""

    def __init__(self, numel, vocab):
        super().__init__()
        self.numel, self.vocab, self.count, self.bytes = numel, vocab, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.size(-1) == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs):
                self.count += 1
                self.bytes += t.numel() * t.element_size()
        return out


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_fused_criterion_makes_one_logits_sized_tensor(cpu_bf16, gen, monkeypatch):
    """fairseq's criterion makes the logits, their fp32 log-softmax, the loss's gradient and
    log-softmax's gradient (and under --cpu-bf16 casts): four or more N x V tensors per update.
    The fused one makes the logits only and writes their gradient over them (its temporaries are
    the size of a chunk of rows; here 8 of the batch's 36)."""
    d = make_dict(400)
    monkeypatch.setitem(fused_loss.CHUNK_ELEMENTS, "cpu", 8 * len(d))
    task = FakeTask(d, d)
    model = build_model("rnn_bahdanau_tiny", task=task, cpu_bf16=cpu_bf16)
    sample = make_sample(d, gen, src_lengths=(7, 5, 6, 4), tgt_lengths=(9, 7, 8, 6))
    n_by_v = sample["target"].numel() * len(d)
    counts = {}
    for cls in (FusedCrossEntropyCriterion, CrossEntropyCriterion):
        crit = cls(task, False)
        with LargeOutputs(n_by_v, len(d)) as mode:
            loss = crit(model, sample)[0]
            loss.backward()
        counts[cls] = (mode.count, mode.bytes)
    assert counts[FusedCrossEntropyCriterion][0] == 1
    assert counts[CrossEntropyCriterion][0] >= 4
    assert counts[FusedCrossEntropyCriterion][1] * 4 <= counts[CrossEntropyCriterion][1]


def test_fused_backward_under_cpu_bf16_allocates_no_fp32_logits_sized_block(gen, monkeypatch):
    """The output layer's bias gradient, the column sums of the bf16 N x V logits' gradient,
    summed a chunk of rows at a time: torch's sum(dtype=float32) of the whole tensor converts
    all of it first, an N x V fp32 block (48 MB at the demo's sizes) inside the kernel, where
    the dispatch-level count above does not see it; the allocator does. (A vocabulary large
    enough that N x V fp32 is the largest block the old sum made: 36 x 4,000.)"""
    from torch.profiler import ProfilerActivity, profile

    d = make_dict(4000)
    monkeypatch.setitem(fused_loss.CHUNK_ELEMENTS, "cpu", 8 * len(d))
    task = FakeTask(d, d)
    model = build_model("rnn_bahdanau_tiny", task=task, cpu_bf16=True)
    sample = make_sample(d, gen, src_lengths=(7, 5, 6, 4), tgt_lengths=(9, 7, 8, 6))
    n_by_v_fp32 = sample["target"].numel() * len(d) * 4
    crit = FusedCrossEntropyCriterion(task, False)
    loss = crit(model, sample)[0]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    largest = max((e.cpu_memory_usage, e.name) for e in prof.events())
    assert model.decoder.output_projection()[1].grad is not None  # the bias gradient was made
    assert largest[0] < n_by_v_fp32, largest


@pytest.mark.parametrize("rows", [1, 8, 36, 37, 100])
def test_column_sums_by_chunks_equal_torchs_sum(rows, gen):
    """The chunked column sums (bias gradient) equal torch's sum of the whole bf16 tensor in
    fp32, to fp32 rounding; an fp32 tensor is summed as it is."""
    x = torch.randn(37, 50, generator=gen).bfloat16()
    got = fused_loss._column_sums(x, torch.float32, rows)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x.sum(0, dtype=torch.float32), rtol=1e-6, atol=1e-6)
    x32 = x.float()
    assert torch.equal(fused_loss._column_sums(x32, torch.float32, rows), x32.sum(0))


def test_fp16_logits_keep_the_gradient_in_backward(gen):
    """fp16 logits (--fp16 on a GPU; the CPU runs the same ops here): the gradient is made in
    backward, not by the forward, with the upstream gradient (fairseq's loss scale) in it, so
    that small values are scaled before the rounding to fp16; under a loss scale of 2^10 the
    gradients equal the fp64 ones to fp16 rounding."""
    x = torch.randn(16, 8, generator=gen, dtype=torch.float64) * 3
    w = torch.randn(300, 8, generator=gen, dtype=torch.float64)
    b = torch.zeros(300, dtype=torch.float64)
    target = torch.randint(2, 300, (16,), generator=gen)
    coefficients = (0.9, 0.1 / 299)
    _, want, _, _ = output_layer_loss(x, w, b, target, torch.float64, coefficients, 2.0 ** 10)
    _, got, fwd, bwd = output_layer_loss(x.float(), w.float(), b.float(), target, torch.float16,
                                         coefficients, 2.0 ** 10)
    assert "scatter_add_" in bwd and "scatter_add_" not in fwd  # made in backward
    for g, g0 in zip(got, want):
        torch.testing.assert_close(g.double(), g0, rtol=1e-2, atol=1e-2 * float(g0.abs().max()))


@pytest.mark.parametrize("written", [True, False], ids=["forward-gradient", "plain"])
def test_second_backward_through_the_same_graph(written, gen, monkeypatch):
    """retain_graph: with the gradient written by the forward, a second backward gives the same
    gradients again; the plain path's backward overwrites the logits with their gradient, so
    its second backward must fail rather than use them."""
    monkeypatch.setattr(fused_loss, "FORWARD_GRADIENT", written)
    model = build_model("rnn_luong_tiny")
    task = FakeTask(make_dict(), make_dict())
    sample = make_sample(task.target_dictionary, gen)
    loss = FusedCrossEntropyCriterion(task, False)(model, sample)[0]
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if not written:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        return
    loss.backward()
    for n, p in model.named_parameters():
        if n in once:
            torch.testing.assert_close(p.grad, 2 * once[n], msg=n)


def test_chunks_of_rows_give_the_same_result(monkeypatch, gen):
    """The row chunks (a few rows at a time in forward and backward) do not change the result."""
    model = build_model("rnn_bahdanau_tiny", dtype=torch.float64)
    task = FakeTask(make_dict(), make_dict())
    sample = make_sample(task.target_dictionary, gen)
    crit = FusedLabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    loss, _, _, grads = loss_and_grads(crit, model, sample)
    monkeypatch.setitem(fused_loss.CHUNK_ELEMENTS, "cpu", 1)  # one row per chunk
    loss1, _, _, grads1 = loss_and_grads(crit, model, sample)
    torch.testing.assert_close(loss1, loss, rtol=1e-12, atol=1e-12)
    for n in grads:
        torch.testing.assert_close(grads1[n], grads[n], rtol=1e-10, atol=1e-12)


def test_models_without_an_output_projection_take_fairseqs_path(gen):
    """fairseq's lstm (no output_projection), its transformer (whose output_projection is an
    nn.Linear: the fused path called it without input, a TypeError) and reduce=False: the parent
    criterion, unchanged."""
    from fairseq.models.lstm import LSTMModel, base_architecture
    from fairseq.models.transformer import TransformerModel, tiny_architecture

    d = make_dict()
    task = FakeTask(d, d)
    args = argparse.Namespace(encoder_embed_dim=8, encoder_hidden_size=8, decoder_embed_dim=8,
                              decoder_hidden_size=8, decoder_out_embed_dim=8, encoder_layers=1,
                              decoder_layers=1, dropout=0.0,
                              criterion="label_smoothed_cross_entropy")
    base_architecture(args)
    torch.manual_seed(0)
    lstm = LSTMModel.build_model(args, task)
    assert not fused_loss.fusable(lstm)
    sample = make_sample(d, gen, src_lengths=(5, 4, 3))  # fairseq's lstm wants them sorted
    options = dict(sentence_avg=False, label_smoothing=0.1)
    loss = FusedLabelSmoothedCrossEntropyCriterion(task, **options)(lstm, sample)[0]
    loss0 = LabelSmoothedCrossEntropyCriterion(task, **options)(lstm, sample)[0]
    assert float(loss) == float(loss0)
    args = argparse.Namespace(dropout=0.0)
    tiny_architecture(args)
    torch.manual_seed(0)
    transformer = TransformerModel.build_model(args, task)
    assert not fused_loss.fusable(transformer)
    loss = FusedLabelSmoothedCrossEntropyCriterion(task, **options)(transformer, sample)[0]
    loss0 = LabelSmoothedCrossEntropyCriterion(task, **options)(transformer, sample)[0]
    assert float(loss) == float(loss0)
    ours = build_model("rnn_bahdanau_tiny", task=task)
    unreduced = FusedLabelSmoothedCrossEntropyCriterion(task, **options)(ours, sample, reduce=False)
    assert unreduced[0].dim() > 0  # per-position losses, as fairseq's criterion returns them


def logged_values(line):
    """{'loss': '3.21', ...} from one of fairseq's simple-format log lines."""
    return dict(f.strip().split(" ", 1) for f in line.split(" | ") if f.strip().count(" ") == 1)


@pytest.mark.slow
def test_fairseq_train_with_the_fused_criterion_logs_the_same_losses(small_data_bin, tmp_path):
    """fairseq-train --criterion fused_label_smoothed_cross_entropy: the same training as
    label_smoothed_cross_entropy (same seed, same batches): the logged losses agree."""
    logs = {}
    for crit in ("label_smoothed_cross_entropy", "fused_label_smoothed_cross_entropy"):
        out = run("fairseq-train", small_data_bin, *USER_DIR, "--arch", "rnn_bahdanau_tiny",
                  "--criterion", crit, "--label-smoothing", "0.1", "--report-accuracy",
                  "--optimizer", "adam", "--lr", "0.005", "--max-tokens", 1000, "--max-update", 8,
                  "--no-progress-bar", "--log-format", "simple", "--cpu", "--seed", 3,
                  "--no-save", "--save-dir", tmp_path / "checkpoints", "--log-interval", 1)
        logs[crit] = [line for line in (out.stdout + out.stderr).splitlines()
                      if "| valid |" in line or "| train |" in line]
    plain, ours = logs["label_smoothed_cross_entropy"], logs["fused_label_smoothed_cross_entropy"]
    assert len(plain) == len(ours) >= 2

    for a, b in zip(plain, ours):
        fa, fb = logged_values(a), logged_values(b)
        for key in ("loss", "nll_loss", "ppl", "accuracy"):
            x, y = float(fa[key]), float(fb[key])
            assert abs(x - y) <= 0.01 + 1e-3 * abs(x), (key, a, b)


class OpNames(TorchDispatchMode):
    """The names of the aten ops run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def layer_inputs(gen, dtype):
    """An output layer's inputs in ``dtype``: 37 rows of 16 features, weight and bias for 50
    words, targets with rows 3, 20 and 36 padding (index 1)."""
    x = torch.randn(37, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    b = torch.randn(50, generator=gen, dtype=torch.float64)
    target = torch.randint(2, 50, (37,), generator=gen)
    target[[3, 20, 36]] = 1
    return x.to(dtype), w.to(dtype), b.to(dtype), target


def output_layer_loss(x, w, b, target, dtype, coefficients, upstream=1.0):
    """OutputLayerLoss's loss c_nll nll + c_smooth smooth, its gradients (x, W, b) for an
    upstream gradient ``upstream``, and the ops its forward and its backward ran."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with OpNames() as forward:
        loss, _, _ = fused_loss.OutputLayerLoss.apply(x, w, b, target, 1, dtype, *coefficients, False)
    with OpNames() as backward:
        loss.backward(torch.tensor(upstream))
    return loss.detach(), (x.grad, w.grad, b.grad), set(forward.names), set(backward.names)


@pytest.mark.parametrize("upstream", [1.0, 3.0])
@pytest.mark.parametrize("coefficients", [(0.9, 0.1 / 49), (1.0, 0.0), (-1.0, 0.0), (0.0, 0.0)],
                         ids=["smoothed", "nll", "negated", "zero"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_forward_writes_the_gradient_backward_only_multiplies(dtype, coefficients, upstream, gen,
                                                             monkeypatch):
    """The forward writes the loss's gradient over the logits chunk by chunk (no softmax or
    log_softmax row kernel), and backward runs the output layer's products and column sums
    alone, no element-wise pass over the logits (FORWARD_GRADIENT off: log_softmax forward,
    softmax and the gradient's passes in backward). The loss and the gradients equal those of
    torch's row kernels: fp64 to 1e-12, bf16 logits to the rounding of the gradient written over
    them; for an upstream gradient other than 1 too, and negated and zero losses."""
    monkeypatch.setitem(fused_loss.CHUNK_ELEMENTS, "cpu", 8 * 50)  # several chunks of 8 rows
    x, w, b, target = layer_inputs(gen, torch.float32 if dtype == torch.bfloat16 else dtype)
    results = {}
    for written in (True, False):
        monkeypatch.setattr(fused_loss, "FORWARD_GRADIENT", written)
        results[written] = output_layer_loss(x, w, b, target, dtype, coefficients, upstream)
    (loss, grads, fwd, bwd), (loss0, grads0, fwd0, bwd0) = results[True], results[False]
    row_kernels = {"_softmax", "_log_softmax"}
    assert not row_kernels & (fwd | bwd) and row_kernels <= (fwd0 | bwd0)
    assert not {"exp", "exp_", "scatter_add_", "copy_"} & bwd, bwd
    assert "scatter_add_" in bwd0
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss, loss0, rtol=tol, atol=tol)
    for g, g0 in zip(grads, grads0):
        scale = float(g0.abs().max().clamp_min(1e-6))
        assert float((g - g0).abs().max()) <= (1e-12 if dtype == torch.float64 else 2 ** -7) * scale
    if coefficients == (0.0, 0.0):
        assert all(not g.any() for g in grads)
    else:
        assert all(g.abs().max() > 0 for g in grads)


def same_bits_on_and_off(monkeypatch, flag, inputs, dtype):
    """OutputLayerLoss on ``inputs`` (x, W, b, targets) with ``criterion.<flag>`` on and off
    (label-smoothed, upstream gradient 2): the same loss and gradients, bit for bit; returns the
    ops each forward ran (on, off)."""
    results = {}
    for on in (True, False):
        monkeypatch.setattr(fused_loss, flag, on)
        results[on] = output_layer_loss(*inputs, dtype, (0.9, 0.1 / 49), 2.0)
    (loss, grads, fwd, _), (loss0, grads0, fwd0, _) = results[True], results[False]
    assert torch.equal(loss, loss0)
    assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0))
    return fwd, fwd0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logits_in_the_loss_dtype_are_worked_on_in_place(dtype, gen, monkeypatch):
    """fp32 logits (fp32 training; fp64 for fp64 models) are their own work space: no copy into
    a buffer and back, the same bits as the copying path (IN_PLACE_CHUNKS off). bf16 logits
    are converted into an fp32 chunk either way. (The eager chunks: native's loop, which has
    none, off.)"""
    monkeypatch.setattr(native, "ENABLED", False)
    monkeypatch.setitem(fused_loss.CHUNK_ELEMENTS, "cpu", 8 * 50)
    inputs = layer_inputs(gen, torch.float64 if dtype == torch.float64 else torch.float32)
    fwd, fwd0 = same_bits_on_and_off(monkeypatch, "IN_PLACE_CHUNKS", inputs, dtype)
    assert "copy_" in fwd0
    assert ("copy_" in fwd) == (dtype == torch.bfloat16), fwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_logits_take_the_bias_in_onednns_product(dtype, gen, monkeypatch):
    """bf16 logits on a CPU: the bias added by oneDNN's product (BIAS_IN_PRODUCT), not written
    over the N x V output first by torch's addmm: the same loss and gradients, bit for bit.
    fp32 logits keep F.linear (MKL), either way."""
    if not packed.onednn_bf16():
        pytest.skip("no oneDNN bf16 on this CPU")
    demo_sizes = (torch.randn(2048, 256, generator=gen), torch.randn(5992, 256, generator=gen) / 16,
                  torch.randn(5992, generator=gen), torch.randint(1, 5992, (2048,), generator=gen))
    for inputs in (layer_inputs(gen, torch.float32), demo_sizes):  # 2,048 x 256 x 5,992
        fwd, fwd0 = same_bits_on_and_off(monkeypatch, "BIAS_IN_PRODUCT", inputs, dtype)
        assert "addmm" in fwd0 and "_linear_pointwise" not in fwd0
        assert ("_linear_pointwise" in fwd) == (dtype == torch.bfloat16), fwd
        assert ("addmm" in fwd) == (dtype != torch.bfloat16), fwd


def accuracy_rows(dtype, gen):
    """60 rows of 40 logits for the accuracy tests: rows with one maximum (the first ten at their
    target), ties before, at and after the target, all-equal rows, NaN, +-inf; their targets
    and whether torch.argmax hits each."""
    n, vocab = 60, 40
    logits = torch.randint(-3, 4, (n, vocab), generator=gen).to(dtype)  # small integers: ties
    logits[:20] = torch.randn(20, vocab, generator=gen, dtype=torch.float64).to(dtype)  # none
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[:10] = logits[:10].argmax(1)  # hits without ties
    row = logits[40]  # a tie: the target is the second maximum (argmax is the first)
    row.fill_(0)
    row[[5, 9]] = 2
    target[40] = 9
    logits[41].fill_(1)  # all equal: argmax 0
    target[41] = 0
    logits[42].fill_(1)
    target[42] = 7
    logits[43, 3] = float("nan")
    target[43] = 3
    logits[44, 6] = float("inf")
    target[44] = 6
    logits[45].fill_(float("-inf"))
    target[45] = 0
    logits[46, 11] = 100  # the one maximum is the target, among ties below it
    target[46] = 11
    expected = logits.argmax(1).eq(target)
    assert expected[:10].all() and not expected[40] and expected[41] and expected[46]
    return logits, target, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_accuracy_hits_equal_argmax_ties_and_non_finite_rows_included(dtype, gen, monkeypatch):
    """--report-accuracy on a CPU: whether each row's argmax is its target, counted from the
    row's maxima (one sign pass) instead of torch's argmax (~20x slower than a max): the same
    answers as torch.argmax, the first maximum, for rows with one maximum, ties before, at and
    after the target, all-equal rows, NaN, +-inf; and argmax runs only for the rows with ties
    or non-finite values."""
    monkeypatch.setitem(fused_loss.CHUNK_ELEMENTS, "cpu", 8 * 40)  # several chunks of 8 rows
    logits, target, expected = accuracy_rows(dtype, gen)
    vocab = logits.size(1)
    with OpNames() as ops:
        _, _, hits = fused_loss._loss_and_gradient(logits.clone(), target, torch.promote_types(
            dtype, torch.float32), 0.9, 0.1 / vocab, True)
    assert torch.equal(hits, expected)
    # argmax only over the chunks holding rows with ties or non-finite values, not rows 0-19
    ties = (logits == logits.amax(1, keepdim=True)).sum(1).ne(1) | ~logits.isfinite().all(1)
    assert not ties[:20].any()
    assert ops.names.count("argmax") == len({int(r) // 8 for r in ties.nonzero()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_accuracy_by_torchs_argmax_reads_the_logits_as_they_were(dtype, gen, monkeypatch):
    """--report-accuracy by torch's argmax of each chunk (a GPU's path; ARGMAX_BY_COUNT off): the
    argmax reads the logits, not the chunk shifted by its row maxima, whatever the dtype (fp32
    logits are otherwise worked on in place: a NaN row shifted is all NaN, argmax 0)."""
    monkeypatch.setitem(fused_loss.CHUNK_ELEMENTS, "cpu", 8 * 40)
    monkeypatch.setattr(fused_loss, "ARGMAX_BY_COUNT", False)
    logits, target, expected = accuracy_rows(dtype, gen)
    _, _, hits = fused_loss._loss_and_gradient(logits.clone(), target, torch.promote_types(
        dtype, torch.float32), 0.9, 0.1 / logits.size(1), True)
    assert torch.equal(hits, expected)
