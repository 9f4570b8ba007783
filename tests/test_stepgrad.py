"""The step loop's weight gradients made once per batch (fairseq_s2s_attn/stepgrad.py) against
autograd's per-step products and sums (the plain path, DEFER off)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import build_model, random_tokens
from fairseq_s2s_attn import stepgrad

VARIANTS = {
    "bahdanau-lstm": ("rnn_bahdanau_tiny", dict(rnn_type="lstm")),
    "bahdanau-gru-coverage-2-layers": ("rnn_bahdanau_tiny", dict(
        rnn_type="gru", coverage=True, decoder_layers=2)),
    "luong-feed-lstm": ("rnn_luong_tiny", dict(rnn_type="lstm", input_feeding=True)),
    "luong-local-p-feed-2-layers": ("rnn_luong_tiny", dict(
        attention_mode="local-p", local_window=2, input_feeding=True, decoder_layers=2)),
}


def batch(model, gen, tgt_lengths=(6, 3, 5, 2)):
    d = model.decoder.dictionary
    src = random_tokens(d, [7, 4, 6, 2], left_pad=True, generator=gen)
    prev = random_tokens(d, tgt_lengths, left_pad=False, generator=gen)
    prev = torch.roll(prev, 1, 1)
    prev[:, 0] = d.eos()
    return src, src.ne(d.pad()).sum(1), prev


def train_step(model, src, lengths, prev):
    """Logits and every parameter's gradient of one training forward + backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits, _ = model(src, lengths, prev)
    logits.float().log_softmax(-1)[..., 4:9].sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def deferred_names(model):
    """The parameters whose gradients the loop makes (its weights and the biases used with
    them); every other gradient must not change at all."""
    step = {id(w) for w in model.decoder.step_weights()}
    names = {n for n, p in model.named_parameters() if id(p) in step}
    return names | {n for n, _ in model.decoder.rnn.named_parameters(prefix="decoder.rnn")}


def changed_gradients(arch, overrides, precision, gen, monkeypatch, switch, may_change, tol):
    """One training step with ``stepgrad.<switch>`` on and off: the logits bit for bit, the same
    gradients; returns the names of those that differ, each one ``may_change`` allows, within
    ``tol`` (by precision) of the largest."""
    model = build_model(arch, seed=3, init_range=0.3, dtype=torch.float64 if precision == "fp64"
                        else torch.float32, cpu_bf16=precision == "cpu-bf16", **overrides)
    inputs = batch(model, gen)
    results = {}
    for on in (True, False):
        monkeypatch.setattr(stepgrad, switch, on)
        results[on] = train_step(model, *inputs)
    (logits, grads), (logits0, grads0) = results[True], results[False]
    assert torch.equal(logits, logits0)
    assert sorted(grads) == sorted(grads0)
    changed = {n for n in grads if not torch.equal(grads[n], grads0[n])}
    for n in changed:
        assert may_change(model, n), n
        scale = float(grads0[n].abs().max())
        assert float((grads[n] - grads0[n]).abs().max()) <= tol[precision] * scale, n
    return changed


@pytest.mark.parametrize("precision", ["fp64", "fp32", "cpu-bf16"])
@pytest.mark.parametrize("name", VARIANTS)
def test_deferred_weight_gradients_equal_the_per_step_ones(name, precision, gen, monkeypatch):
    """Logits and all other gradients bit for bit; the loop's weights' and biases' gradients to
    the rounding of their sums (fp64 1e-12, fp32 1e-5, bf16 products 2^-6 of the largest)."""
    monkeypatch.setattr(stepgrad, "DEFER_SOURCES", False)  # the weights' alone (next test)
    changed = changed_gradients(*VARIANTS[name], precision, gen, monkeypatch, "DEFER",
                                lambda model, n: n in deferred_names(model),
                                {"fp64": 1e-12, "fp32": 1e-5, "cpu-bf16": 2 ** -6})
    if precision == "cpu-bf16":  # one rounding instead of bf16 sums over the steps
        assert "decoder.rnn.weight_hh_l0" in changed


