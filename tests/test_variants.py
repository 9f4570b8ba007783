"""Attention variants (issue #3), each against its paper formula on small hand-computed examples:
Luong's location score and local-m / local-p attention, scaled Luong, normalised Bahdanau,
coverage (Tu et al. 2016), Bahdanau's s_0 = tanh(W_s h<-_1), maxout deep output over s_{i-1},
the paper architectures and the option checks.

Incremental decoding == full pass, state reordering, padding side and gradients for every
variant are in test_decoder.py (VARIANTS); beam search through fairseq's CLI in
test_variants_cli.py.
"""

import argparse
import math

import pytest
import torch

from conftest import ARCH_FNS, PAPER_TINY, build_model, make_args, make_dict, padding_mask
from fairseq_s2s_attn.attention import Attention, LocationScorer, source_positions
from fairseq_s2s_attn.model import ConfigError, RNNS2SModel, check_config
from test_decoder import full_forward, incremental_forward, make_batch

B, S, T, Q, C, A = 3, 6, 4, 5, 5, 7
LENGTHS = [6, 4, 1]
F64 = torch.float64


def mask_for(left: bool, lengths=LENGTHS, width=S):
    return padding_mask(lengths, width, left)


def make_attn(score="general", seed=0, **kw):
    torch.manual_seed(seed)
    attn = Attention(score, Q, C, A, **kw).to(F64)
    for p in attn.parameters():
        torch.nn.init.uniform_(p, -0.8, 0.8)
    return attn


def inputs(seed=1, batched=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Q, generator=g, dtype=F64) if batched else torch.randn(B, Q, generator=g, dtype=F64)
    return q, torch.randn(B, S, C, generator=g, dtype=F64)


def real_index(mask_row):
    """Padded indices of the real tokens, in order (position s of the sentence -> index)."""
    return [j for j in range(mask_row.numel()) if not mask_row[j]]


def softmax_over(scores: dict):
    z = sum(math.exp(v) for v in scores.values())
    return {j: math.exp(v) / z for j, v in scores.items()}


