"""Attention: masking, each score function against its paper formula, batched vs per-step."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import padding_mask
from fairseq_s2s_attn.attention import (
    SCORERS,
    AdditiveScorer,
    Attention,
    DotScorer,
    GeneralScorer,
    build_scorer,
    masked_softmax,
)

B, S, T, Q, C, A = 3, 5, 4, 6, 6, 7  # Q == C so that every scorer (dot included) applies


def make_mask(left: bool) -> torch.Tensor:
    """B x S padding masks: lengths 5, 3, 1, padded on the left or on the right."""
    return padding_mask([5, 3, 1], S, left)


def make_attention(score: str, seed: int = 0, dtype=torch.float64) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(score, Q, C, A).to(dtype)
    # non-trivial biases/weights so that a missing term would show
    for p in attn.parameters():
        torch.nn.init.uniform_(p, -0.8, 0.8)
    return attn


@pytest.mark.parametrize("score", SCORERS)
@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
@pytest.mark.parametrize("batched", [False, True], ids=["one_step", "all_steps"])
def test_weights_sum_to_one_and_padding_gets_zero(score, left, batched):
    attn = make_attention(score)
    torch.manual_seed(1)
    values = torch.randn(B, S, C, dtype=torch.float64)
    query = torch.randn(B, T, Q, dtype=torch.float64) if batched else torch.randn(B, Q, dtype=torch.float64)
    mask = make_mask(left)
    context, weights = attn(query, attn.keys(values), values, mask)

    expect_shape = (B, T, S) if batched else (B, S)
    assert weights.shape == expect_shape
    assert context.shape == expect_shape[:-1] + (C,)
    m = mask.unsqueeze(1).expand(B, T, S) if batched else mask
    assert torch.all(weights[m] == 0.0), "padding must get exactly zero weight"
    assert torch.all(weights[~m] > 0.0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(expect_shape[:-1], dtype=torch.float64))
    # the one-token sentence attends to its single token with weight 1
    single = weights[2] if not batched else weights[2, 0]
    assert single[~mask[2]].item() == pytest.approx(1.0)


@pytest.mark.parametrize("score", SCORERS)
def test_padding_values_do_not_leak_into_context(score):
    """Changing the encoder outputs at padded positions must not change the context."""
    attn = make_attention(score)
    torch.manual_seed(2)
    values = torch.randn(B, S, C, dtype=torch.float64)
    query = torch.randn(B, T, Q, dtype=torch.float64)
    mask = make_mask(left=True)
    ctx1, w1 = attn(query, attn.keys(values), values, mask)
    garbage = values.masked_fill(mask.unsqueeze(-1), 1e3)
    ctx2, w2 = attn(query, attn.keys(garbage), garbage, mask)
    torch.testing.assert_close(ctx1, ctx2)
    torch.testing.assert_close(w1, w2)


def _hand_attention(scores, values, mask):
    """softmax over non-padding, then sum_j a_j h_j, with Python loops (B x S scores)."""
    weights = torch.zeros_like(scores)
    context = torch.zeros(values.size(0), values.size(2), dtype=values.dtype)
    for b in range(scores.size(0)):
        idx = [j for j in range(scores.size(1)) if not mask[b, j]]
        exps = {j: math.exp(scores[b, j].item()) for j in idx}
        z = sum(exps.values())
        for j in idx:
            weights[b, j] = exps[j] / z
            context[b] += weights[b, j] * values[b, j]
    return weights, context


def _check_against_hand(attn, query, values, mask, hand_scores):
    scores = attn.scorer(query, attn.keys(values))
    torch.testing.assert_close(scores, hand_scores, rtol=1e-10, atol=1e-10)
    context, weights = attn(query, attn.keys(values), values, mask)
    w_hand, c_hand = _hand_attention(hand_scores, values, mask)
    torch.testing.assert_close(weights, w_hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(context, c_hand, rtol=1e-10, atol=1e-12)


def _inputs(seed=3):
    torch.manual_seed(seed)
    return torch.randn(B, Q, dtype=torch.float64), torch.randn(B, S, C, dtype=torch.float64)


def test_additive_is_bahdanau_formula():
    """e_ij = v^T tanh(W s_{i-1} + U h_j + b_U) (Bahdanau eq. 6, with the bias U carries)."""
    attn = make_attention("additive")
    sc = attn.scorer
    assert isinstance(sc, AdditiveScorer)
    W, U, bU, v = sc.query_proj.weight, sc.key_proj.weight, sc.key_proj.bias, sc.v.weight[0]
    assert sc.query_proj.bias is None and sc.v.bias is None
    assert W.shape == (A, Q) and U.shape == (A, C) and v.shape == (A,)
    s, h = _inputs()
    mask = make_mask(left=False)
    hand = torch.zeros(B, S, dtype=torch.float64)
    with torch.no_grad():
        for b in range(B):
            for j in range(S):
                hand[b, j] = v @ torch.tanh(W @ s[b] + U @ h[b, j] + bU)
        _check_against_hand(attn, s, h, mask, hand)


def test_dot_is_luong_formula():
    """score(h_t, h_s) = h_t^T h_s (Luong eq. 8, dot)."""
    attn = make_attention("dot")
    assert isinstance(attn.scorer, DotScorer)
    assert len(list(attn.parameters())) == 0
    ht, hs = _inputs()
    mask = make_mask(left=True)
    hand = torch.zeros(B, S, dtype=torch.float64)
    for b in range(B):
        for j in range(S):
            hand[b, j] = sum(ht[b, k] * hs[b, j, k] for k in range(C))
    with torch.no_grad():
        _check_against_hand(attn, ht, hs, mask, hand)


def test_general_is_luong_formula():
    """score(h_t, h_s) = h_t^T W_a h_s (Luong eq. 8, general); W_a is Q x C, no bias."""
    attn = make_attention("general")
    sc = attn.scorer
    assert isinstance(sc, GeneralScorer)
    Wa = sc.key_proj.weight
    assert Wa.shape == (Q, C) and sc.key_proj.bias is None
    ht, hs = _inputs()
    mask = make_mask(left=False)
    hand = torch.zeros(B, S, dtype=torch.float64)
    with torch.no_grad():
        for b in range(B):
            for j in range(S):
                hand[b, j] = ht[b] @ Wa @ hs[b, j]
        _check_against_hand(attn, ht, hs, mask, hand)


def test_general_differs_from_dot():
    """general must actually use W_a: with a non-identity W_a the scores differ from dot."""
    gen, dot = make_attention("general"), make_attention("dot")
    ht, hs = _inputs()
    with torch.no_grad():
        s_gen = gen.scorer(ht, gen.keys(hs))
        s_dot = dot.scorer(ht, dot.keys(hs))
        assert not torch.allclose(s_gen, s_dot)
        gen.scorer.key_proj.weight.copy_(torch.eye(Q, C, dtype=torch.float64))
        torch.testing.assert_close(gen.scorer(ht, gen.keys(hs)), s_dot)


def test_concat_is_luong_formula_from_additive_weights():
    """score = v^T tanh(W_a [h_t; h_s] + b) with W_a = [W | U], built from the module's weights."""
    attn = make_attention("concat")
    sc = attn.scorer
    assert isinstance(sc, AdditiveScorer)
    Wa = torch.cat([sc.query_proj.weight, sc.key_proj.weight], dim=1)  # A x (Q + C)
    b_a, v = sc.key_proj.bias, sc.v.weight[0]
    ht, hs = _inputs()
    mask = make_mask(left=True)
    hand = torch.zeros(B, S, dtype=torch.float64)
    with torch.no_grad():
        for b in range(B):
            for j in range(S):
                hand[b, j] = v @ torch.tanh(Wa @ torch.cat([ht[b], hs[b, j]]) + b_a)
        _check_against_hand(attn, ht, hs, mask, hand)


