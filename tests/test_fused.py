"""fused.py: the additive score's forward and backward as loops compiled by inductor (CPU fp32),
against fp64 autograd and the eager path (fused.ENABLED off); where it is not used; a failed
compilation. Where the plugin's C loops are built they run first (native.additive_score,
tests/test_native.py): here they are off, for the path they fall back to."""

import logging

import pytest
import torch

from conftest import build_model, enabled_in_a_fresh_process, random_tokens
from fairseq_s2s_attn import attention, fused, native
from fairseq_s2s_attn.attention import AdditiveScore, additive_scores

B, S, T, A = 3, 5, 4, 7


@pytest.fixture(autouse=True)
def without_the_c_loops(monkeypatch):
    monkeypatch.setattr(native, "SCORE", False)


@pytest.fixture
def calls(monkeypatch):
    """[(compiled function's name, whether it gave a result)] of every Fused call."""
    seen = []
    original = fused.Fused.__call__

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append((self.fn.__name__, out is not None))
        return out

    monkeypatch.setattr(fused.Fused, "__call__", spy)
    return seen


@pytest.fixture
def every_size(monkeypatch):
    """The compiled loops for the tests' small sizes too (their threshold is for speed only)."""
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)


def score_inputs(batched: bool, coverage: bool, dtype=torch.float64, seed: int = 5):
    """q, k, v [, coverage, w_c] and an upstream gradient, saturated values included."""
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_k = ((B, T, 1, A), (B, 1, S, A)) if batched else ((B, 1, A), (B, S, A))
    inputs = [torch.randn(shape_q, generator=g, dtype=dtype) * 3,
              torch.randn(shape_k, generator=g, dtype=dtype) * 3,
              torch.randn(A, generator=g, dtype=dtype)]
    if coverage:
        inputs += [torch.rand(shape_q[:-2] + (S, 1), generator=g, dtype=dtype),
                   torch.randn(A, generator=g, dtype=dtype)]
    return inputs, torch.randn(shape_q[:-2] + (S,), generator=g, dtype=dtype)


def plain_score(q, k, v, coverage=None, w_c=None):
    """v^T tanh(q + k [+ coverage w_c]) by autograd, the formula itself."""
    return torch.tanh(q + (k if coverage is None else k + coverage * w_c)) @ v


@pytest.mark.parametrize("coverage", ["none", "learned", "fixed"])
@pytest.mark.parametrize("batched", [False, True], ids=["one_step", "all_steps"])
def test_fused_score_and_gradients_equal_fp64_autograd(batched, coverage, calls, every_size):
    """fp32 on CPU: the forward and backward run compiled (one call each), and the scores and
    every gradient equal fp64 autograd's through v^T tanh(q + k [+ cov w_c]) to fp32 rounding; a
    coverage without gradient (the decoder's coverage is a sum of earlier weights, which do have
    one; here, detached) gets none and changes nothing else."""
    inputs, grad = score_inputs(batched, coverage != "none")
    ref = [t.clone().requires_grad_() for t in inputs]
    want_out = plain_score(*ref)
    want = torch.autograd.grad(want_out, ref, grad)
    ours = [t.float().requires_grad_(not (coverage == "fixed" and i == 3)) for i, t in enumerate(inputs)]
    out = AdditiveScore.apply(*ours)
    got = torch.autograd.grad(out, [t for t in ours if t.requires_grad], grad.float())
    assert calls == [("_fused_scores", True), ("_fused_score_grads", True)]
    assert out.dtype == torch.float32 and out.shape == want_out.shape
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    if coverage == "fixed":
        want = want[:3] + want[4:]
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("coverage", [False, True], ids=["plain", "coverage"])
@pytest.mark.parametrize("batched", [False, True], ids=["one_step", "all_steps"])
def test_decoding_scores_stay_eager(batched, coverage, calls, every_size):
    """Without autograd (beam search, validation) nothing is compiled: in a fairseq-generate run
    of the demo's test set the compilation at the start cost more than the loop saved."""
    inputs, _ = score_inputs(batched, coverage, dtype=torch.float32)
    with torch.no_grad():
        additive_scores(*inputs)
    assert calls == []


