"""On a CUDA device: every architecture trains and decodes, in fp32, fp16, bf16 and autocast, and
gives the CPU's results for the same weights. Skipped without CUDA (CI has none; run it with
scripts/gpu_check.sh on a GPU machine). The CPU-side guard for the same class of bug is
test_cuda_contracts.py, which runs in CI."""

import copy

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from conftest import build_model, make_dict
from test_cuda_contracts import PRECISION_ARCHS, check_low_precision, forward_backward
from test_decoder import VARIANTS, full_forward, incremental_forward, make_batch, vid

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def to_cuda(*tensors):
    return [t.cuda() for t in tensors]


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32: fp32 products on CUDA then differ from the CPU's by rounding only."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("variant", VARIANTS, ids=[vid(v) for v in VARIANTS])
def test_cuda_training_step_equals_cpu(variant):
    arch, opts = variant
    d = make_dict()
    cpu = build_model(arch, dtype=torch.float64, **opts).train()
    gpu = copy.deepcopy(cpu).cuda()
    src, lengths, prev = make_batch(d, seed=2)
    c_logits, c_attn, c_grads = forward_backward(cpu, src, lengths, prev)
    g_logits, g_attn, g_grads = forward_backward(gpu, *to_cuda(src, lengths, prev))
    torch.testing.assert_close(g_logits.cpu(), c_logits)
    if c_attn is not None:
        torch.testing.assert_close(g_attn.cpu(), c_attn)
    for name, grad in c_grads.items():
        torch.testing.assert_close(g_grads[name].cpu(), grad, msg=name)


@pytest.mark.parametrize("variant", VARIANTS, ids=[vid(v) for v in VARIANTS])
def test_cuda_incremental_decoding_and_beam_search_equal_cpu(variant):
    arch, opts = variant
    d = make_dict()
    cpu = build_model(arch, dtype=torch.float64, **opts).eval()
    gpu = copy.deepcopy(cpu).cuda()
    src, lengths, prev = make_batch(d, seed=3)
    logits, attn = full_forward(cpu, src, lengths, prev)
    g_src, g_lengths, g_prev = to_cuda(src, lengths, prev)
    with torch.no_grad():
        enc = gpu.encoder(g_src, g_lengths)
    inc_logits, inc_attn = incremental_forward(gpu, enc, g_prev, {})
    torch.testing.assert_close(inc_logits.cpu(), logits, atol=1e-6, rtol=1e-6)
    if attn is not None:
        torch.testing.assert_close(inc_attn.cpu(), attn, atol=1e-6, rtol=1e-6)
    hyps = []
    for model, s, n in ((cpu, src, lengths), (gpu, g_src, g_lengths)):
        gen = SequenceGenerator([model], d, beam_size=4, max_len_b=7)
        hyps.append(gen.generate([model], {"net_input": {"src_tokens": s, "src_lengths": n}}))
    for a, b in zip(*hyps):
        for ha, hb in zip(a, b):
            assert torch.equal(ha["tokens"], hb["tokens"].cpu())
            torch.testing.assert_close(hb["score"].cpu(), ha["score"])


def in_precision(model, precision):
    """As fairseq-train runs it: --fp16 / --bf16 convert the model, --amp autocasts fp32."""
    if precision == "fp16":
        return model.half(), torch.autocast("cuda", enabled=False)
    if precision == "bf16":
        return model.to(torch.bfloat16), torch.autocast("cuda", enabled=False)
    if precision == "amp-bf16":
        return model, torch.autocast("cuda", dtype=torch.bfloat16)
    return model, torch.autocast("cuda", dtype=torch.float16)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "amp", "amp-bf16"])
@pytest.mark.parametrize("variant", PRECISION_ARCHS, ids=[vid(v) for v in PRECISION_ARCHS])
def test_cuda_low_precision_training_and_beam_search(variant, precision):
    arch, opts = variant
    d = make_dict()
    reference = build_model(arch, **opts).train()
    src, lengths, prev = make_batch(d, seed=4)
    ref_logits = forward_backward(reference, src, lengths, prev)[0]
    model, region = in_precision(build_model(arch, **opts).cuda().train(), precision)
    g_src, g_lengths, g_prev = to_cuda(src, lengths, prev)
    with region:
        logits, _attn, grads = forward_backward(model, g_src, g_lengths, g_prev)
    check_low_precision(model, region, d, g_src, g_lengths, logits, grads, ref_logits)