class ShapedProducts(TorchDispatchMode):
    """Counts the products (ops named ``ops``) whose output has one of the given shapes."""

    def __init__(self, ops, shapes):
        super().__init__()
        self.ops, self.shapes, self.count = ops, shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.ops and tuple(out.shape) in self.shapes:
            self.count += 1
        return out


def assert_same_gradients(got, want):
    """Gradients (None where none) equal to fp64 rounding."""
    for g, g0 in zip(got, want):
        if g0 is None:
            assert g is None
        else:
            torch.testing.assert_close(g, g0, rtol=1e-12, atol=1e-12)


SOURCE_VARIANTS = {
    "luong-feed-lstm": VARIANTS["luong-feed-lstm"],  # general, the architecture's score
    "luong-local-p-feed-2-layers": VARIANTS["luong-local-p-feed-2-layers"],
    "luong-dot-feed": ("rnn_luong_tiny", dict(attention="dot", input_feeding=True)),
    "luong-general-feed-gru-2-layers": ("rnn_luong_tiny", dict(
        attention="general", input_feeding=True, rnn_type="gru", decoder_layers=2)),
    # additive scores: the step loop leaves the source side to autograd
    "bahdanau-lstm": VARIANTS["bahdanau-lstm"],
    "bahdanau-gru-coverage-2-layers": VARIANTS["bahdanau-gru-coverage-2-layers"],
    "luong-concat-feed": ("rnn_luong_tiny", dict(attention="concat", input_feeding=True)),
}


@pytest.mark.parametrize("precision", ["fp64", "fp32", "cpu-bf16"])
@pytest.mark.parametrize("name", SOURCE_VARIANTS)
def test_deferred_source_gradients_equal_the_per_step_ones(name, precision, gen, monkeypatch):
    """The attention's keys and values with their gradients made once per batch (``bmm``) for
    the dot and general scores: logits bit for bit, every gradient to the rounding of the sums
    (fp64 1e-12, fp32 1e-5, bf16 2^-4 of the largest: autograd sums bf16 keys' gradient in
    bf16, a rounding per step, 2^-5.4 seen here; the loop sums in fp32,
    ``test_bf16_source_gradient_is_summed_in_fp32``). Only those upstream of the source side
    change (the encoder's, the key projection's). Additive scores: nothing changes at all."""
    arch, overrides = SOURCE_VARIANTS[name]
    products = overrides.get("attention", "general" if arch == "rnn_luong_tiny" else "additive") \
        in ("dot", "general")
    changed = changed_gradients(arch, overrides, precision, gen, monkeypatch, "DEFER_SOURCES",
                                lambda model, n: products and (n.startswith("encoder.")
                                                               or "key_proj" in n),
                                {"fp64": 1e-12, "fp32": 1e-5, "cpu-bf16": 2 ** -4})
    if precision == "fp32" and products:  # (bf16-rounded terms can sum exactly in either order)
        assert any(n.startswith("encoder.") for n in changed), changed


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "plain"])
@pytest.mark.parametrize("cpu_bf16", [False, True], ids=["fp32", "cpu-bf16"])
@pytest.mark.parametrize("score", ["dot", "additive"])
def test_source_gradient_products_do_not_grow_with_the_target_length(score, defer, cpu_bf16,
                                                                     gen, monkeypatch):
    """The source side's gradient products (B x S x C outputs) of the dot score: two per batch
    (the keys' and the values'), as many for 9 target steps as for 5. Autograd's path makes them
    at every step, and so does the additive score's loop (its values' gradient, left to
    autograd)."""
    monkeypatch.setattr(stepgrad, "DEFER_SOURCES", defer)
    model = build_model("rnn_luong_tiny", seed=3, cpu_bf16=cpu_bf16, attention=score,
                        input_feeding=True)
    counts = []
    for t in (5, 9):
        inputs = batch(model, gen, tgt_lengths=(t, 3, t - 1, 2))
        src = inputs[0]
        shape = (src.size(0), src.size(1), model.encoder.output_dim)
        with ShapedProducts(("bmm",), {shape}) as mode:
            train_step(model, *inputs)
        counts.append(mode.count)
    if defer and score == "dot":
        assert counts[0] == counts[1] == 2
    else:
        assert counts[1] >= counts[0] + 4  # 4 more steps


