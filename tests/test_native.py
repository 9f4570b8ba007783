"""native.py: the LSTM and GRU cells' element-wise halves as C loops (CPU, fp32 and bf16),
against fp64 autograd of the formulas and the eager path (native.ENABLED off); where they are
not used; the library's build (cache, flags, a failed compilation, S2S_NATIVE=0)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import build_model, enabled_in_a_fresh_process, random_tokens
from fairseq_s2s_attn import decoder, native

B, H = 5, 19  # H not a multiple of the vector width: the loops' remainders run too


@pytest.fixture
def calls(monkeypatch):
    """[(cell, whether autograd records it)] of every call into the C loops."""
    seen = []
    for name in ("lstm_cell", "gru_cell"):
        original = getattr(native, name)

        def spy(igates, hgates, state, _original=original, _name=name):
            seen.append((_name, native._recording(igates, hgates, state)))
            return _original(igates, hgates, state)

        monkeypatch.setattr(native, name, spy)
    return seen


def cell_inputs(lstm: bool, dtype, seed: int = 0, row_stride: int = 0):
    """igates, hgates (B x 4H or 3H, saturating values included; given ``row_stride``, wider
    tensors whose first 4H or 3H columns are the gates), the state, and the outputs' upstream
    gradients."""
    g = torch.Generator().manual_seed(seed)
    width = (4 if lstm else 3) * H

    def gates():
        x = torch.randn(B, max(width, row_stride), generator=g, dtype=torch.float64) * 3
        x[0, :6] = torch.tensor([30.0, -30.0, 0.0, 1e-3, -60.0, 60.0])
        return x.to(dtype)

    state = torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype)
    grads = [torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    return gates(), gates(), state, grads if lstm else grads[:1]


def run_cell(lstm: bool, inputs, upstream, keep=(True, True)):
    """The cell through decoder.lstm_from_gates/gru_from_gates on the gates' first 4H or 3H
    columns (views with the inputs' row stride): outputs and input gradients (the upstream
    gradient of an LSTM output left out where ``keep`` says so)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    width = (4 if lstm else 3) * leaves[2].size(1)
    igates, hgates = (x[:, :width] for x in leaves[:2])
    assert igates.stride(0) == inputs[0].size(1)
    outs = (decoder.lstm_from_gates(igates, hgates, leaves[2]) if lstm
            else (decoder.gru_from_gates(igates, hgates, leaves[2]),))
    used = [(o, g) for o, g, k in zip(outs, upstream, keep) if k]
    grads = torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used])
    return [o.detach() for o in outs], [grads[0][:, :width], grads[1][:, :width], grads[2]]