@pytest.mark.parametrize("score", SCORERS)
@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_batched_query_equals_separate_steps(score, left):
    attn = make_attention(score)
    torch.manual_seed(4)
    values = torch.randn(B, S, C, dtype=torch.float64)
    query = torch.randn(B, T, Q, dtype=torch.float64)
    mask = make_mask(left)
    keys = attn.keys(values)
    with torch.no_grad():
        ctx_all, w_all = attn(query, keys, values, mask)
        for t in range(T):
            ctx_t, w_t = attn(query[:, t], keys, values, mask)
            torch.testing.assert_close(ctx_all[:, t], ctx_t, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(w_all[:, t], w_t, rtol=1e-12, atol=1e-12)


def test_keys_depend_only_on_source():
    """keys() is the per-sentence part: the scores for any query come from the same keys."""
    attn = make_attention("additive")
    torch.manual_seed(5)
    values = torch.randn(B, S, C, dtype=torch.float64)
    keys = attn.keys(values)
    assert keys.shape == (B, S, A)
    with torch.no_grad():
        torch.testing.assert_close(keys, values @ attn.scorer.key_proj.weight.t() + attn.scorer.key_proj.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batched", [False, True], ids=["one_step", "all_steps"])
def test_masked_softmax_fully_padded_row_is_finite(dtype, batched):
    scores = torch.randn(B, T, S) if batched else torch.randn(B, S)
    scores = scores.to(dtype)
    mask = make_mask(left=True)
    mask[1] = True  # row 1 is all padding
    w = masked_softmax(scores, mask)
    assert w.dtype == dtype
    assert torch.isfinite(w).all()
    assert torch.all(w[1] == 0)
    sums = w.float().sum(-1)
    torch.testing.assert_close(sums[0], torch.ones_like(sums[0]), atol=1e-2, rtol=0)
    torch.testing.assert_close(sums[2], torch.ones_like(sums[2]), atol=1e-2, rtol=0)
    m = mask.unsqueeze(1).expand(B, T, S) if batched else mask
    assert torch.all(w[m] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_softmax_large_scores_low_precision(dtype):
    """Scores near the fp16 maximum must not overflow exp() (softmax runs in fp32)."""
    scores = torch.tensor([[60000.0, 59990.0, -60000.0, 0.0]], dtype=dtype)
    mask = torch.tensor([[False, False, False, True]])
    w = masked_softmax(scores, mask)
    assert torch.isfinite(w).all()
    ref = torch.softmax(scores.float()[:, :3], dim=-1)
    torch.testing.assert_close(w.float()[:, :3], ref, atol=1e-2, rtol=0)
    assert w[0, 3] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("score", ["dot", "general"])
def test_attention_low_precision_fully_padded_row(dtype, score):
    attn = make_attention(score, dtype=dtype)
    torch.manual_seed(6)
    values = torch.randn(B, S, C).to(dtype)
    query = torch.randn(B, T, Q).to(dtype)
    mask = make_mask(left=False)
    mask[0] = True
    with torch.no_grad():
        context, weights = attn(query, attn.keys(values), values, mask)
    assert weights.dtype == dtype and context.dtype == dtype
    assert torch.isfinite(weights).all() and torch.isfinite(context).all()
    assert torch.all(weights[0] == 0) and torch.all(context[0] == 0)


def test_masked_softmax_without_mask_is_softmax():
    scores = torch.randn(B, T, S)
    torch.testing.assert_close(masked_softmax(scores, None), torch.softmax(scores, -1))


def test_dot_with_mismatched_sizes_raises():
    with pytest.raises(ValueError, match="dot"):
        Attention("dot", 8, 6, 4)
    with pytest.raises(ValueError):
        DotScorer(4, 5)
    # the other scorers map between sizes
    for score in ("additive", "general", "concat"):
        attn = Attention(score, 8, 6, 4)
        values = torch.randn(2, 3, 6)
        ctx, w = attn(torch.randn(2, 8), attn.keys(values), values, None)
        assert ctx.shape == (2, 6) and w.shape == (2, 3)


def test_unknown_scorer_raises():
    with pytest.raises(ValueError, match="unknown attention score"):
        build_scorer("cosine", 4, 4, 4)


def test_masked_softmax_keeps_float64_precision():
    """fp64 scores are not rounded through fp32 (would break gradcheck and fp64 references)."""
    scores = torch.tensor([[0.1, 0.1 + 1e-12, 0.3, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[False, False, False, True]])
    w = masked_softmax(scores, mask)
    assert w.dtype == torch.float64
    ref = torch.softmax(scores[:, :3], dim=-1)
    torch.testing.assert_close(w[:, :3], ref, rtol=1e-14, atol=1e-15)
    assert w[0, 1] > w[0, 0]  # a 1e-12 difference survives


@pytest.mark.parametrize("score", SCORERS)
def test_attention_gradcheck(score):
    """Analytic gradients of the masked attention match finite differences (fp64)."""
    attn = make_attention(score)
    torch.manual_seed(7)
    values = torch.randn(2, 4, C, dtype=torch.float64, requires_grad=True)
    query = torch.randn(2, 3, Q, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, False, False], [False, False, True, True]])

    def fn(q, v):
        return attn(q, attn.keys(v), v, mask)

    assert torch.autograd.gradcheck(fn, (query, values))


@pytest.mark.parametrize("coverage", [False, True], ids=["plain", "coverage"])
@pytest.mark.parametrize("batched", [False, True], ids=["one_step", "all_steps"])
def test_additive_score_gradients(batched, coverage):
    """The additive score recomputes its tanh (and the coverage term) in backward: gradients
    checked numerically (gradcheck) and against plain autograd through v^T tanh(q + k [+ cov w_c])."""
    from fairseq_s2s_attn.attention import AdditiveScore

    torch.manual_seed(4)
    if batched:
        q = torch.randn(B, T, 1, A, dtype=torch.float64, requires_grad=True)
        k = torch.randn(B, 1, S, A, dtype=torch.float64, requires_grad=True)
        cov_shape = (B, T, S, 1)
    else:
        q = torch.randn(B, 1, A, dtype=torch.float64, requires_grad=True)
        k = torch.randn(B, S, A, dtype=torch.float64, requires_grad=True)
        cov_shape = (B, S, 1)
    v = torch.randn(A, dtype=torch.float64, requires_grad=True)
    inputs = (q, k, v)
    if coverage:
        inputs += (torch.rand(cov_shape, dtype=torch.float64, requires_grad=True),
                   torch.randn(A, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(AdditiveScore.apply, inputs)
    grad = torch.randn((B, T, S) if batched else (B, S), dtype=torch.float64)
    ours = torch.autograd.grad(AdditiveScore.apply(*inputs), inputs, grad)
    keys = k + inputs[3] * inputs[4] if coverage else k
    plain = torch.autograd.grad((torch.tanh(q + keys) @ v), inputs, grad)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b)
    if coverage:  # a coverage without gradient (its gradient is then not computed)
        fixed = AdditiveScore.apply(q, k, v, inputs[3].detach(), inputs[4])
        for a, b in zip(torch.autograd.grad(fixed, (q, k, v, inputs[4]), grad), ours[:3] + ours[4:]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sigmoid", [True, False], ids=["sigmoid", "tanh"])
@pytest.mark.parametrize("coverage", [False, True], ids=["plain", "coverage"])
@pytest.mark.parametrize("batched", [False, True], ids=["one_step", "all_steps"])
def test_additive_score_fp32_backward_from_the_sigmoid(batched, coverage, sigmoid, monkeypatch):
    """fp32 on CPU: backward from s = sigmoid(2 (q + k)) as the forward makes it (tanh = 2 s - 1,
    tanh' = 4 s (1 - s)), no tanh and no tanh_backward; every gradient equals fp64 autograd's
    through v^T tanh(q + k [+ cov w_c]) to fp32 rounding, saturated values included, as the
    tanh path (SIGMOID_BACKWARD off) does. (The eager path: where the C loops are built, they
    run instead, tests/test_native.py.)"""
    from fairseq_s2s_attn import attention, native

    monkeypatch.setattr(native, "SCORE", False)
    monkeypatch.setattr(attention, "SIGMOID_BACKWARD", sigmoid)
    g = torch.Generator().manual_seed(5)
    shape_q, shape_k = ((B, T, 1, A), (B, 1, S, A)) if batched else ((B, 1, A), (B, S, A))
    inputs = [torch.randn(shape_q, generator=g, dtype=torch.float64) * 3,
              torch.randn(shape_k, generator=g, dtype=torch.float64) * 3,
              torch.randn(A, generator=g, dtype=torch.float64)]
    if coverage:
        inputs += [torch.rand(shape_q[:-2] + (S, 1), generator=g, dtype=torch.float64),
                   torch.randn(A, generator=g, dtype=torch.float64)]
    grad = torch.randn(shape_q[:-2] + (S,), generator=g, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in inputs]
    keys = ref[1] + ref[3] * ref[4] if coverage else ref[1]
    want = torch.autograd.grad(torch.tanh(ref[0] + keys) @ ref[2], ref, grad)
    ours = [t.float().requires_grad_() for t in inputs]
    out = attention.AdditiveScore.apply(*ours)
    with OpLog() as log:  # (defined below)
        got = torch.autograd.grad(out, ours, grad.float())
    names = {name for name, _, _ in log.ops}
    assert ("tanh_backward" in names) != sigmoid and "tanh" not in names
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("coverage", [False, True], ids=["plain", "coverage"])
def test_additive_attention_keeps_no_per_step_tanh_for_backward(coverage):
    """Per decoder step, backward keeps nothing of size B x S x A except the keys themselves
    (one tensor for the whole sentence): the tanh is recomputed, and so are the keys with the
    coverage term, which differ at every step (they were kept: one B x S x A tensor per step)."""
    torch.manual_seed(0)
    attn = Attention("additive", Q, C, A, coverage=coverage).to(torch.float64)
    values = torch.randn(B, S, C, dtype=torch.float64, requires_grad=True)
    keys = attn.keys(values)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    cov = torch.zeros(B, S, dtype=torch.float64) if coverage else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for step in range(3):
            _, weights = attn(torch.randn(B, Q, dtype=torch.float64), keys, values,
                              make_mask(left=True), coverage=cov)
            cov = cov + weights if coverage else None
    big = {t.data_ptr() for t in saved if t.numel() >= B * S * A}
    assert big == {keys.data_ptr()}


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 5e-7), (torch.bfloat16, 1e-2), (torch.float64, 0.0)])
def test_additive_hidden_is_tanh_of_the_sum(dtype, atol):
    """tanh(q + k) through 2 sigmoid(2x) - 1 on CPU (fp32, bf16): tanh up to rounding, over the
    whole range (saturation, zero, small values); fp64 is torch.tanh itself."""
    from fairseq_s2s_attn.attention import additive_hidden

    q = torch.linspace(-12, 12, 97, dtype=torch.float64).view(1, 97, 1)
    k = torch.tensor([0.0, 1e-6, -3e-4, 0.5], dtype=torch.float64).view(1, 1, 4)
    got = additive_hidden(q.to(dtype), k.to(dtype))
    assert got.dtype == dtype and got.shape == (1, 97, 4)
    want = torch.tanh(q.to(dtype) + k.to(dtype)).double()
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)
    assert got.abs().max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batched", [False, True], ids=["one_step", "all_steps"])