def test_loop_source_products_and_gradients_against_autograd():
    """``bmm`` directly: x M^T and x M over one source each, a step whose output gets no
    gradient, one source in both orientations, a source outside the loop, a source needing no
    gradient: every gradient equals autograd's (fp64)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=grad)

    keys, values, other, frozen = rand(2, 5, 3), rand(2, 5, 4), rand(2, 5, 3), rand(2, 5, 3, grad=False)
    qs = [rand(2, 1, 3) for _ in range(3)]
    ws = [rand(2, 2, 5) for _ in range(3)]
    leaves = [keys, values, other] + qs + ws

    def run(defer):
        for t in leaves:
            t.grad = None
        bmm = stepgrad.bmm if defer else (lambda x, m, transposed=False: torch.bmm(
            x, m.transpose(1, 2) if transposed else m))
        with stepgrad.step_loop([], keys, [keys, values, frozen]) if defer else contextlib.nullcontext():
            ys = [bmm(q, keys, transposed=True) for q in qs]
            ys += [bmm(w, values) for w in ws[:2]]
            bmm(ws[2], values)  # a step whose output gets no gradient
            ys.append(bmm(ws[0], keys))  # the keys in the other orientation too
            ys.append(bmm(qs[0], other, transposed=True))  # not a source of the loop
            ys.append(bmm(qs[1], frozen, transposed=True))
        loss = sum((y * y).sum() for y in ys)
        loss.backward()
        return [None if t.grad is None else t.grad.clone() for t in leaves]

    with stepgrad.step_loop([], keys, [keys]):  # sources registered only within the loop
        pass
    assert not stepgrad._SOURCES
    assert_same_gradients(run(True), run(False))


def test_bf16_source_gradient_is_summed_in_fp32():
    """bf16 keys (autocast's output) over 24 steps: the loop's gradient is the fp64 sum of the
    steps' bf16 terms rounded once (2^-8); autograd's, summed in bf16 step by step, is further."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 7, 16, generator=gen).bfloat16().requires_grad_()
    qs = [torch.randn(3, 1, 16, generator=gen).bfloat16() for _ in range(24)]
    gs = [torch.randn(3, 1, 7, generator=gen).bfloat16() for _ in range(24)]
    exact = sum(torch.bmm(g.double().transpose(1, 2), q.double()) for q, g in zip(qs, gs))
    errors = []
    for defer in (True, False):
        keys.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                (stepgrad.step_loop([], keys, [keys]) if defer else contextlib.nullcontext()):
            ys = [stepgrad.bmm(q, keys, transposed=True) for q in qs]
        torch.autograd.backward(ys, gs)
        assert keys.grad.dtype == torch.bfloat16
        errors.append(float((keys.grad.double() - exact).abs().max() / exact.abs().max()))
    assert errors[0] <= 2 ** -8 and errors[0] < errors[1], errors


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "plain"])
@pytest.mark.parametrize("cpu_bf16", [False, True], ids=["fp32", "cpu-bf16"])
def test_weight_gradient_products_do_not_grow_with_the_target_length(defer, cpu_bf16, gen,
                                                                     monkeypatch):
    """One gradient product per loop weight and batch: as many for 9 target steps as for 5.
    Autograd's path makes one per weight and step (plus the output layer's, the keys')."""
    monkeypatch.setattr(stepgrad, "DEFER", defer)
    model = build_model("rnn_bahdanau_tiny", seed=3, cpu_bf16=cpu_bf16)
    shapes = {tuple(w.shape) for w in model.decoder.step_weights()}  # not v's (in the score)
    counts = []
    for t in (5, 9):
        inputs = batch(model, gen, tgt_lengths=(t, 3, t - 1, 2))
        with ShapedProducts(("mm", "addmm"), shapes) as mode:
            train_step(model, *inputs)
        counts.append(mode.count)
    if defer:
        assert counts[0] == counts[1]
    else:
        assert counts[1] >= counts[0] + 4 * 2  # 4 more steps, 2 or more weights per step