@pytest.mark.parametrize("row_stride", [0, 100], ids=["contiguous", "strided_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lstm, keep", [(True, (True, True)), (True, (True, False)),
                                        (True, (False, True)), (False, (True,))],
                         ids=["lstm_h_and_c", "lstm_h_only", "lstm_c_only", "gru"])
def test_the_loops_equal_the_cell_formulas(lstm, keep, dtype, row_stride, calls, monkeypatch):
    """Outputs and the gradients of both gate pre-activations and of the state, against fp64
    autograd of decoder's formulas. fp32: a few ulp (the C library's vector expf/tanhf); bf16:
    within one rounding of the exact value (fp32 inside, one rounding per output), closer than
    the eager path, which rounds after every operation."""
    igates, hgates, state, upstream = cell_inputs(lstm, dtype, row_stride=row_stride)
    got = run_cell(lstm, (igates, hgates, state), upstream, keep)
    assert calls == [("lstm_cell" if lstm else "gru_cell", True)]
    monkeypatch.setattr(native, "ENABLED", False)
    eager = run_cell(lstm, (igates, hgates, state), upstream, keep)
    exact = run_cell(lstm, [t.double() for t in (igates, hgates, state)],
                     [g.double() for g in upstream], keep)
    assert len(calls) == 1
    for mine, plain, want in zip(got[0] + got[1], eager[0] + eager[1], exact[0] + exact[1]):
        assert mine.dtype == dtype and mine.shape == want.shape
        scale = float(want.abs().max()) or 1.0
        if dtype == torch.float32:
            torch.testing.assert_close(mine.double(), want, rtol=1e-6, atol=2e-6 * scale)
        else:
            bound = 2.0 ** -8 * want.abs() + 2 ** -9 * 2 ** -6 * scale
            assert ((mine.double() - want).abs() <= bound).all()
            assert (mine.double() - want).abs().sum() <= (plain.double() - want).abs().sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lstm", [True, False], ids=["lstm", "gru"])
def test_decoding_runs_the_loop_without_keeping_activations(lstm, dtype, calls, monkeypatch):
    """Under no_grad (beam search) the loop writes the outputs only: the same bits as training's
    forward."""
    igates, hgates, state, upstream = cell_inputs(lstm, dtype, seed=1)
    trained = run_cell(lstm, (igates, hgates, state), upstream)[0]
    with torch.no_grad():
        decoded = decoder.lstm_from_gates(igates, hgates, state) if lstm else \
            (decoder.gru_from_gates(igates, hgates, state),)
    name = "lstm_cell" if lstm else "gru_cell"
    assert calls == [(name, True), (name, False)]
    with torch.no_grad():  # the C call's last argument, the activations, is NULL
        seen = []
        monkeypatch.setattr(native, "_call", lambda *a, _f=native._call: seen.append(a) or _f(*a))
        (decoder.lstm_from_gates if lstm else decoder.gru_from_gates)(igates, hgates, state)
        assert [(a[0], a[-1]) for a in seen] == [(name.replace("cell", "forward"), None)]
    for a, b in zip(trained, decoded):
        assert torch.equal(a, b)


def test_other_dtypes_devices_and_compilation_take_the_eager_formulas(monkeypatch):
    x, s = torch.randn(2, 4 * H), torch.randn(2, H)
    assert native.usable(x, x, s)
    assert not native.usable(x.double(), x.double(), s.double())
    assert not native.usable(x.half(), x.half(), s.half())
    assert not native.usable(x, x, s.double())  # mixed dtypes: the formulas decide the promotion
    assert not native.usable(x, x.bfloat16(), s)
    assert not native.usable(x.to("meta"), x, s)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not native.usable(x, x, s)
    monkeypatch.undo()
    monkeypatch.setattr(native, "CELLS", False)  # train_ab's lever: the cells alone
    assert not native.usable(x, x, s) and native.loss_rows_usable(x, torch.zeros(2).long(), x.dtype)
    monkeypatch.undo()
    monkeypatch.setattr(native, "ENABLED", False)
    assert not native.usable(x, x, s)


def test_the_backward_is_not_differentiable_again():
    """A second derivative through the loop raises (the C backward records no graph), rather than
    leaving the cell's second-order terms out silently."""
    igates, hgates, state, upstream = cell_inputs(True, torch.float32)
    inputs = [t.requires_grad_() for t in (igates, hgates, state)]
    h, _ = decoder.lstm_from_gates(*inputs)
    upstream = upstream[0].requires_grad_()  # a gradient that is itself differentiated
    (g,) = torch.autograd.grad(h, inputs[0], upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def run_python(code: str, **env):
    """Runs code in a fresh interpreter (the library loaded anew), environment updated by env."""
    full = dict(os.environ)
    full.update(env)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


LOAD = """
    import logging, torch
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from fairseq_s2s_attn import native
    print(native.library() is not None, native.ENABLED)
    print(float(torch.tensor([1e-40]) * 1.0) != 0.0)  # denormals kept
"""


def test_the_library_keeps_the_processs_denormals(tmp_path):
    """The library must not bring GCC's crtfastmath.o (linked with -ffast-math), whose start-up
    code sets flush-to-zero for the whole process: torch's own kernels would then round every
    denormal to zero after the first decoder step."""
    done = run_python(LOAD, XDG_CACHE_HOME=str(tmp_path))
    assert done.stdout.split() == ["True", "True", "True"]


def test_the_library_is_built_once_per_cache(tmp_path):
    """The first process compiles (one compiler call besides --version), later ones load the
    cached library."""
    log = tmp_path / "calls"
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec cc "$@"\n')
    cc.chmod(0o755)
    for _ in range(2):
        done = run_python(LOAD, XDG_CACHE_HOME=str(tmp_path / "cache"), CC=str(cc))
        assert done.stdout.split()[0] == "True" and done.stderr == ""
    calls = log.read_text().split()
    assert calls.count("--version") == 2 and len(calls) == 3
    assert len(list((tmp_path / "cache" / "fairseq_s2s_attn").glob("cells-*.so"))) == 1
    assert not [p for p in (tmp_path / "cache" / "fairseq_s2s_attn").iterdir() if p.is_dir()]


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"], ids=["missing", "failing"])
def test_a_failed_build_warns_once_and_the_eager_path_runs(tmp_path, compiler):
    """No compiler, or one that fails: one warning line naming the cause, then torch's
    element-wise operations, with the same results as the formulas (dropout's eager masks, the
    additive score's eager passes)."""
    done = run_python(LOAD + """
    from fairseq_s2s_attn import decoder
    x, s = torch.randn(3, 40, requires_grad=True), torch.randn(3, 10)
    h, c = decoder.lstm_from_gates(x, x * 2, s)
    i, f, g, o = (x * 3).chunk(4, 1)
    c2 = torch.sigmoid(f) * s + torch.sigmoid(i) * torch.tanh(g)
    print(torch.equal(c, c2) and torch.equal(h, torch.sigmoid(o) * torch.tanh(c2)))
    h.sum().backward()
    print(native.library() is None)
    from fairseq_s2s_attn import dropout
    y = dropout.cpu_dropout(torch.ones(100), 0.5)
    print(bool(((y == 0) | (y == 2)).all() and (y == 0).any()))
    from fairseq_s2s_attn import attention
    q, k, v = torch.randn(2, 1, 8), torch.randn(2, 5, 8), torch.randn(8)
    print(torch.allclose(attention.additive_scores(q, k, v), torch.tanh(q + k) @ v, atol=1e-5))
    """, XDG_CACHE_HOME=str(tmp_path), CC=compiler)
    assert done.stdout.split() == ["False", "True", "True", "True", "True", "True", "True"]
    warning = done.stderr.strip()
    assert "\n" not in warning
    assert warning.startswith("the C loops of the LSTM/GRU cells, the fused loss, dropout and the "
                              "additive score are off (")
    assert compiler.split("/")[-1] in warning or "cc" in warning


@pytest.mark.parametrize("value, enabled", [(None, True), ("1", True), ("0", False)])
def test_s2s_native_0_in_the_environment_keeps_the_eager_path(value, enabled):
    assert enabled_in_a_fresh_process("native", "S2S_NATIVE", value) == str(enabled)


@pytest.mark.parametrize("precision", ["fp32", "cpu-bf16"])
@pytest.mark.parametrize("arch, options", [
    ("rnn_luong_tiny", dict(rnn_type="lstm", decoder_layers=2, input_feeding=True)),
    ("rnn_bahdanau_tiny", dict(rnn_type="gru", coverage=True)),
], ids=["luong_lstm_2_layers", "bahdanau_gru_coverage"])
def test_a_training_step_equals_the_eager_one(arch, options, precision, gen, calls, score_calls,
                                              monkeypatch):
    """A training step through the step loop: every layer's cell at every step runs the C loop
    (recorded by autograd), so does the additive score's (Bahdanau), and the logits and every
    parameter's gradient equal the eager path's to rounding. With --cpu-bf16 the two paths round differently (the loop once per
    output, eager after every operation) and the difference grows through the steps: both are
    compared with the fp32 model's step (the same weights), the loop about as far from it as
    eager (the single cell's test shows it closer: here rounding noise of the whole model)."""
    bf16 = precision == "cpu-bf16"
    d = None
    results = []
    for cpu_bf16, enabled in [(bf16, True), (bf16, False)] + [(False, False)] * bf16:
        model = build_model(arch, seed=3, init_range=0.3, cpu_bf16=cpu_bf16, **options)
        if d is None:
            d = model.decoder.dictionary
            src = random_tokens(d, [7, 4, 6, 2], left_pad=True, generator=gen)
            prev = torch.roll(random_tokens(d, [6, 3, 5, 2], left_pad=False, generator=gen), 1, 1)
            prev[:, 0] = d.eos()
            lengths = src.ne(d.pad()).sum(1)
        monkeypatch.setattr(native, "ENABLED", enabled)
        model.train()
        logits, _ = model(src, lengths, prev)
        logits.float().log_softmax(-1)[..., 4:9].sum().backward()
        results.append([logits.detach().float()] + [p.grad.clone() for p in model.parameters()])
    cell = "lstm_cell" if options["rnn_type"] == "lstm" else "gru_cell"
    assert calls == [(cell, True)] * (prev.size(1) * model.decoder.num_layers)
    # Bahdanau's additive score: the C loops at every step, both ways (fp32 keys with --cpu-bf16)
    steps = prev.size(1) if arch.startswith("rnn_bahdanau") else 0
    assert score_calls == ["additive_score"] * steps + ["additive_score_grads"] * steps
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    errors = []  # bf16: (the loop's, eager's) relative distance from the fp32 step, per tensor
    for name, mine, plain, *fp32 in zip(names, *results):
        if not bf16:
            torch.testing.assert_close(mine, plain, rtol=1e-5,
                                       atol=1e-5 * max(1e-3, float(plain.abs().max())), msg=name)
            continue
        want = fp32[0]
        errors.append([float((x - want).norm() / want.norm()) for x in (mine, plain)])
        assert errors[-1][0] < 0.05, name  # 0.2-2.7% seen, for both paths
    if bf16:  # on average over the tensors as close as eager: 0.94x (Luong), 1.06x (Bahdanau)
        mine, plain = (sum(e) / len(errors) for e in zip(*errors))
        assert mine <= 1.25 * plain


def loss_inputs(dtype, rows: int, vocab: int, seed: int = 0):
    """Logits (saturating rows included: one large, one very negative, one flat) and targets at
    the first, last and other positions."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4
    z[0, 3], z[1] = 80.0, z[1] - 90.0
    z[2] = 0.5
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[:3] = torch.tensor([0, vocab - 1, 3])
    return z.to(dtype), target


@pytest.mark.parametrize("smooth", [False, True], ids=["nll", "label_smoothed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_loss_rows_equal_the_chunked_loss(dtype, smooth, monkeypatch):
    """criterion._loss_and_gradient through the C loop: -log p(target), -sum_j log p_j and the
    gradient written over the logits, against the same function on the fp64 logits (eager
    chunks). fp32: a few ulp; bf16: the gradient within one rounding of the exact value (one
    rounding per value, as the eager path)."""
    from fairseq_s2s_attn import criterion

    rows, vocab = 9, 37
    z, target = loss_inputs(dtype, rows, vocab)
    c_nll, c_smooth = (0.9, 0.1 / (vocab - 1)) if smooth else (1.0, 0.0)
    seen = []
    monkeypatch.setattr(native, "loss_rows",
                        lambda *a, _f=native.loss_rows: seen.append(1) or _f(*a))
    got_z = z.clone()
    nll, smooth_rows, hits = criterion._loss_and_gradient(got_z, target, torch.float32, c_nll,
                                                          c_smooth, False)
    assert seen == [1] and hits is None and nll.dtype == torch.float32
    want_z = z.double()
    want_nll, want_smooth, _ = criterion._loss_and_gradient(want_z, target, torch.float64, c_nll,
                                                            c_smooth, False)
    assert seen == [1]  # fp64: the eager chunks
    torch.testing.assert_close(nll.double(), want_nll, rtol=2e-6, atol=2e-6)
    assert (smooth_rows is None) == (not smooth)
    if smooth:
        torch.testing.assert_close(smooth_rows.double(), want_smooth, rtol=2e-6, atol=1e-4)
    if dtype == torch.float32:
        torch.testing.assert_close(got_z.double(), want_z, rtol=1e-5, atol=1e-6)
    else:
        assert ((got_z.double() - want_z).abs() <= 2.0 ** -8 * want_z.abs() + 1e-30).all()


def test_the_loss_rows_are_not_used_for_accuracy_or_other_dtypes(monkeypatch):
    from fairseq_s2s_attn import criterion

    z, target = loss_inputs(torch.float32, 4, 11)
    monkeypatch.setattr(native, "loss_rows", lambda *a: pytest.fail("loss_rows called"))
    criterion._loss_and_gradient(z.clone(), target, torch.float32, 1.0, 0.0, True)  # accuracy
    criterion._loss_and_gradient(z.double(), target, torch.float64, 1.0, 0.0, False)
    criterion._loss_and_gradient(z.t().contiguous().t(), target, torch.float32, 1.0, 0.0, False)
    monkeypatch.setattr(native, "LOSS_ROWS", False)
    criterion._loss_and_gradient(z.clone(), target, torch.float32, 1.0, 0.0, False)
    monkeypatch.undo()
    assert native.loss_rows_usable(z, target, torch.float32)
    assert not native.loss_rows_usable(z, target.int(), torch.float32)


# dropout (native.dropout, dropout.cpu_dropout's C loop)

MASK64 = (1 << 64) - 1


def splitmix_keep(seed: int, n: int, threshold: int) -> torch.Tensor:
    """The mask the C loop must make, from SplitMix64 written out in Python: element i keeps when
    lane i % 4 (16 bits) of word i // 4, read as an int16, is >= threshold."""
    keep = []
    for w in range((n + 3) // 4):
        z = (seed + (w + 1) * 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        for k in range(4):
            bits = (z >> (16 * k)) & 0xFFFF
            keep.append((bits - (1 << 16) if bits >= 1 << 15 else bits) >= threshold)
    return torch.tensor(keep[:n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(7, 9), (4, 16)], ids=["tail", "whole_words"])
def test_the_dropout_loop_applies_its_generators_mask(shape, dtype):
    """Output and gradient are x keep scale and g keep scale with SplitMix64's mask for the
    seed, bit for bit (one rounding in both), the same mask both ways (backward makes it
    again); n not a multiple of 4 runs the tail. Fails with another lane order, another
    counter, a mask not made again from the same seed."""
    from fairseq_s2s_attn import dropout as D

    p = 0.3
    seed, threshold, scale = -0x2152411021524111, D.drop_threshold(p), 1 / (1 - D.effective_p(p))
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).requires_grad_()
    up = torch.randn(*shape, generator=g).to(dtype)
    keep = splitmix_keep(seed & MASK64, x.numel(), threshold).view(shape)
    assert 0 < keep.float().mean() < 1
    assert native.library() is not None
    y = native.Dropout.apply(x, seed, threshold, scale)
    assert y.dtype == dtype and torch.equal(y, torch.mul(x.detach(), keep).mul_(scale))
    (grad,) = torch.autograd.grad(y, x, up, create_graph=True)
    assert torch.equal(grad, torch.mul(up, keep).mul_(scale))
    # double backward: the gradient is linear in up with the same mask
    u = up.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(native.Dropout.apply(x, seed, threshold, scale), x, u,
                                  create_graph=True)
    (again,) = torch.autograd.grad(grad, u, torch.ones_like(grad))
    assert torch.equal(again, torch.mul(torch.ones_like(up), keep).mul_(scale))


def test_dropout_takes_the_loop_for_fp32_and_bf16_cpu_tensors_only(monkeypatch):
    from fairseq_s2s_attn import dropout as D

    seen = []
    monkeypatch.setattr(native, "dropout", lambda x, *a, _f=native.dropout: seen.append(x.dtype)
                        or _f(x, *a))
    x = torch.rand(6, 5) + 1
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
        y = D.cpu_dropout(x.to(dtype), 0.5)
        assert y.dtype == dtype and ((y == 0) | (y == x.to(dtype) * 2)).all()
    assert seen == [torch.float32, torch.bfloat16]
    monkeypatch.setattr(native, "DROPOUT", False)
    D.cpu_dropout(x, 0.5)
    monkeypatch.setattr(native, "DROPOUT", True)
    monkeypatch.setattr(native, "ENABLED", False)
    D.cpu_dropout(x, 0.5)
    assert seen == [torch.float32, torch.bfloat16]
    # a strided input: the loop reads a contiguous copy, the gradient keeps the input's strides
    monkeypatch.setattr(native, "ENABLED", True)
    x = (torch.rand(8, 16, 4) + 1).transpose(0, 1).requires_grad_()
    y = D.cpu_dropout(x, 0.5)
    kept = y != 0
    assert torch.equal(y[kept], x.detach()[kept] * 2)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * 2)


# the additive score (native.additive_score, attention.AdditiveScore on a CPU in fp32)

def score_inputs(groups: int, coverage: bool, seed: int = 0, spread: float = 1.0):
    """q, k, v (, coverage, w_c) in fp64 for B 3, S 7, A 19 (not a multiple of the vector
    width): q B x 1 x A with k B x S x A (groups 0: a training step), or q B x G x 1 x A with
    k B x 1 x S x A (G hypotheses per sentence)."""
    g = torch.Generator().manual_seed(seed)
    B, S, A = 3, 7, 19

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * spread).requires_grad_()

    q = rand(B, 1, A) if not groups else rand(B, groups, 1, A)
    k = rand(B, S, A) if not groups else rand(B, 1, S, A)
    out = [q, k, rand(A)]
    if coverage:
        rows = (B,) if not groups else (B, groups)
        out += [(torch.rand(*rows, S, 1, generator=g, dtype=torch.float64) * 3).requires_grad_(),
                rand(A)]
    return out


def score_formula(q, k, v, coverage=None, w_c=None):
    """v^T tanh(q + k [+ coverage w_c]) by torch's operations."""
    keys = k if coverage is None else k + coverage * w_c
    return torch.tanh(q + keys) @ v


@pytest.fixture
def score_calls(monkeypatch):
    seen = []
    for name in ("additive_score", "additive_score_grads"):
        original = getattr(native, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(native, name, spy)
    return seen


@pytest.mark.parametrize("spread", [1.0, 40.0], ids=["moderate", "saturating"])
@pytest.mark.parametrize("coverage", [False, True], ids=["plain", "coverage"])
@pytest.mark.parametrize("groups", [0, 3], ids=["step", "hypotheses"])
def test_the_score_loops_equal_the_formula(groups, coverage, spread, score_calls, monkeypatch):
    """The scores and every operand's gradient through AdditiveScore (training) and the scores
    without autograd (decoding), against fp64 autograd of v^T tanh(q + k + cov w_c): fp32
    rounding (the loops' exp within 1 ulp of the correctly rounded one), at most twice as far
    from the exact values as the eager fp32 path. Saturating: |q + k| up to ~200, where
    sigmoid(2x) is 0 or 1 and its exp is clamped. Fails with a key block other than r / G, a
    coverage term left out of either direction, a gradient summed over the wrong rows."""
    from fairseq_s2s_attn import attention, fused

    exact = score_inputs(groups, coverage, spread=spread)
    want = score_formula(*exact)
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    want_grads = torch.autograd.grad(want, exact, upstream)

    def run():
        leaves = [t.detach().float().requires_grad_() for t in exact]
        out = attention.AdditiveScore.apply(*leaves)
        return leaves, out, torch.autograd.grad(out, leaves, upstream.float())

    leaves, got, grads = run()
    assert score_calls == ["additive_score", "additive_score_grads"]
    fused_enabled = fused.ENABLED
    monkeypatch.setattr(native, "SCORE", False)
    monkeypatch.setattr(fused, "ENABLED", False)
    _, eager, eager_grads = run()
    monkeypatch.setattr(native, "SCORE", True)
    monkeypatch.setattr(fused, "ENABLED", fused_enabled)
    assert got.dtype == torch.float32 and got.shape == want.shape

    def error(x, w):
        return float((x.double() - w).abs().max())

    floor = 1e-6 * max(1.0, float(want.abs().max()))
    assert error(got, want) <= 2 * error(eager, want) + floor
    names = ["q", "k", "v", "coverage", "w_c"]
    for name, g, e, w in zip(names, grads, eager_grads, want_grads):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        assert error(g, w) <= 2 * error(e, w) + 1e-6 * max(1.0, float(w.abs().max())), name
    with torch.no_grad():
        decoded = attention.additive_scores(*leaves)
    assert score_calls[-1] == "additive_score" and torch.equal(decoded, got)


def test_the_score_loops_are_not_used_elsewhere(score_calls, monkeypatch):
    """bf16 and fp64 operands, a layout the loops do not take (q B x T x 1 x A with k B x S x A),
    the switch off: the eager path (or inductor's loop), with the formula's values."""
    from fairseq_s2s_attn import attention

    q, k, v = (t.detach() for t in score_inputs(0, False))
    want = score_formula(q, k, v)
    torch.testing.assert_close(attention.additive_scores(q, k, v), want)  # fp64
    got = attention.additive_scores(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.dtype == torch.bfloat16
    q4 = q.float().unsqueeze(1).expand(3, 2, 1, 19)  # B x T x 1 x A against k B x S x A
    assert not native.score_usable(q4, k.float(), None)
    monkeypatch.setattr(native, "SCORE", False)
    torch.testing.assert_close(attention.additive_scores(q.float(), k.float(), v.float()),
                               want.float(), rtol=1e-5, atol=1e-5)
    assert score_calls == []
    monkeypatch.setattr(native, "SCORE", True)
    assert native.score_usable(q.float(), k.float(), None)
    assert not native.score_usable(q.float(), k.float(), torch.zeros(3, 7, 1, dtype=torch.float64))


# the log-softmax of decoding (native.log_softmax, RNNDecoder.get_normalized_probs)

def lsm_logits(dtype, rows: int = 7, vocab: int = 53, seed: int = 3):
    """rows x 2 x vocab logits (vocab not a multiple of the vector width), a -inf and a large
    spread included."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, 2, vocab, generator=g, dtype=torch.float64) * 4
    z[0, 0, :3] = torch.tensor([-float("inf"), 80.0, -80.0])
    return z.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_log_softmax_loop_equals_the_formula(dtype):
    """fp32 log-probabilities of fp32 or bf16 logits against log_softmax in fp64 of the same
    values: a few ulp of the values' magnitude (torch's fp32 row kernel is as far), -inf kept."""
    z = lsm_logits(dtype)
    assert native.log_softmax_usable(z)
    got = native.log_softmax(z)
    assert got.dtype == torch.float32 and got.shape == z.shape
    want = torch.log_softmax(z.double(), -1)
    assert got[0, 0, 0] == -float("inf")
    finite = want.isfinite()
    assert torch.equal(finite, got.isfinite())
    err = (got.double() - want)[finite].abs()
    assert (err <= 4e-7 * want[finite].abs() + 2e-6).all(), err.max()
    eager = torch.log_softmax(z.float(), -1).double()
    assert (err.max() <= 4 * (eager - want)[finite].abs().max() + 1e-6)


def test_the_log_softmax_loop_makes_torchs_nan_rows():
    """Rows with a NaN, a +inf or only -inf come out all NaN, as from torch's log_softmax; the
    other rows are unaffected."""
    z = lsm_logits(torch.float32, rows=4)
    z[1, 0, 5], z[2, 1, 7], z[3, 0] = float("nan"), float("inf"), -float("inf")
    got, want = native.log_softmax(z), torch.log_softmax(z, -1)
    assert torch.equal(got.isnan(), want.isnan()) and want[1, 0].isnan().all()
    ok = ~want.isnan()
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-5, atol=1e-5)


def test_get_normalized_probs_takes_the_loop_outside_autograd(monkeypatch):
    """Beam search's and validation's log-probabilities come from the loop; with autograd
    recording (training's criterions), with native.LOG_SOFTMAX off and for probabilities,
    fairseq's own (utils.log_softmax / softmax). Both give the same values."""
    model = build_model("rnn_luong_tiny")
    logits = lsm_logits(torch.float32, rows=3, vocab=len(model.decoder.dictionary))
    seen = []
    monkeypatch.setattr(native, "log_softmax",
                        lambda x, _f=native.log_softmax: seen.append(1) or _f(x))
    with torch.no_grad():
        fast = model.get_normalized_probs((logits, None), log_probs=True)
    assert seen == [1]
    leaf = logits.clone().requires_grad_()
    slow = model.get_normalized_probs((leaf, None), log_probs=True)
    assert seen == [1] and slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        probs = model.get_normalized_probs((logits, None), log_probs=False)
        monkeypatch.setattr(native, "LOG_SOFTMAX", False)
        model.get_normalized_probs((logits, None), log_probs=True)
    assert seen == [1]
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


# beam search's candidates (native.beam_topk, search.py's BeamSearch.step)

def topk_inputs(B: int, G: int, V: int, seed: int = 5):
    """Log-probabilities B x G x V without ties and scores B x G."""
    g = torch.Generator().manual_seed(seed)
    lprobs = torch.log_softmax(torch.randn(B, G, V, generator=g) * 3, -1)
    return lprobs, torch.randn(B, G, generator=g) - 4


@pytest.mark.parametrize("B,G,V,k", [(3, 5, 53, 10), (2, 1, 40, 2), (1, 4, 17, 67), (4, 2, 9, 1)])
def test_the_topk_loop_equals_torch_topk(B, G, V, k):
    """Values and flat indices as torch.topk of lprobs + scores over each sentence's G x V
    values (no ties: the same order), split into hypotheses and words; k up to G V - 1."""
    assert native.library() is not None
    lprobs, scores = topk_inputs(B, G, V)
    for score in (scores, None):
        total = lprobs + (score.unsqueeze(-1) if score is not None else 0)
        want = torch.topk(total.view(B, -1), k)
        assert native.topk_usable(lprobs, score)
        values, hyps, words = native.beam_topk(lprobs, score, k)
        assert torch.equal(values, want.values)
        assert torch.equal(hyps * V + words, want.indices) and (words < V).all()


def test_the_topk_loop_reads_strided_hypotheses_and_orders_ties():
    """The first hypothesis of each sentence as a view (beam search's first step: sentences
    `beam V` apart) and every other hypothesis (rows 2 V apart); equal values: the lower flat
    index first; -inf values only where nothing else is left; a NaN: None (torch.topk ranks NaN
    first)."""
    lprobs, scores = topk_inputs(3, 4, 30)
    first = lprobs[:, :1, :]
    values, hyps, words = native.beam_topk(first, None, 6)
    want = torch.topk(lprobs[:, 0, :], 6)
    assert torch.equal(values, want.values) and torch.equal(words, want.indices)
    assert (hyps == 0).all()
    every_other = lprobs[:, ::2, :]  # hypotheses 2 V apart
    values, hyps, words = native.beam_topk(every_other, scores[:, ::2], 5)
    want = torch.topk((every_other + scores[:, ::2].unsqueeze(-1)).reshape(3, -1), 5)
    assert torch.equal(values, want.values) and torch.equal(hyps * 30 + words, want.indices)
    tied = torch.full((1, 2, 8), -float("inf"))
    tied[0, 1, [6, 2]] = -1.0
    tied[0, 0, [7, 3]] = -1.0
    tied[0, 0, 5] = -0.5
    values, hyps, words = native.beam_topk(tied, None, 6)
    assert values[0, :5].tolist() == [-0.5, -1.0, -1.0, -1.0, -1.0]
    assert (hyps * 8 + words)[0, :5].tolist() == [5, 3, 7, 10, 14]
    assert values[0, 5] == -float("inf")
    tied[0, 1, 0] = float("nan")
    assert native.beam_topk(tied, None, 6) is None