def test_additive_scores_equal_v_times_the_hidden_bit_for_bit(dtype, batched, monkeypatch):
    """The score's forward, three passes over the B x S x A values, gives exactly the values of
    v^T additive_hidden(q, k) (five passes), also for mixed and saturated inputs (the eager
    path, without the C loop of fp32 scores)."""
    from fairseq_s2s_attn import native
    from fairseq_s2s_attn.attention import additive_hidden, additive_scores

    monkeypatch.setattr(native, "SCORE", False)

    g = torch.Generator().manual_seed(7)
    shape_q, shape_k = ((B, T, 1, A), (B, 1, S, A)) if batched else ((B, 1, A), (B, S, A))
    q = (torch.randn(shape_q, generator=g) * 4).to(dtype)
    k = (torch.randn(shape_k, generator=g) * 4).to(dtype)
    v = torch.randn(A, generator=g)
    got = additive_scores(q, k, v)
    hidden = additive_hidden(q, k)
    want = torch.matmul(hidden, v.to(hidden.dtype).unsqueeze(-1)).squeeze(-1)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("score", SCORERS)
@pytest.mark.parametrize("mode", ["global", "local-m", "local-p"])
@pytest.mark.parametrize("batched", [False, True], ids=["one_step", "all_steps"])
def test_source_rows_serving_several_queries_equal_repeated_rows(score, mode, batched):
    """Beam search: each source row serves `groups` consecutive queries (its hypotheses). Scores,
    weights and context equal those of the source rows repeated once per query, for every score,
    mode and coverage (additive), one step or several."""
    groups = 3
    torch.manual_seed(11)
    coverage = score in ("additive", "concat")
    attn = Attention(score, Q, C, A, mode=mode, window=1, coverage=coverage).double()
    for p in attn.parameters():
        torch.nn.init.uniform_(p, -0.8, 0.8)
    values = torch.randn(B, S, C, dtype=torch.float64)
    mask = make_mask(left=True)
    keys = attn.keys(values, mask)
    n = B * groups
    query = torch.randn((n, T, Q) if batched else (n, Q), dtype=torch.float64)
    step = torch.randint(0, S, (n,))
    cov = torch.rand(n, S, dtype=torch.float64) if coverage and not batched else None
    rows = torch.arange(B).repeat_interleave(groups)
    context, weights = attn(query, keys, values, mask, step, cov)
    want_context, want_weights = attn(query, keys[rows], values[rows], mask[rows], step, cov)
    torch.testing.assert_close(weights, want_weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(context, want_context, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="queries for"):
        attn(query[:-1], keys, values, mask, step[:-1])


def test_coverage_needs_one_row_per_query():
    attn = Attention("additive", Q, C, A, coverage=True).double()
    keys = attn.keys(torch.randn(B, S, C, dtype=torch.float64))
    with pytest.raises(ValueError, match="one row per query"):
        attn.scorer(torch.randn(B, T, Q, dtype=torch.float64), keys, torch.rand(B, S, dtype=torch.float64))


class OpLog(TorchDispatchMode):
    """(operator name, dtype, number of values) of each aten operator's first argument."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if args and isinstance(args[0], torch.Tensor):
            self.ops.append((func._schema.name.split("::")[-1], args[0].dtype, args[0].numel()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("coverage", [False, True], ids=["plain", "coverage"])
@pytest.mark.parametrize("grad", [False, True], ids=["decoding", "training"])
def test_cpu_bf16_additive_score_works_element_wise_in_fp32(coverage, grad, monkeypatch):
    """Under --cpu-bf16's autocast the products run in bf16, but the additive score's element-wise
    chain over the B x T x S x A values (add, sigmoid, subtract, coverage's multiply-add) runs
    in fp32: torch's CPU kernels compute bf16 element-wise work in fp32 anyway, converting on
    every load and store (804 against 1,317 us per beam step at batch 32). The keys are kept in
    fp32 once per sentence, and the v product does not make autocast cast the fp32 block to bf16.
    The scores equal the fp32 computation from the same bf16 products. (The eager path: the C
    loop of fp32 scores, where built, runs in fp32 by construction.)"""
    from fairseq_s2s_attn import native

    monkeypatch.setattr(native, "SCORE", False)
    attn = make_attention("additive", dtype=torch.float32)
    if coverage:
        attn = Attention("additive", Q, C, A, coverage=True)
        for p in attn.parameters():
            torch.nn.init.uniform_(p, -0.8, 0.8)
    sc = attn.scorer
    s = torch.randn(B, T, Q)
    values = torch.randn(B, S, C)
    cov = torch.rand(B, T, S) if coverage else None
    args = (cov,) if coverage else ()
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        keys = sc.keys(values)
        with OpLog() as log:
            scores = sc(s, keys, *args)
        q = sc.query_proj(s)  # bf16, as autocast makes it
        k = sc.key_proj(values)
    assert keys.dtype == torch.float32 and q.dtype == k.dtype == torch.bfloat16
    block = B * T * S * A
    # (a slice computes nothing: in training the query projection's rows are padded to a
    # bucket, precision.padded_rows, and its result sliced back)
    big = [(name, dtype) for name, dtype, n in log.ops if n >= block and name != "slice"]
    assert ("sigmoid_", torch.float32) in big and all(dtype == torch.float32 for _, dtype in big), big
    assert not any(name == "_to_copy" for name, _ in big), big  # no cast of a whole block
    x = q.float().unsqueeze(2) + k.float().unsqueeze(1)  # B x T x S x A, fp32
    if coverage:
        x = x + cov.unsqueeze(-1) * sc.coverage_proj.weight[:, 0]
    want = torch.tanh(x) @ sc.v_weight()
    torch.testing.assert_close(scores.float(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("coverage", [False, True], ids=["plain", "coverage"])
@pytest.mark.parametrize("batched", [False, True], ids=["one_step", "grouped"])
def test_additive_scores_go_in_blocks_of_rows_on_cpu(monkeypatch, coverage, batched):
    """A batch whose B x [T x] S x A block would exceed SCORE_BLOCK_ELEMENTS goes in blocks of
    rows (one 659-word sentence at batch 32 and beam 5 made a 108 MB fp32 block, its passes
    running from memory at 41 against 23 ms a step in blocks): no larger element-wise block is
    made, and the scores equal those of one block (to fp32 rounding: the v product's blocking
    depends on its number of rows). The eager path: the C loop of fp32 scores, where built,
    makes no block at all."""
    from fairseq_s2s_attn import attention, native

    monkeypatch.setattr(native, "SCORE", False)
    g = torch.Generator().manual_seed(3)
    rows = 7
    shape_q, shape_k = ((rows, T, 1, A), (rows, 1, S, A)) if batched else ((rows, 1, A), (rows, S, A))
    q, k = torch.randn(shape_q, generator=g), torch.randn(shape_k, generator=g)
    v = torch.randn(A, generator=g)
    per_row = (T if batched else 1) * S * A
    cov = torch.rand(*shape_q[:-2], S, 1, generator=g) if coverage else None
    w_c = torch.randn(A, generator=g) if coverage else None
    whole = attention.additive_scores(q, k, v, cov, w_c)
    monkeypatch.setitem(attention.SCORE_BLOCK_ELEMENTS, "cpu", 3 * per_row)  # blocks of 3, 3, 1 rows
    with OpLog() as log:
        blocks = attention.additive_scores(q, k, v, cov, w_c)
    largest = max(n for name, _, n in log.ops if name == "sigmoid_")
    assert largest == 3 * per_row
    assert blocks.shape == whole.shape == ((rows, T, S) if batched else (rows, S))
    torch.testing.assert_close(blocks, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_location_is_luong_formula_up_to_the_last_position(left):
    """a_t = softmax(W_a h_t) (Luong sec. 3.1, location): the j-th real word of a sentence (from
    its first real token, wherever the padding is) scores W_a[j] . h_t, no bias. W_a has one
    row per position up to max_positions P: a sentence of exactly P words gives its last word
    row P-1 (the last row), not a clamped earlier one."""
    torch.manual_seed(0)
    attn = Attention("location", Q, C, A, max_positions=S).to(torch.float64)  # P = S
    torch.nn.init.uniform_(attn.scorer.proj.weight, -0.8, 0.8)
    Wa = attn.scorer.proj.weight
    assert Wa.shape == (S, Q) and attn.scorer.proj.bias is None
    ht, hs = _inputs()
    mask = make_mask(left)  # lengths 5 (= P), 3, 1
    with torch.no_grad():
        context, weights = attn(ht, attn.keys(hs, mask), hs, mask)
        hand = torch.zeros(B, S, dtype=torch.float64)
        for b in range(B):
            for j, col in enumerate((~mask[b]).nonzero().flatten().tolist()):
                hand[b, col] = Wa[j] @ ht[b]
        w_hand, c_hand = _hand_attention(hand, hs, mask)
    torch.testing.assert_close(weights, w_hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(context, c_hand, rtol=1e-10, atol=1e-12)


def test_context_of_fp32_values_runs_in_fp32_in_training_under_cpu_autocast():
    """attention.context: in training under CPU autocast the product over fp32 values is torch's
    fp32 batched product (bit for bit, gradients too), over bf16 values autocast's bf16 one, and
    without gradients (decoding) autocast's too; without autocast it is torch.bmm."""
    from fairseq_s2s_attn import attention as att

    g = torch.Generator().manual_seed(3)
    weights = torch.softmax(torch.randn(B, T, S, generator=g), -1).requires_grad_()
    values = torch.randn(B, S, C, generator=g).requires_grad_()
    w, v = weights.detach(), values.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = att.context(weights, values)
        in_bf16 = att.context(weights, values.bfloat16())
        autocasts = torch.bmm(w, v)
        with torch.no_grad():
            decoding = att.context(w, v)
    want = torch.bmm(w, v)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert in_bf16.dtype == decoding.dtype == torch.bfloat16
    assert torch.equal(in_bf16.detach(), autocasts) and torch.equal(decoding, autocasts)
    assert not torch.equal(autocasts.float(), want)
    gy = torch.randn(B, T, C, generator=g)
    gw, gv = torch.autograd.grad(got, (weights, values), gy)
    w0, v0 = w.clone().requires_grad_(), v.clone().requires_grad_()
    gw0, gv0 = torch.autograd.grad(torch.bmm(w0, v0), (w0, v0), gy)
    assert torch.equal(gw, gw0) and torch.equal(gv, gv0)
    assert torch.equal(att.context(w.double(), v.double()), torch.bmm(w.double(), v.double()))


def test_fp32_context_only_in_training_under_cpu_autocast():
    from fairseq_s2s_attn import attention as att

    v = torch.zeros(2, 3, 4)
    assert not att.fp32_context(v)  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert att.fp32_context(v)
        with torch.no_grad():
            assert not att.fp32_context(v)  # decoding, validation


@pytest.mark.parametrize("score", ["additive", "concat", "general", "location"])
def test_training_products_over_all_positions_run_over_padded_rows(score, monkeypatch):
    """--cpu-bf16 training: the keys (B x S positions) and the query projections over all steps
    (B x T) run over rows padded to a bucket (precision.padded_rows: 15 and 12 rows -> 64), so
    sources and targets of other lengths meet the same product shapes; one step's B x Q query
    is not padded (beam search and the step loop), nor is anything outside autograd."""
    from fairseq_s2s_attn import precision

    rows = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(precision.F, "linear",
                        lambda x, w, b=None: rows.append(tuple(x.shape[:-1])) or linear(x, w, b))
    attn = make_attention(score, dtype=torch.float32)
    values = torch.randn(B, S, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys = attn.keys(values, make_mask(True))
        attn.scorer(torch.randn(B, T, Q), keys)  # all steps
        all_steps, rows[:] = list(rows), []
        attn.scorer(torch.randn(B, Q), keys)  # one step
        with torch.no_grad():
            attn.scorer(torch.randn(B, T, Q), attn.keys(values, make_mask(True)))
    projections = {"additive": 2, "concat": 2, "general": 1, "location": 1}[score]
    assert all_steps == [(64,)] * projections  # 15 key rows and 12 query rows, each padded to 64
    assert rows and all(r[0] != 64 for r in rows), rows  # one step's B rows, decoding's B x T x Q