@pytest.mark.parametrize("precision", ["fp64", "fp16", "bf16", "amp"])
def test_cuda_fused_criterion_equals_fairseqs(precision):
    """The fused output layer + loss (criterion.py) on CUDA: fp64 gives the CPU's loss and
    gradients; in fp16, bf16 (the model converted, as --fp16/--bf16 do) and fp16 autocast (--amp)
    the loss and gradients follow fairseq's label_smoothed_cross_entropy to their rounding."""
    from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

    from conftest import FakeTask
    from fairseq_s2s_attn.criterion import FusedLabelSmoothedCrossEntropyCriterion
    from test_criterion import loss_and_grads, make_sample

    d = make_dict()
    task = FakeTask(d, d)
    sample = make_sample(d, torch.Generator().manual_seed(5))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float64)
    cpu = build_model("rnn_bahdanau_tiny", dtype=torch.float64).train()
    gpu = copy.deepcopy(cpu).cuda().to(dtype if precision != "amp" else torch.float32)
    cuda_sample = {"net_input": {k: v.cuda() for k, v in sample["net_input"].items()},
                   "target": sample["target"].cuda(), "ntokens": sample["ntokens"]}
    options = dict(sentence_avg=False, label_smoothing=0.1)
    fused = FusedLabelSmoothedCrossEntropyCriterion(task, **options)
    plain = LabelSmoothedCrossEntropyCriterion(task, **options)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=precision == "amp")
    with autocast:
        loss, _, _, grads = loss_and_grads(fused, gpu, cuda_sample)
    if precision == "fp64":
        loss0, _, _, grads0 = loss_and_grads(fused, cpu, sample)
        torch.testing.assert_close(loss.cpu(), loss0)
        for n in grads0:
            torch.testing.assert_close(grads[n].cpu(), grads0[n], msg=n)
        return
    with autocast:
        loss0, _, _, grads0 = loss_and_grads(plain, gpu, cuda_sample)
    assert torch.isfinite(loss) and abs(float(loss) - float(loss0)) <= 1e-2 * abs(float(loss0))
    for n in grads0:
        assert grads[n].dtype == grads0[n].dtype, n
        scale = grads0[n].abs().max().float().clamp_min(1e-2)
        assert (grads[n] - grads0[n]).abs().max().float() <= 2 ** -5 * scale, n


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_repeated_ngrams_banned_as_on_cpu(n, dtype):
    """--no-repeat-ngram-size on CUDA without fairseq's extension: the plugin's tensor
    operations ban the same words as on the CPU."""
    from fairseq_s2s_attn.search import block_repeated_ngrams

    g = torch.Generator().manual_seed(n)
    tokens = torch.randint(4, 9, (12, 14), generator=g)
    tokens[:, 0] = 2
    lprobs = torch.log_softmax(torch.randn(12, 9, generator=g), -1).to(dtype)
    for step in range(13):
        want = block_repeated_ngrams(tokens, lprobs.clone(), step, n)
        got = block_repeated_ngrams(*to_cuda(tokens, lprobs), step, n)
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("kind", ["transformer_lm", "lstm_lm"])
def test_cuda_shallow_fusion_equals_cpu(kind):
    """--lm-path on CUDA: the language model run one token a step with its state
    (search.IncrementalLM, reordered with the hypotheses) gives the CPU's translations."""
    from test_search import language_model, model_and_batch

    d = make_dict(20)
    model, sample = model_and_batch("rnn_bahdanau_tiny", d)
    lm = language_model(kind, d)

    def search(model, lm, sample):
        gen = SequenceGenerator([model], d, beam_size=4, max_len_b=12, lm_model=lm, lm_weight=0.5)
        with torch.no_grad():
            return gen.generate([model], sample)

    want = search(model, lm, sample)
    net_input = {k: v.cuda() for k, v in sample["net_input"].items()}
    got = search(copy.deepcopy(model).cuda(), copy.deepcopy(lm).cuda(), {"net_input": net_input})
    for hyps_a, hyps_b in zip(got, want):
        for a, b in zip(hyps_a, hyps_b):
            assert torch.equal(a["tokens"].cpu(), b["tokens"])
            torch.testing.assert_close(a["score"].cpu(), b["score"], rtol=0, atol=1e-4)


def test_cuda_cpu_int8_does_nothing_on_cuda(monkeypatch):
    """--cpu-int8 is for CPU decoding: a model prepared on the CPU and moved to CUDA (the hub's
    .cuda()) drops its int8 copies, one prepared on CUDA (fairseq-generate moves it first) makes
    none, and both decode as the model without the setting."""
    from conftest import inference_cfg
    from fairseq_s2s_attn import int8
    monkeypatch.setattr(int8, "MIN_ELEMENTS", 0)
    d = make_dict()
    plain = build_model("rnn_luong_tiny", seed=4).eval()
    moved = build_model("rnn_luong_tiny", seed=4, cpu_int8=True).eval()
    moved.prepare_for_inference_(inference_cfg())
    assert int8.available() <= all(int8.int8_weight(w) is not None for w in moved.decoder.step_weights())
    moved.cuda()
    first = build_model("rnn_luong_tiny", seed=4, cpu_int8=True).eval().cuda()
    first.prepare_for_inference_(inference_cfg())
    src, lengths, _ = to_cuda(*make_batch(d, seed=5))
    hyps = []
    for model in (plain.cuda(), moved, first):
        assert not any(int8.int8_weight(w) for w in model.decoder.step_weights())
        gen = SequenceGenerator([model], d, beam_size=3, max_len_b=7)
        hyps.append(gen.generate([model], {"net_input": {"src_tokens": src, "src_lengths": lengths}}))
    for a, b, c in zip(*hyps):
        for ha, hb, hc in zip(a, b, c):
            assert torch.equal(ha["tokens"], hb["tokens"]) and torch.equal(ha["tokens"], hc["tokens"])
            assert torch.equal(ha["positional_scores"], hb["positional_scores"])
            assert torch.equal(ha["positional_scores"], hc["positional_scores"])