def test_the_eager_path_runs_off_the_cpu_fp32_path_and_for_small_inputs(calls, monkeypatch):
    """Compiled only for fp32 CPU values of at least MIN_ELEMENTS (below, a compiled call's guards
    cost more than the eager passes) and while switched on; fp64 and bf16 run eagerly."""
    inputs, grad = score_inputs(False, False, dtype=torch.float32)
    elements = B * S * A

    def train(dtype=torch.float32):
        x = [t.to(dtype).requires_grad_() for t in inputs]
        torch.autograd.grad(AdditiveScore.apply(*x), x, grad.to(dtype))

    monkeypatch.setattr(fused, "MIN_ELEMENTS", elements + 1)
    train()
    monkeypatch.setattr(fused, "MIN_ELEMENTS", elements)
    train(torch.float64)
    train(torch.bfloat16)
    assert calls == []
    train()
    assert calls == [("_fused_scores", True), ("_fused_score_grads", True)]
    monkeypatch.setattr(fused, "ENABLED", False)
    train()
    assert len(calls) == 2


def test_a_failed_compilation_warns_once_and_the_eager_path_runs(monkeypatch, caplog, every_size):
    """Without a working C++ compiler inductor cannot build its loop: one warning line naming
    the cause (and no other record: inductor's own, multi-line, comes when it fails), then every fused call (the others too) gives way to the eager path, whose results
    are right; nothing is compiled again."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(fused.Fused, "failure", None)
    # no kernel from the disk cache, no compiler
    no_compiler = inductor_config.patch({"fx_graph_cache": False, "cpp.cxx": ("/nonexistent/c++",)})

    def fresh(x, y):  # a function dynamo has not compiled before
        return (torch.sigmoid(x * 3 + y) * 5).sum(-1)

    first = fused.Fused(fresh)
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    with no_compiler, caplog.at_level(logging.WARNING):
        assert first(x, y) is None
        inputs, grad = score_inputs(False, True, dtype=torch.float32)
        inputs = [t.requires_grad_() for t in inputs]
        out = AdditiveScore.apply(*inputs)
        got = torch.autograd.grad(out, inputs, grad)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "compilation failed" in warnings[0]
    assert "C++ compiler" in warnings[0] and "\n" not in warnings[0]
    assert not fused.Fused("unused").usable(x, 10 ** 6)
    ref = [t.detach().double().requires_grad_() for t in inputs]
    want_out = plain_score(*ref)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, torch.autograd.grad(want_out, ref, grad.double())):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("precision", ["fp32", "cpu-bf16"])
@pytest.mark.parametrize("coverage", [False, True], ids=["plain", "coverage"])
def test_a_bahdanau_training_step_equals_the_eager_one(coverage, precision, gen, calls,
                                                        every_size, monkeypatch):
    """A training step of rnn_bahdanau (LSTM, or GRU with coverage), fp32 and --cpu-bf16: the
    score runs compiled at every decoder step, and the logits and every parameter's gradient
    equal the eager path's to rounding."""
    model = build_model("rnn_bahdanau_tiny", seed=3, init_range=0.3, coverage=coverage,
                        rnn_type="gru" if coverage else "lstm", cpu_bf16=precision == "cpu-bf16")
    d = model.decoder.dictionary
    src = random_tokens(d, [7, 4, 6, 2], left_pad=True, generator=gen)
    prev = torch.roll(random_tokens(d, [6, 3, 5, 2], left_pad=False, generator=gen), 1, 1)
    prev[:, 0] = d.eos()
    lengths = src.ne(d.pad()).sum(1)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(fused, "ENABLED", enabled)
        model.train()
        model.zero_grad(set_to_none=True)
        logits, _ = model(src, lengths, prev)
        logits.float().log_softmax(-1)[..., 4:9].sum().backward()
        results.append((logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}))
    steps = prev.size(1)
    assert calls == [("_fused_scores", True)] * steps + [("_fused_score_grads", True)] * steps
    (fused_logits, fused_grads), (eager_logits, eager_grads) = results
    tol = 1e-5 if precision == "fp32" else 2 ** -6  # bf16 products of slightly different inputs
    torch.testing.assert_close(fused_logits, eager_logits, rtol=tol, atol=tol)
    assert fused_grads.keys() == eager_grads.keys()
    for name, want in eager_grads.items():
        torch.testing.assert_close(fused_grads[name], want, rtol=tol,
                                   atol=tol * max(1e-3, float(want.abs().max())), msg=name)


@pytest.mark.parametrize("value, enabled", [(None, True), ("1", True), ("0", False)])
def test_s2s_fused_0_in_the_environment_keeps_the_eager_path(value, enabled):
    assert enabled_in_a_fresh_process("fused", "S2S_FUSED", value) == str(enabled)