def check(weights, context, hand_w, values):
    torch.testing.assert_close(weights, hand_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(context, torch.einsum("bs,bsc->bc", hand_w, values), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ positions


def test_source_positions_count_from_the_first_real_token():
    pos, lengths = source_positions(mask_for(left=True), torch.zeros(B, S))
    assert lengths.tolist() == LENGTHS
    assert pos[1, 2:].tolist() == [0, 1, 2, 3] and pos[2, 5].item() == 0
    pos_r, _ = source_positions(mask_for(left=False), torch.zeros(B, S))
    assert pos_r[1, :4].tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------ location (Luong sec. 3.1)


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_location_is_softmax_of_Wa_h_over_sentence_positions(left):
    """a_t = softmax(W_a h_t): the score of the word at sentence position s is (W_a h_t)_s,
    whatever the padding; W_a has one row per position up to max_positions."""
    attn = make_attn("location", max_positions=9)
    assert isinstance(attn.scorer, LocationScorer)
    Wa = attn.scorer.proj.weight
    assert Wa.shape == (9, Q) and attn.scorer.proj.bias is None
    h, values = inputs()
    mask = mask_for(left)
    hand = torch.zeros(B, S, dtype=F64)
    with torch.no_grad():
        for b in range(B):
            idx = real_index(mask[b])
            w = softmax_over({j: (Wa[s] @ h[b]).item() for s, j in enumerate(idx)})
            for j, v in w.items():
                hand[b, j] = v
        context, weights = attn(h, attn.keys(values, mask), values, mask)
    check(weights, context, hand, values)
    # the keys ignore the encoder outputs: the weights depend on h_t and the positions only
    with torch.no_grad():
        _, w2 = attn(h, attn.keys(values * 3 + 1, mask), values, mask)
    torch.testing.assert_close(w2, weights)


def test_location_batched_equals_steps():
    attn = make_attn("location", max_positions=9)
    h, values = inputs(batched=True)
    mask = mask_for(left=True)
    keys = attn.keys(values, mask)
    with torch.no_grad():
        ctx, w = attn(h, keys, values, mask)
        for t in range(T):
            ctx_t, w_t = attn(h[:, t], keys, values, mask)
            torch.testing.assert_close(w[:, t], w_t, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ctx[:, t], ctx_t, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ local-m, local-p (Luong 3.2)


def _general_scores(attn, h, values):
    Wa = attn.scorer.key_proj.weight
    return lambda b, j: (h[b] @ Wa @ values[b, j]).item()


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
@pytest.mark.parametrize("t", [0, 2, 7])
def test_local_m_is_softmax_over_the_window_around_t(left, t):
    """local-m: p_t = t (kept at most S-1); a = softmax of the scores of s in [p_t - D, p_t + D]."""
    D = 1
    attn = make_attn("general", mode="local-m", window=D)
    h, values = inputs(2)
    mask = mask_for(left)
    score = _general_scores(attn, h, values)
    hand = torch.zeros(B, S, dtype=F64)
    for b in range(B):
        idx = real_index(mask[b])
        p = min(t, len(idx) - 1)
        w = softmax_over({j: score(b, j) for s, j in enumerate(idx) if abs(s - p) <= D})
        for j, v in w.items():
            hand[b, j] = v
    step = torch.full((B,), t, dtype=torch.long)
    with torch.no_grad():
        context, weights = attn(h, attn.keys(values, mask), values, mask, step=step)
    check(weights, context, hand, values)
    assert (weights[0] > 0).sum() == (2 * D + 1 if 0 < t < S - 1 else D + 1)


def test_local_m_batched_steps_start_at_the_given_step():
    attn = make_attn("general", mode="local-m", window=1)
    h, values = inputs(3, batched=True)
    mask = mask_for(left=True)
    keys = attn.keys(values, mask)
    start = torch.tensor([2, 2, 2])
    with torch.no_grad():
        ctx, w = attn(h, keys, values, mask, step=start)
        for t in range(T):
            ctx_t, w_t = attn(h[:, t], keys, values, mask, step=start + t)
            torch.testing.assert_close(w[:, t], w_t, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ctx[:, t], ctx_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_local_p_formula(left):
    """local-p (Luong eq. 9-10): p_t = S sigmoid(v_p^T tanh(W_p h_t)), S the real length;
    a_s = softmax over |s - p_t| <= D of score(h_t, h_s), times exp(-(s - p_t)^2 / (2 sigma^2)),
    sigma = D/2."""
    D = 2
    attn = make_attn("general", mode="local-p", window=D)
    Wp, vp = attn.position_proj.weight, attn.position_v.weight[0]
    assert Wp.shape == (A, Q) and attn.position_proj.bias is None and attn.position_v.bias is None
    h, values = inputs(4)
    with torch.no_grad():  # spread the predicted positions over the sentence
        vp.mul_(3.0)
    mask = mask_for(left)
    score = _general_scores(attn, h, values)
    hand = torch.zeros(B, S, dtype=F64)
    centres = []
    with torch.no_grad():
        for b in range(B):
            idx = real_index(mask[b])
            p = len(idx) * torch.sigmoid(vp @ torch.tanh(Wp @ h[b])).item()
            centres.append(p)
            w = softmax_over({j: score(b, j) for s, j in enumerate(idx) if abs(s - p) <= D})
            sigma = D / 2
            for j, v in w.items():
                s = idx.index(j)
                hand[b, j] = v * math.exp(-((s - p) ** 2) / (2 * sigma ** 2))
        context, weights = attn(h, attn.keys(values, mask), values, mask)
        torch.testing.assert_close(attn.predict_position(h, torch.tensor(LENGTHS)),
                                   torch.tensor(centres, dtype=F64))
    check(weights, context, hand, values)
    assert all(weights[b].sum() < 1 for b in range(B))  # the Gaussian is not renormalised
    assert 0 < centres[0] < LENGTHS[0] and (weights[0] == 0).any()  # the window cuts the sentence


def test_local_p_position_is_fp32_under_bf16_autocast():
    """Under --cpu-bf16's autocast only W_p h_t is a bf16 product: the sigmoid of a bf16 logit
    put every centre of a 300-word source on a grid of up to S/256 positions (0.4 positions off
    fp32, one value for 40 steps), enough for the hard window to drop or admit words."""
    torch.manual_seed(0)
    attn = Attention("general", 16, 16, 16, mode="local-p", window=10)
    with torch.no_grad():
        attn.position_v.weight.mul_(4.0)  # spread the logits over the sigmoid's range
    h = torch.randn(64, 16)
    lengths = torch.full((64,), 300)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pre = attn.position_proj(h)
        assert pre.dtype == torch.bfloat16  # the product stays bf16
        p = attn.predict_position(h, lengths)
    assert p.dtype == torch.float32
    expected = 300 * torch.sigmoid(torch.tanh(pre.double()) @ attn.position_v.weight[0].double())
    torch.testing.assert_close(p.double(), expected, rtol=0, atol=1e-3)
    assert p.unique().numel() == 64  # no grid: every query its own centre


def test_local_p_gradient_reaches_the_position_network():
    attn = make_attn("general", mode="local-p", window=2)
    h, values = inputs(5)
    mask = mask_for(left=True)
    context, _ = attn(h, attn.keys(values, mask), values, mask)
    context.sum().backward()
    assert attn.position_proj.weight.grad.abs().sum() > 0
    assert attn.position_v.weight.grad.abs().sum() > 0


def test_local_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        Attention("general", Q, C, A, mode="local-p", window=0)
    with pytest.raises(ValueError, match="mode"):
        Attention("general", Q, C, A, mode="local-x")


# ------------------------------------------------------------------ scaled Luong, normed Bahdanau


@pytest.mark.parametrize("score", ["dot", "general"])
def test_scaled_luong_multiplies_the_score_by_g(score):
    """scaled_luong: score = g h_t^T (W_a) h_s, g a learned scalar initialised to 1."""
    torch.manual_seed(0)
    assert Attention(score, Q, C, A, scale=True).scorer.g.item() == 1.0
    plain = make_attn(score)
    scaled = make_attn(score, scale=True)
    if score == "general":
        with torch.no_grad():
            scaled.scorer.key_proj.weight.copy_(plain.scorer.key_proj.weight)
    with torch.no_grad():
        scaled.scorer.g.fill_(2.5)
    h, values = inputs(6)
    with torch.no_grad():
        ref = plain.scorer(h, plain.keys(values))
        torch.testing.assert_close(scaled.scorer(h, scaled.keys(values)), 2.5 * ref)
    names = {n for n, _ in scaled.named_parameters()}
    assert "scorer.g" in names and "scorer.g" not in {n for n, _ in plain.named_parameters()}


@pytest.mark.parametrize("score", ["additive", "concat"])
def test_normalised_bahdanau_formula(score):
    """normed_bahdanau: e_j = (g v/||v||)^T tanh(W s + U h_j + b), g initialised to sqrt(1/A)."""
    torch.manual_seed(0)
    assert Attention(score, Q, C, A, normalize=True).scorer.g.item() == pytest.approx(math.sqrt(1 / A))
    attn = make_attn(score, normalize=True)
    sc = attn.scorer
    W, U, b, v, g = sc.query_proj.weight, sc.key_proj.weight, sc.key_proj.bias, sc.v.weight[0], sc.g
    s, values = inputs(7)
    hand = torch.zeros(B, S, dtype=F64)
    with torch.no_grad():
        for i in range(B):
            for j in range(S):
                hand[i, j] = (g * v / torch.sqrt((v * v).sum())) @ torch.tanh(W @ s[i] + U @ values[i, j] + b)
        torch.testing.assert_close(sc(s, attn.keys(values)), hand, rtol=1e-10, atol=1e-12)
        # only the direction of v matters
        sc.v.weight.mul_(7.0)
        torch.testing.assert_close(sc(s, attn.keys(values)), hand, rtol=1e-10, atol=1e-12)
        sc.g.mul_(2.0)
        torch.testing.assert_close(sc(s, attn.keys(values)), 2 * hand, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ coverage (Tu et al. 2016)


def test_coverage_enters_the_additive_score():
    """e_ij = v^T tanh(W s + U h_j + b + w_c cov_j)."""
    attn = make_attn("additive", coverage=True)
    sc = attn.scorer
    W, U, b, v, wc = sc.query_proj.weight, sc.key_proj.weight, sc.key_proj.bias, sc.v.weight[0], \
        sc.coverage_proj.weight[:, 0]
    assert sc.coverage_proj.bias is None and wc.shape == (A,)
    s, values = inputs(8)
    cov = torch.rand(B, S, dtype=F64) * 2
    hand = torch.zeros(B, S, dtype=F64)
    with torch.no_grad():
        for i in range(B):
            for j in range(S):
                hand[i, j] = v @ torch.tanh(W @ s[i] + U @ values[i, j] + b + wc * cov[i, j])
        torch.testing.assert_close(sc(s, attn.keys(values), cov), hand, rtol=1e-10, atol=1e-12)
        # zero coverage is the plain score
        torch.testing.assert_close(sc(s, attn.keys(values), torch.zeros(B, S, dtype=F64)),
                                   sc(s, attn.keys(values)))


@pytest.mark.parametrize("c_loop", [False, True], ids=["eager", "c_loop"])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_coverage_enters_the_keys_in_one_multiply_add(dtype, c_loop, monkeypatch):
    """The coverage term w_c cov_ij is added to the keys U h_j + b by one multiply-add over the
    B x T x S x A values: one such tensor more than the score without coverage (a Linear(1, A)
    product and an add made two, and took 2.2 ms against 0.3 ms at beam 5, batch 32). Where the
    C loop of fp32 scores runs (native.additive_score: the bf16 model's keys are fp32 on a CPU),
    neither makes one. The same scores as the Linear's, to the rounding of the dtype."""
    from test_criterion import LargeOutputs

    from fairseq_s2s_attn import native

    monkeypatch.setattr(native, "SCORE", c_loop)
    attn = make_attn("additive", coverage=True).to(dtype)
    sc = attn.scorer
    s, values = inputs(8, batched=True)  # B x T x Q: T queries per source row, as beam search's
    s, values = s.to(dtype), values.to(dtype)
    cov = (torch.rand(B, T, S, dtype=F64) * 2).to(dtype)
    counts = {}
    with torch.no_grad():
        keys = attn.keys(values)
        for name, args in (("plain", ()), ("coverage", (cov,))):
            with LargeOutputs(B * T * S * A, A) as mode:
                scores = sc(s, keys, *args)
            counts[name] = mode.count
        linear_keys = keys.unsqueeze(1) + sc.coverage_proj(cov.unsqueeze(-1))  # B x T x S x A
        q = sc.query_proj(s).unsqueeze(2)  # B x T x 1 x A
    if c_loop and dtype == torch.bfloat16 and native.library() is not None:
        assert counts == {"plain": 0, "coverage": 0}, counts
    else:
        assert counts["coverage"] == counts["plain"] + 1, counts
    # against the scores from the Linear's coverage term
    hand = torch.tanh(q.to(F64) + linear_keys.to(F64)) @ sc.v_weight().to(F64)
    tol = 1e-10 if dtype == F64 else 0.1
    torch.testing.assert_close(scores.to(F64), hand, rtol=tol, atol=tol)


@pytest.mark.parametrize("arch, opts", [
    ("rnn_bahdanau_tiny", {}),
    ("rnn_luong_tiny", dict(attention="concat", input_feeding=True)),
    ("rnn_luong_tiny", dict(attention="concat", input_feeding=False)),
])
def test_decoder_coverage_is_the_sum_of_previous_attention(arch, opts):
    """Step i scores with cov_i = sum_{k<i} a_k; the cached coverage after T steps is sum_k a_k.
    Checked by replaying the attention of each step with the coverage computed by hand."""
    d = make_dict()
    model = build_model(arch, coverage=True, dtype=F64, **opts).eval()
    dec = model.decoder
    src, lengths, prev = make_batch(d)
    logits, attn = full_forward(model, src, lengths, prev)
    state = {}
    with torch.no_grad():
        enc = model.encoder(src, lengths)
        incremental_forward(model, enc, prev, state)
    cached = dec.get_incremental_state(state, "state")
    torch.testing.assert_close(cached["cov"], attn.sum(1))
    assert cached["step"].tolist() == [prev.size(1)] * len(lengths)
    # the model with coverage zeroed would attend differently after the first step
    with torch.no_grad():
        dec.attention.scorer.coverage_proj.weight.zero_()
        _, attn0 = full_forward(model, src, lengths, prev)
    torch.testing.assert_close(attn0[:, 0], attn[:, 0])
    assert not torch.allclose(attn0[:, 1:], attn[:, 1:])


def test_coverage_matches_manual_bahdanau_loop():
    d = make_dict()
    model = build_model("rnn_bahdanau_tiny", coverage=True, rnn_type="gru", dtype=F64).eval()
    dec = model.decoder
    src, lengths, prev = make_batch(d)
    with torch.no_grad():
        feats, extra = model(src, lengths, prev, features_only=True)
        enc = model.encoder(src, lengths)
        h = enc["final_hidden"]
        values = enc["encoder_out"].transpose(0, 1)
        mask = enc["encoder_padding_mask"]
        keys = dec.attention.keys(values)
        cov = torch.zeros(mask.shape, dtype=F64)
        for t in range(prev.size(1)):
            scores = dec.attention.scorer(h[-1], keys, cov).masked_fill(mask, -math.inf)
            a = torch.softmax(scores, -1)
            ctx = torch.einsum("bs,bsc->bc", a, values)
            e = dec.embed_tokens(prev[:, t])
            out, h = dec.rnn(torch.cat([e, ctx], -1).unsqueeze(0), h)
            ti = torch.tanh(dec.readout(torch.cat([out[0], ctx, e], -1)))
            torch.testing.assert_close(extra["attn"][0][:, t], a)
            torch.testing.assert_close(feats[:, t], ti)
            cov = cov + a


# ------------------------------------------------------------------ local attention in the decoder


def test_luong_local_m_attends_only_around_the_target_step():
    """Left-padded sources: the window is around sentence position t (from the first real token)."""
    d = make_dict()
    D = 1
    model = build_model("rnn_luong_tiny", attention_mode="local-m", local_window=D, dtype=F64).eval()
    src, lengths, prev = make_batch(d, src_lengths=[5, 2, 4], tgt_len=5)
    _, attn = full_forward(model, src, lengths, prev)
    for b, n in enumerate([5, 2, 4]):
        offset = src.size(1) - n
        for t in range(5):
            p = min(t, n - 1)
            inside = {offset + s for s in range(n) if abs(s - p) <= D}
            nonzero = set(attn[b, t].nonzero().flatten().tolist())
            assert nonzero == inside, (b, t, nonzero, inside)


def test_local_step_is_tracked_and_reordered_in_the_incremental_state():
    d = make_dict()
    model = build_model("rnn_luong_tiny", attention_mode="local-m", local_window=1,
                        input_feeding=False, dtype=F64).eval()
    src, lengths, prev = make_batch(d, tgt_len=5)
    state = {}
    with torch.no_grad():
        enc = model.encoder(src, lengths)
    incremental_forward(model, enc, prev[:, :3], state)
    assert model.decoder.get_incremental_state(state, "state")["step"].tolist() == [3, 3, 3]
    order = torch.tensor([1, 1, 0, 2])
    model.decoder.reorder_incremental_state_scripting(state, order)
    assert model.decoder.get_incremental_state(state, "state")["step"].tolist() == [3, 3, 3, 3]


# ------------------------------------------------------------------ RNNsearch: s_0, maxout, s_{i-1}


@pytest.mark.parametrize("rnn_type", ["gru", "lstm"])
def test_backward_first_init_is_tanh_of_Ws_h_back_1(rnn_type):
    """s_0 = tanh(W_s h<-_1 + b), h<-_1 the backward encoder's output at the first real word."""
    d = make_dict()
    model = build_model("rnn_bahdanau_tiny", decoder_init="backward_first", rnn_type=rnn_type,
                        dtype=F64).eval()
    dec = model.decoder
    src, lengths, _ = make_batch(d)  # left padded
    with torch.no_grad():
        enc = model.encoder(src, lengths)
        state = dec.initial_state(enc)
    Hd = model.encoder.hidden_size
    W, b = dec.init_hidden.proj.weight, dec.init_hidden.proj.bias
    assert W.shape == (dec.hidden_size, Hd)
    for i, n in enumerate(lengths.tolist()):
        first = src.size(1) - n
        h_back_1 = enc["encoder_out"][first, i, Hd:]  # the backward half of the first word
        with torch.no_grad():
            torch.testing.assert_close(state["h"][0, i], torch.tanh(W @ h_back_1 + b))
    if rnn_type == "lstm":
        Wc, bc = dec.init_cell.proj.weight, dec.init_cell.proj.bias
        with torch.no_grad():
            torch.testing.assert_close(state["c"][0], torch.tanh(enc["backward_first_cell"][0] @ Wc.t() + bc))


def test_rnnsearch_decoder_matches_the_paper_equations():
    """RNNsearch (Bahdanau et al., Appendix A.2.2), GRU, with s the decoder state:
        s_0 = tanh(W_s h<-_1);  e_ij = v^T tanh(W s_{i-1} + U h_j);  c_i = sum_j a_ij h_j
        s_i = GRU([E y_{i-1}; c_i], s_{i-1})
        t~_i = U_o s_{i-1} + V_o E y_{i-1} + C_o c_i;  t_i = [max(t~_{i,2j-1}, t~_{i,2j})]_j
        p(y_i) = softmax(W_o t_i)"""
    d = make_dict()
    sizes = PAPER_TINY["rnn_bahdanau_paper"]
    model = build_model("rnn_bahdanau_paper", dtype=F64, **sizes).eval()
    dec = model.decoder
    assert dec.rnn_type == "gru" and dec.maxout and dec.readout_previous
    l = sizes["maxout_dim"]
    H, C, E = dec.hidden_size, model.encoder.output_dim, dec.embed_tokens.embedding_dim
    assert dec.readout.weight.shape == (2 * l, H + C + E) and dec.out_embed_dim == l
    U_o, C_o, V_o = dec.readout.weight.split([H, C, E], dim=1)
    src, lengths, prev = make_batch(d)
    with torch.no_grad():
        logits, extra = model(src, lengths, prev)
        enc = model.encoder(src, lengths)
        Hd = model.encoder.hidden_size
        h_back_1 = torch.stack([enc["encoder_out"][src.size(1) - n, i, Hd:]  # first real word
                                for i, n in enumerate(lengths.tolist())])
        s = torch.tanh(h_back_1 @ dec.init_hidden.proj.weight.t() + dec.init_hidden.proj.bias)
        values = enc["encoder_out"].transpose(0, 1)
        mask = enc["encoder_padding_mask"]
        sc = dec.attention.scorer
        for i in range(prev.size(1)):
            e = sc.v(torch.tanh(sc.query_proj(s).unsqueeze(1) + sc.key_proj(values))).squeeze(-1)
            a = torch.softmax(e.masked_fill(mask, -math.inf), -1)
            c = torch.einsum("bs,bsc->bc", a, values)
            Ey = dec.embed_tokens(prev[:, i])
            t_tilde = s @ U_o.t() + Ey @ V_o.t() + c @ C_o.t() + dec.readout.bias
            t = torch.stack([torch.maximum(t_tilde[:, 2 * j], t_tilde[:, 2 * j + 1]) for j in range(l)], -1)
            torch.testing.assert_close(logits[:, i], dec.fc_out(t))
            torch.testing.assert_close(extra["attn"][0][:, i], a)
            s = torch.gru_cell(torch.cat([Ey, c], -1), s, dec.rnn.weight_ih_l0, dec.rnn.weight_hh_l0,
                               dec.rnn.bias_ih_l0, dec.rnn.bias_hh_l0)


def test_vanilla_readout_with_previous_state_and_maxout():
    """Cho et al. (2014)'s deep output over s_{i-1}: t_i = maxout(W [s_{i-1}; c; E y_{i-1}])."""
    d = make_dict()
    model = build_model("rnn_vanilla_tiny", readout="maxout", readout_state="previous",
                        maxout_dim=6, rnn_type="gru", dtype=F64).eval()
    dec = model.decoder
    src, lengths, prev = make_batch(d)
    with torch.no_grad():
        feats, _ = model(src, lengths, prev, features_only=True)
        enc = model.encoder(src, lengths)
        h = enc["final_hidden"]
        ctx = h[-1]
        for t in range(prev.size(1)):
            e = dec.embed_tokens(prev[:, t])
            pre = dec.readout(torch.cat([h[-1], ctx, e], -1))
            torch.testing.assert_close(feats[:, t], pre.view(-1, 6, 2).amax(-1))
            _, h = dec.rnn(torch.cat([e, ctx], -1).unsqueeze(0), h)
    assert feats.shape[-1] == 6


# ------------------------------------------------------------------ architectures and checks


def test_paper_architectures_have_the_paper_settings():
    args = argparse.Namespace()
    ARCH_FNS["rnn_bahdanau_paper"](args)
    assert (args.rnn_type, args.attention_placement, args.attention) == ("gru", "before", "additive")
    assert args.encoder_bidirectional and args.encoder_hidden_size == 1000
    assert args.encoder_embed_dim == args.decoder_embed_dim == 620
    assert args.decoder_hidden_size == 1000 and args.attention_dim == 1000
    assert (args.readout, args.maxout_dim, args.readout_state) == ("maxout", 500, "previous")
    assert args.decoder_init == "backward_first"
    check_config(args)

    args = argparse.Namespace()
    ARCH_FNS["rnn_luong_paper"](args)
    assert (args.attention_placement, args.attention, args.attention_mode) == ("after", "general", "local-p")
    assert args.local_window == 10 and args.input_feeding and args.reverse_source
    assert args.encoder_layers == args.decoder_layers == 4 and not args.encoder_bidirectional
    assert args.encoder_hidden_size == args.decoder_hidden_size == 1000
    assert args.encoder_embed_dim == args.decoder_embed_dim == args.decoder_out_embed_dim == 1000
    assert args.decoder_dropout_out == 0.2
    check_config(args)


def test_user_options_override_paper_architecture():
    args = argparse.Namespace(attention_mode="local-m", rnn_type="lstm")
    ARCH_FNS["rnn_luong_paper"](args)
    assert args.attention_mode == "local-m" and args.decoder_layers == 4
    args = argparse.Namespace(readout_state="current")
    ARCH_FNS["rnn_bahdanau_paper"](args)
    assert args.readout_state == "current" and args.readout == "maxout"


@pytest.mark.parametrize("arch", ["rnn_bahdanau_paper", "rnn_luong_paper"])
def test_paper_architectures_build(arch):
    model = build_model(arch, **PAPER_TINY[arch])
    assert isinstance(model, RNNS2SModel)


@pytest.mark.parametrize("arch, opts, message", [
    ("rnn_luong_tiny", dict(attention_scale=True, attention="concat"), "--attention-scale"),
    ("rnn_luong_tiny", dict(attention_scale=True, attention="location"), "--attention-scale"),
    ("rnn_luong_tiny", dict(attention_normalize=True, attention="general"), "--attention-normalize"),
    ("rnn_luong_tiny", dict(coverage=True), "--coverage"),  # general
    ("rnn_luong_tiny", dict(coverage=True, attention="location"), "--coverage"),
    ("rnn_vanilla_tiny", dict(coverage=True), "--coverage"),
    ("rnn_vanilla_tiny", dict(attention_mode="local-p"), "--attention-mode local-p"),
    # accepted without effect before: the vanilla decoder has no score to scale or normalise
    ("rnn_vanilla_tiny", dict(attention_scale=True), "--attention-scale needs attention"),
    ("rnn_vanilla_tiny", dict(attention_normalize=True),
     "--attention-normalize needs attention"),
    ("rnn_luong_tiny", dict(readout="maxout"), "--readout maxout"),
    ("rnn_luong_tiny", dict(readout_state="previous"), "--readout-state previous"),
    ("rnn_bahdanau_tiny", dict(decoder_init="backward_first", encoder_bidirectional=False),
     "--decoder-init backward_first"),
    ("rnn_luong_tiny", dict(attention_mode="local-m", local_window=0), "--local-window"),
    ("rnn_bahdanau_tiny", dict(readout="maxout", maxout_dim=-1), "--maxout-dim"),
    ("rnn_bahdanau_tiny", dict(readout="maxout", maxout_dim=16, share_decoder_input_output_embed=True),
     "--maxout-dim"),
])
def test_options_that_do_not_apply_together_raise(arch, opts, message):
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        check_config(make_args(arch, **opts))


def test_maxout_dim_can_feed_shared_embeddings():
    model = build_model("rnn_bahdanau_tiny", readout="maxout", maxout_dim=32,
                        share_decoder_input_output_embed=True)
    assert model.decoder.out_embed_dim == 32 and model.decoder.fc_out is None


# ------------------------------------------------------------------ beam search (fairseq's generator)


@pytest.mark.parametrize("arch, opts", [
    ("rnn_luong_tiny", dict(attention_mode="local-m", local_window=1, input_feeding=True)),
    ("rnn_luong_tiny", dict(attention_mode="local-p", local_window=1, input_feeding=False)),
    ("rnn_luong_tiny", dict(attention="location", attention_mode="local-m", local_window=1,
                            input_feeding=False)),
    ("rnn_bahdanau_tiny", dict(coverage=True, attention_normalize=True)),
    ("rnn_luong_tiny", dict(attention="concat", coverage=True, input_feeding=False)),
    ("rnn_bahdanau_paper", PAPER_TINY["rnn_bahdanau_paper"]),
    ("rnn_luong_paper", PAPER_TINY["rnn_luong_paper"]),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items() if "dim" not in k))
def test_sequence_generator_scores_are_the_models_own(arch, opts):
    """Beam search (beam 3) reorders the incremental state (step, coverage) as hypotheses move
    between beams; every hypothesis' positional scores and attention must equal a full pass."""
    from fairseq.sequence_generator import SequenceGenerator

    from test_model import _sample, _teacher_forced

    d = make_dict()
    model = build_model(arch, seed=3, dtype=F64, **opts).eval()
    sample = _sample(d)
    src = sample["net_input"]["src_tokens"]
    hypos = SequenceGenerator([model], d, beam_size=3, max_len_a=0, max_len_b=7).generate([model], sample)
    for i, sent in enumerate(hypos):
        assert len(sent) == 3
        for h in sent:
            lp, attn = _teacher_forced(model, d, src[i], h["tokens"])
            torch.testing.assert_close(h["positional_scores"], lp.float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h["attention"], attn.t().to(h["attention"].dtype),
                                       atol=1e-5, rtol=1e-5)