def test_step_loop_opens_only_for_training_on_a_cpu(monkeypatch):
    """No loop without autograd recording (decoding, validation), off a CPU, with DEFER off, or
    inside an open one (one loop at a time); weights needing no gradient are not taken."""
    w = torch.nn.Parameter(torch.randn(3, 2))
    with stepgrad.step_loop([w], w):
        assert stepgrad.deferred(w) is not None
        with stepgrad.step_loop([w], w):  # nested: the outer loop stays
            assert stepgrad.deferred(w) is not None
        frozen = torch.randn(3, 2)
        stepgrad.add(frozen)
        assert stepgrad.deferred(frozen) is None
    assert stepgrad.deferred(w) is None
    with torch.no_grad(), stepgrad.step_loop([w], w):
        assert stepgrad.deferred(w) is None
    with stepgrad.step_loop([w], torch.empty(1, device="meta")):
        assert stepgrad.deferred(w) is None
    monkeypatch.setattr(stepgrad, "DEFER", False)
    with stepgrad.step_loop([w], w):
        assert stepgrad.deferred(w) is None


def test_loop_products_and_gradients_against_autograd():
    """The module's products directly: y_i = x_i W^T + b and add + x_i W^T, a step whose output
    gets no gradient, the loop's copy of W used outside a product, W itself outside the loop:
    every gradient equals autograd's (fp64)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    add = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def run(defer):
        for t in [w, b, add] + xs:
            t.grad = None
        with stepgrad.step_loop([w], w) if defer else contextlib.nullcontext():
            if defer:
                loop_w = stepgrad.deferred(w)
                ys = [loop_w(xs[0], b), stepgrad.addmm(add, xs[1], w)]
                loop_w(xs[2], b)  # a step whose output gets no gradient
                ys.append(loop_w.copies[0] * 2)  # the loop's copy of W used outside a product
            else:
                ys = [F.linear(xs[0], w, b), torch.addmm(add, xs[1], w.t())]
                F.linear(xs[2], w, b)
                ys.append(w * 2)
        loss = sum((y * y).sum() for y in ys) + (w * w).sum()
        loss.backward()
        return [t.grad.clone() if t.grad is not None else None for t in [w, b, add] + xs]

    assert_same_gradients(run(True), run(False))


def test_a_retained_graph_gives_the_same_weight_gradients_again(gen):
    """backward twice through a retained graph: the second adds the same gradients again."""
    model = build_model("rnn_luong_tiny", seed=3, dtype=torch.float64, input_feeding=True)
    src, lengths, prev = batch(model, gen)
    model.train()
    model.zero_grad(set_to_none=True)
    logits, _ = model(src, lengths, prev)
    loss = logits.log_softmax(-1)[..., 4:9].sum()
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss.backward()
    for n, p in model.named_parameters():
        if n in once:
            torch.testing.assert_close(p.grad, 2 * once[n], rtol=1e-12, atol=1e-12, msg=n)


def test_a_loop_keeps_nothing_alive_after_its_backward(gen, monkeypatch):
    """Nothing of a loop outlives its graph: after backward, with the outputs dropped, every
    loop weight's record of the steps (their inputs) is freed at once, without the garbage
    collector (a reference cycle through autograd's nodes, which Python's collector cannot
    see, kept each batch's step inputs alive: fairseq-train grew to 24 GB in 4,500 updates)."""
    import gc
    import weakref

    tapes = []
    init = stepgrad.Tape.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        tapes.append(weakref.ref(self))

    monkeypatch.setattr(stepgrad.Tape, "__init__", recorded)
    gc.disable()  # from the start: a collection during training would free a cycle too
    try:
        for cpu_bf16 in (False, True):
            model = build_model("rnn_luong_tiny", seed=3, input_feeding=True, cpu_bf16=cpu_bf16)
            train_step(model, *batch(model, gen))
        assert len(tapes) >= 4  # W_h, W_x and W_c per model
        assert all(ref() is None for ref in tapes)
    finally:
        gc.enable()
    gc.collect()
