"""RNN decoder (through the model, built from the registered architectures): shapes,
incremental decoding, state reordering, gradients, initial states, attention placement."""

import pytest
import torch
import torch.nn.functional as F

from conftest import PAPER_TINY, Scale, build_model, make_dict, random_tokens

SRC_LENGTHS = [5, 2, 4]
TGT_LEN = 4

# (architecture, options the user gave); every variant the brief names
VARIANTS = [
    ("rnn_vanilla_tiny", {}),
    ("rnn_bahdanau_tiny", {}),  # with coverage, rnn_bahdanau's default
    ("rnn_bahdanau_tiny", dict(coverage=False)),  # the paper's plain additive score
    ("rnn_luong_tiny", {}),  # no input feeding, rnn_luong's default
    ("rnn_luong_tiny", dict(input_feeding=True)),
    ("rnn_vanilla_tiny", dict(rnn_type="gru")),
    ("rnn_bahdanau_tiny", dict(rnn_type="lstm")),
    ("rnn_luong_tiny", dict(rnn_type="lstm", input_feeding=True)),
    ("rnn_luong_tiny", dict(rnn_type="lstm", input_feeding=False)),
    ("rnn_vanilla_tiny", dict(decoder_layers=2)),
    ("rnn_bahdanau_tiny", dict(decoder_layers=2, encoder_layers=2)),
    ("rnn_luong_tiny", dict(decoder_layers=2, input_feeding=True)),  # 1-layer encoder, 2-layer decoder
    ("rnn_luong_tiny", dict(decoder_layers=2, input_feeding=False, rnn_type="lstm")),
    ("rnn_vanilla_tiny", dict(decoder_init="zeros")),
    ("rnn_vanilla_tiny", dict(decoder_init="bridge")),
    ("rnn_bahdanau_tiny", dict(decoder_init="zeros")),
    ("rnn_bahdanau_tiny", dict(decoder_init="bridge", rnn_type="lstm")),
    ("rnn_luong_tiny", dict(decoder_init="zeros", input_feeding=True)),
    ("rnn_luong_tiny", dict(decoder_init="bridge", input_feeding=True)),
    ("rnn_luong_tiny", dict(attention="dot", input_feeding=True)),
    ("rnn_luong_tiny", dict(attention="concat", input_feeding=True)),
    ("rnn_bahdanau_tiny", dict(attention="general", encoder_bidirectional=False)),
    # encoder output size 48 != decoder hidden 64: 'final' init goes through a projection
    ("rnn_bahdanau_tiny", dict(encoder_hidden_size=24)),
    ("rnn_luong_tiny", dict(reverse_source=True, input_feeding=True)),
    # attention variants (issue #3); small local windows so that the window cuts the sources
    ("rnn_luong_tiny", dict(attention="location", input_feeding=True)),
    ("rnn_luong_tiny", dict(attention="location", input_feeding=False)),
    ("rnn_luong_tiny", dict(attention_mode="local-m", local_window=1, input_feeding=True)),
    ("rnn_luong_tiny", dict(attention_mode="local-m", local_window=1, input_feeding=False)),
    ("rnn_luong_tiny", dict(attention_mode="local-p", local_window=1, input_feeding=True)),
    ("rnn_luong_tiny", dict(attention_mode="local-p", local_window=2, input_feeding=False,
                            attention="dot", attention_scale=True)),
    ("rnn_luong_tiny", dict(attention_mode="local-m", local_window=1, attention="location",
                            reverse_source=True, input_feeding=True)),
    ("rnn_bahdanau_tiny", dict(attention_mode="local-p", local_window=1)),
    ("rnn_bahdanau_tiny", dict(attention_mode="local-m", local_window=1, coverage=True)),
    ("rnn_luong_tiny", dict(attention_scale=True, input_feeding=True)),
    ("rnn_bahdanau_tiny", dict(attention_normalize=True)),
    ("rnn_luong_tiny", dict(attention="concat", attention_normalize=True, input_feeding=False)),
    ("rnn_bahdanau_tiny", dict(coverage=True)),
    ("rnn_bahdanau_tiny", dict(coverage=True, attention_normalize=True, rnn_type="lstm")),
    ("rnn_luong_tiny", dict(attention="concat", coverage=True, input_feeding=True)),
    ("rnn_luong_tiny", dict(attention="concat", coverage=True, input_feeding=False)),
    ("rnn_bahdanau_tiny", dict(readout="maxout")),
    ("rnn_bahdanau_tiny", dict(readout_state="previous")),
    ("rnn_vanilla_tiny", dict(readout="maxout", readout_state="previous", maxout_dim=20)),
    ("rnn_bahdanau_tiny", dict(decoder_init="backward_first")),
    ("rnn_bahdanau_tiny", dict(decoder_init="backward_first", encoder_bidirectional=False,
                               reverse_source=True, encoder_layers=2, decoder_layers=2)),
    ("rnn_bahdanau_paper", PAPER_TINY["rnn_bahdanau_paper"]),
    ("rnn_luong_paper", PAPER_TINY["rnn_luong_paper"]),
]


def vid(v):
    arch, opts = v
    return arch.replace("_tiny", "") + "".join(f"-{k}={val}" for k, val in opts.items())


@pytest.fixture(params=VARIANTS, ids=[vid(v) for v in VARIANTS])
def variant(request):
    return request.param


def make_batch(d, seed=0, src_lengths=SRC_LENGTHS, tgt_len=TGT_LEN, left_pad=True):
    g = torch.Generator().manual_seed(seed)
    src = random_tokens(d, src_lengths, left_pad=left_pad, generator=g)
    # prev_output_tokens as fairseq builds them: eos, then the target shifted right
    prev = torch.randint(d.nspecial, len(d), (len(src_lengths), tgt_len), generator=g)
    prev[:, 0] = d.eos()
    return src, src.ne(d.pad()).sum(1), prev


def full_forward(model, src, lengths, prev):
    with torch.no_grad():
        logits, extra = model(src, lengths, prev)
    return logits, extra["attn"][0]


def incremental_forward(model, encoder_out, prev, incremental_state, start=0):
    """Steps start..T-1, each call given the growing prefix, as SequenceGenerator does."""
    logits, attns = [], []
    with torch.no_grad():
        for t in range(start, prev.size(1)):
            out, extra = model.decoder(prev[:, : t + 1], encoder_out=encoder_out,
                                       incremental_state=incremental_state)
            assert out.shape[1] == 1
            logits.append(out[:, -1])
            a = extra["attn"][0]
            attns.append(None if a is None else a[:, -1])
    logits = torch.stack(logits, 1)
    attn = None if attns[0] is None else torch.stack(attns, 1)
    return logits, attn


def test_output_shapes(variant):
    arch, opts = variant
    d = make_dict()
    model = build_model(arch, **opts).eval()
    src, lengths, prev = make_batch(d)
    logits, attn = full_forward(model, src, lengths, prev)
    assert logits.shape == (len(SRC_LENGTHS), TGT_LEN, len(d))
    assert torch.isfinite(logits).all()
    if arch.startswith("rnn_vanilla"):
        assert attn is None
    else:
        assert attn.shape == (len(SRC_LENGTHS), TGT_LEN, src.size(1))
        pad = src.eq(d.pad()).unsqueeze(1).expand_as(attn)
        assert torch.all(attn[pad] == 0)
        if model.decoder.attention.mode == "local-p":  # softmax times a Gaussian: sums to < 1
            assert torch.all(attn.sum(-1) > 0) and torch.all(attn.sum(-1) <= 1 + 1e-6)
        else:
            torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:2]))
    feats, _ = model(src, lengths, prev, features_only=True)
    assert feats.shape == (len(SRC_LENGTHS), TGT_LEN, model.decoder.out_embed_dim)


def test_incremental_decoding_equals_full_forward(variant):
    arch, opts = variant
    d = make_dict()
    model = build_model(arch, dtype=torch.float64, **opts).eval()
    src, lengths, prev = make_batch(d, seed=1)
    logits, attn = full_forward(model, src, lengths, prev)
    with torch.no_grad():
        enc = model.encoder(src, lengths)
    inc_logits, inc_attn = incremental_forward(model, enc, prev, {})
    torch.testing.assert_close(inc_logits, logits, atol=1e-5, rtol=1e-5)
    if attn is None:
        assert inc_attn is None
    else:
        torch.testing.assert_close(inc_attn, attn, atol=1e-5, rtol=1e-5)


def test_only_the_decoder_keeps_incremental_state(variant):
    """RNNDecoder.reorder_incremental_state_scripting reorders the decoder's own state only,
    where fairseq's walks every submodule: right while no submodule has state to reorder."""
    arch, opts = variant
    model = build_model(arch, **opts)
    holders = [m for m in model.decoder.modules() if hasattr(m, "reorder_incremental_state")]
    assert holders == [model.decoder]


def test_reorder_incremental_state_equals_reordered_batch(variant):
    arch, opts = variant
    d = make_dict()
    model = build_model(arch, dtype=torch.float64, **opts).eval()
    src, lengths, prev = make_batch(d, seed=2, tgt_len=5)
    new_order = torch.tensor([2, 2, 0, 1])  # beam-like: a repeat, a permutation, a change of size
    ref_logits, ref_attn = full_forward(model, src[new_order], lengths[new_order], prev[new_order])

    state = {}
    with torch.no_grad():
        enc = model.encoder(src, lengths)
    split = 2
    incremental_forward(model, enc, prev[:, :split], state)
    # what SequenceGenerator does between steps
    enc = model.encoder.reorder_encoder_out(enc, new_order)
    model.decoder.reorder_incremental_state_scripting(state, new_order)
    logits, attn = incremental_forward(model, enc, prev[new_order], state, start=split)
    torch.testing.assert_close(logits, ref_logits[:, split:], atol=1e-5, rtol=1e-5)
    if ref_attn is None:
        assert attn is None
    else:
        torch.testing.assert_close(attn, ref_attn[:, split:], atol=1e-5, rtol=1e-5)


def test_beam_search_keeps_the_source_side_once_per_sentence(variant):
    """In beam search the source side (encoder output, attention keys) stays one row per
    sentence and serves its hypotheses (RNNEncoder.reorder_encoder_out); decoding through
    shuffles within sentences, a finished sentence and an order that mixes sentences (one row
    per hypothesis from then on) equals decoding with one source row per hypothesis throughout."""
    arch, opts = variant
    d = make_dict()
    model = build_model(arch, dtype=torch.float64, **opts).eval()
    src, lengths, prev = make_batch(d, seed=3, tgt_len=6)
    bsz, beam = src.size(0), 2
    expand = torch.arange(bsz).repeat_interleave(beam)
    prev = prev[expand].clone()
    prev[:, 1:] = torch.randint(d.nspecial, len(d), prev[:, 1:].shape, generator=torch.Generator().manual_seed(5))
    within = torch.tensor([1, 0, 2, 2, 5, 4])  # every hypothesis stays with its sentence
    shrink = torch.tensor([0, 1, 4, 5])  # sentence 1 finished
    mixed = torch.tensor([3, 0, 2, 2])  # sentences mixed within a run: one row per hypothesis

    def decode(grouped):
        with torch.no_grad():
            if grouped:  # what SequenceGenerator does
                enc = model.encoder.reorder_encoder_out(model.encoder(src, lengths), expand)
            else:  # every hypothesis encoded as a sentence of its own
                enc = model.encoder(src[expand], lengths[expand])
        state, outs, toks, rows = {}, [], prev, []
        for t, order in ((2, within), (3, shrink), (4, mixed), (6, None)):
            start = 0 if not outs else outs[-1][1]
            logits, attn = incremental_forward(model, enc, toks[:, :t], state, start=start)
            outs.append(((logits, attn), t))
            keys = model.decoder._get_cache(state).get("keys")
            rows.append(enc["encoder_out"].size(1) if keys is None else keys.size(0))
            if order is not None:
                enc = model.encoder.reorder_encoder_out(enc, order)
                model.decoder.reorder_incremental_state_scripting(state, order)
                toks = toks[order]
        return [o for o, _ in outs], rows

    (fast, rows), (plain, plain_rows) = decode(True), decode(False)
    assert rows == [3, 3, 2, 4] and plain_rows == [6, 6, 4, 4]  # source rows kept per step
    for (logits, attn), (plain_logits, plain_attn) in zip(fast, plain):
        torch.testing.assert_close(logits, plain_logits, rtol=1e-10, atol=1e-12)  # fp64
        if plain_attn is None:
            assert attn is None
        else:
            torch.testing.assert_close(attn, plain_attn, rtol=1e-10, atol=1e-12)


def test_gradients_reach_every_parameter(variant):
    arch, opts = variant
    d = make_dict()
    model = build_model(arch, **opts).train()  # dropout is 0 (see conftest.build_model)
    src, lengths, prev = make_batch(d, seed=3)
    target = torch.cat([prev[:, 1:], torch.full((prev.size(0), 1), d.eos())], dim=1)
    logits, _ = model(src, lengths, prev)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [n for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None and not bool(p.grad.ne(0).any())]
    assert not missing, f"no gradient: {missing}"
    assert not zero, f"all-zero gradient: {zero}"
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), n


def test_padding_side_of_source_does_not_matter(variant):
    """The same sentences left- or right-padded: same logits, attention on the same tokens."""
    arch, opts = variant
    d = make_dict()
    model = build_model(arch, dtype=torch.float64, **opts).eval()
    src_l, lengths, prev = make_batch(d, seed=4, left_pad=True)
    src_r = torch.full_like(src_l, d.pad())
    for b, n in enumerate(SRC_LENGTHS):
        src_r[b, :n] = src_l[b, src_l.size(1) - n:]
    logits_l, attn_l = full_forward(model, src_l, lengths, prev)
    logits_r, attn_r = full_forward(model, src_r, lengths, prev)
    torch.testing.assert_close(logits_l, logits_r, atol=1e-5, rtol=1e-5)
    if attn_l is not None:
        for b, n in enumerate(SRC_LENGTHS):
            torch.testing.assert_close(attn_l[b, :, src_l.size(1) - n:], attn_r[b, :, :n],
                                       atol=1e-5, rtol=1e-5)


def test_batch_equals_sentences_alone(variant):
    """Each sentence decoded alone (no padding) gives what it gets inside the padded batch."""
    arch, opts = variant
    d = make_dict()
    model = build_model(arch, dtype=torch.float64, **opts).eval()
    src, lengths, prev = make_batch(d, seed=5)
    logits, attn = full_forward(model, src, lengths, prev)
    for b, n in enumerate(SRC_LENGTHS):
        one = src[b : b + 1, src.size(1) - n:]
        l1, a1 = full_forward(model, one, lengths[b : b + 1], prev[b : b + 1])
        torch.testing.assert_close(l1[0], logits[b], atol=1e-5, rtol=1e-5)
        if attn is not None:
            torch.testing.assert_close(a1[0], attn[b, :, src.size(1) - n:], atol=1e-5, rtol=1e-5)


def test_dropout_is_active_in_training_only():
    d = make_dict()
    model = build_model("rnn_luong_tiny", dropout=True)  # the tiny architectures' own dropout
    assert model.decoder.dropout_out.p > 0 and model.encoder.dropout_in.p > 0
    src, lengths, prev = make_batch(d)
    model.train()
    torch.manual_seed(0)
    a, _ = model(src, lengths, prev)
    b, _ = model(src, lengths, prev)
    assert not torch.allclose(a, b)
    model.eval()
    a, _ = full_forward(model, src, lengths, prev)
    b, _ = full_forward(model, src, lengths, prev)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ initial state


def _encode(model, d, seed=6):
    src, lengths, _ = make_batch(d, seed=seed)
    with torch.no_grad():
        return model.encoder(src, lengths)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_decoder_init_zeros(rnn_type):
    d = make_dict()
    model = build_model("rnn_bahdanau_tiny", decoder_init="zeros", rnn_type=rnn_type, decoder_layers=2)
    state = model.decoder.initial_state(_encode(model, d))
    assert state["h"].shape == (2, len(SRC_LENGTHS), 64)
    assert torch.all(state["h"] == 0)
    if rnn_type == "lstm":
        assert torch.all(state["c"] == 0)
    else:
        assert state["c"] is None
    assert not any("init_" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_decoder_init_final_same_size_is_the_encoder_state(rnn_type):
    d = make_dict()
    # encoder output 2 x 32 = 64 == decoder hidden 64: no projection
    model = build_model("rnn_bahdanau_tiny", decoder_init="final", rnn_type=rnn_type,
                        encoder_layers=2, decoder_layers=2)
    assert model.decoder.init_hidden.proj is None
    enc = _encode(model, d)
    state = model.decoder.initial_state(enc)
    torch.testing.assert_close(state["h"], enc["final_hidden"])
    if rnn_type == "lstm":
        torch.testing.assert_close(state["c"], enc["final_cell"])


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize("enc_layers, dec_layers", [(1, 2), (2, 1)])
def test_decoder_init_final_different_depths_start_from_the_top_layer(enc_layers, dec_layers, rnn_type):
    d = make_dict()
    model = build_model("rnn_luong_tiny", decoder_init="final", encoder_layers=enc_layers,
                        decoder_layers=dec_layers, rnn_type=rnn_type)
    enc = _encode(model, d)
    state = model.decoder.initial_state(enc)
    assert state["h"].shape[0] == dec_layers
    for layer in range(dec_layers):
        torch.testing.assert_close(state["h"][layer], enc["final_hidden"][-1])
        if rnn_type == "lstm":
            torch.testing.assert_close(state["c"][layer], enc["final_cell"][-1])
    if rnn_type == "gru":
        assert state["c"] is None


def test_decoder_init_final_projects_when_sizes_differ():
    d = make_dict()
    model = build_model("rnn_bahdanau_tiny", decoder_init="final", encoder_hidden_size=24)
    proj = model.decoder.init_hidden.proj
    assert proj is not None and proj.in_features == 48 and proj.out_features == 64
    enc = _encode(model, d)
    state = model.decoder.initial_state(enc)
    with torch.no_grad():
        torch.testing.assert_close(state["h"], proj(enc["final_hidden"]))


def test_decoder_init_bridge_is_tanh_of_affine_map():
    d = make_dict()
    model = build_model("rnn_bahdanau_tiny", decoder_init="bridge", rnn_type="lstm")
    enc = _encode(model, d)
    state = model.decoder.initial_state(enc)
    W, b = model.decoder.init_hidden.proj.weight, model.decoder.init_hidden.proj.bias
    Wc, bc = model.decoder.init_cell.proj.weight, model.decoder.init_cell.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(state["h"], torch.tanh(enc["final_hidden"] @ W.t() + b))
        torch.testing.assert_close(state["c"], torch.tanh(enc["final_cell"] @ Wc.t() + bc))
    assert not torch.allclose(W, Wc), "hidden and cell bridges are separate maps"


# ------------------------------------------------------------------ what each placement uses


def test_vanilla_ignores_encoder_outputs_and_uses_final_state():
    """Vanilla seq2seq sees the source only through the encoder's final state."""
    d = make_dict()
    model = build_model("rnn_vanilla_tiny").eval()
    enc = _encode(model, d)
    prev = make_batch(d)[2]
    with torch.no_grad():
        base, extra = model.decoder(prev, encoder_out=enc)
        assert extra["attn"][0] is None
        noisy = dict(enc, encoder_out=torch.randn_like(enc["encoder_out"]))
        torch.testing.assert_close(model.decoder(prev, encoder_out=noisy)[0], base)
        changed = dict(enc, final_hidden=enc["final_hidden"] + 0.5)
        assert not torch.allclose(model.decoder(prev, encoder_out=changed)[0], base)


def test_bahdanau_first_attention_does_not_depend_on_first_input_token():
    """Bahdanau scores with the previous state s_{i-1}: step 0 attends before reading y_0."""
    d = make_dict()
    model = build_model("rnn_bahdanau_tiny").eval()
    src, lengths, prev = make_batch(d)
    prev2 = prev.clone()
    prev2[:, 0] = d.nspecial  # a different first input
    _, a1 = full_forward(model, src, lengths, prev)
    _, a2 = full_forward(model, src, lengths, prev2)
    torch.testing.assert_close(a1[:, 0], a2[:, 0])
    assert not torch.allclose(a1[:, 1], a2[:, 1])


def test_luong_first_attention_depends_on_first_input_token():
    """Luong scores with the current state h_t, computed from y_0."""
    d = make_dict()
    model = build_model("rnn_luong_tiny").eval()
    src, lengths, prev = make_batch(d)
    prev2 = prev.clone()
    prev2[:, 0] = d.nspecial
    _, a1 = full_forward(model, src, lengths, prev)
    _, a2 = full_forward(model, src, lengths, prev2)
    assert not torch.allclose(a1[:, 0], a2[:, 0])


@pytest.mark.parametrize("rnn_type", ["gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("input_feeding", [True, False], ids=["feed", "nofeed"])
def test_luong_matches_manual_step_loop(input_feeding, layers, rnn_type):
    """h_t = RNN([E y_{t-1}; h~_{t-1}] or E y_{t-1}); c_t = Attn(h_t); h~_t = tanh(W_c[h_t; c_t]).

    Outputs and the gradients of every parameter must match (input feeding passes gradients
    through h~_{t-1} into the next step); fp64, so that only the order of the sums differs
    between the fused cell and nn.LSTM / nn.GRU."""
    d = make_dict()
    model = build_model("rnn_luong_tiny", input_feeding=input_feeding, encoder_layers=layers,
                        decoder_layers=layers, rnn_type=rnn_type, dtype=torch.float64).eval()
    dec = model.decoder
    assert dec.input_feeding is input_feeding
    expect = dec.embed_tokens.embedding_dim + (dec.out_embed_dim if input_feeding else 0)
    assert dec.rnn.input_size == expect
    src, lengths, prev = make_batch(d)
    proj = torch.randn(len(SRC_LENGTHS), prev.size(1), dec.out_embed_dim, dtype=torch.float64)

    feats, _ = model(src, lengths, prev, features_only=True)
    (feats * proj).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, _ in model.named_parameters() if not n.startswith("decoder.fc_out")}
    model.zero_grad()

    enc = model.encoder(src, lengths)
    state = enc["final_hidden"]  # decoder_init final, equal sizes
    if rnn_type == "lstm":
        state = (state, enc["final_cell"])
    feed = torch.zeros(len(SRC_LENGTHS), dec.out_embed_dim, dtype=torch.float64)
    values = enc["encoder_out"].transpose(0, 1)
    keys = dec.attention.keys(values)
    outs = []
    for t in range(prev.size(1)):
        x = dec.embed_tokens(prev[:, t])
        if input_feeding:
            x = torch.cat([x, feed], -1)
        out, state = dec.rnn(x.unsqueeze(0), state)
        ctx, _ = dec.attention(out[0], keys, values, enc["encoder_padding_mask"])
        feed = torch.tanh(dec.readout(torch.cat([out[0], ctx], -1)))  # h~ = tanh(W_c[h;c])
        outs.append(feed)
    manual = torch.stack(outs, 1)
    torch.testing.assert_close(feats, manual, atol=1e-5, rtol=1e-5)
    (manual * proj).sum().backward()
    for n, p in model.named_parameters():
        if n.startswith("decoder.fc_out"):
            continue  # not used by the features
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("layers", [1, 2])
def test_bahdanau_matches_manual_step_loop(layers):
    """c_i = Attn(s_{i-1}); s_i = RNN([E y_{i-1}; c_i], s_{i-1}); t_i = tanh(W_o[s_i; c_i; E y_{i-1}]),
    with s the top layer's state. The paper's plain score (coverage, rnn_bahdanau's default, is
    checked against its own loop in test_variants.py)."""
    d = make_dict()
    model = build_model("rnn_bahdanau_tiny", rnn_type="lstm", decoder_layers=layers, encoder_layers=layers,
                        coverage=False).eval()
    dec = model.decoder
    src, lengths, prev = make_batch(d)
    with torch.no_grad():
        feats, _ = model(src, lengths, prev, features_only=True)
        enc = model.encoder(src, lengths)
        h, c = enc["final_hidden"], enc["final_cell"]  # decoder_init final, equal sizes
        values = enc["encoder_out"].transpose(0, 1)
        keys = dec.attention.keys(values)
        for t in range(prev.size(1)):
            e = dec.embed_tokens(prev[:, t])
            ctx, _ = dec.attention(h[-1], keys, values, enc["encoder_padding_mask"])
            out, (h, c) = dec.rnn(torch.cat([e, ctx], -1).unsqueeze(0), (h, c))
            ti = torch.tanh(dec.readout(torch.cat([out[0], ctx, e], -1)))
            torch.testing.assert_close(feats[:, t], ti, atol=1e-5, rtol=1e-5)


def test_vanilla_matches_manual_step_loop():
    """s_i = RNN([E y_{i-1}; c], s_{i-1}), c = top-layer final encoder state; t_i = tanh(W_o[s_i; c; E y_{i-1}])."""
    d = make_dict()
    model = build_model("rnn_vanilla_tiny", rnn_type="gru", encoder_layers=2, decoder_layers=2).eval()
    dec = model.decoder
    src, lengths, prev = make_batch(d)
    with torch.no_grad():
        feats, _ = model(src, lengths, prev, features_only=True)
        enc = model.encoder(src, lengths)
        h = enc["final_hidden"]
        ctx = h[-1]
        for t in range(prev.size(1)):
            e = dec.embed_tokens(prev[:, t])
            out, h = dec.rnn(torch.cat([e, ctx], -1).unsqueeze(0), h)
            ti = torch.tanh(dec.readout(torch.cat([out[0], ctx, e], -1)))
            torch.testing.assert_close(feats[:, t], ti, atol=1e-5, rtol=1e-5)


def test_invalid_decoder_options_raise():
    from fairseq.models.transformer import Embedding

    from fairseq_s2s_attn.decoder import RNNDecoder

    d = make_dict()
    emb = Embedding(len(d), 8, d.pad())
    with pytest.raises(ValueError, match="placement"):
        RNNDecoder(d, emb, 8, 1, 8, attention_placement="middle")
    with pytest.raises(ValueError, match="init"):
        RNNDecoder(d, emb, 8, 1, 8, init="random")
    with pytest.raises(ValueError, match="decoder_out_embed_dim"):
        RNNDecoder(d, emb, 8, 1, 8, out_embed_dim=6, share_input_output_embed=True)


@pytest.mark.slow
@pytest.mark.parametrize("arch,opts", [
    ("rnn_bahdanau_tiny", {}),
    ("rnn_luong_tiny", dict(rnn_type="lstm", decoder_layers=2, attention="concat", coverage=True)),
], ids=["bahdanau", "luong-lstm-2layers-coverage"])
def test_compiled_step_equals_eager_step(arch, opts):
    """--compile-step: the step loop's per-step work through torch.compile gives the eager
    results in training (outputs and every gradient), for batches of
    several shapes (dynamic shapes); a compile-step model decodes incrementally as the eager one."""
    import torch._dynamo

    d = make_dict()
    eager = build_model(arch, dtype=torch.float64, **opts).train()
    compiled = build_model(arch, compile_step=True, dtype=torch.float64, **opts).train()
    compiled.load_state_dict(eager.state_dict())
    assert compiled.decoder.compile_step and not eager.decoder.compile_step
    torch._dynamo.utils.counters.clear()
    for seed, src_lengths, tgt_len in [(2, SRC_LENGTHS, TGT_LEN), (3, [6, 3, 2, 5], 6)]:
        src, lengths, prev = make_batch(d, seed=seed, src_lengths=src_lengths, tgt_len=tgt_len)
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            logits, extra = model(src, lengths, prev)
            logits.logsumexp(-1).sum().backward()
            results.append((logits.detach(), extra["attn"][0].detach(),
                            {n: p.grad.clone() for n, p in model.named_parameters()}))
        (le, ae, ge), (lc, ac, gc) = results
        torch.testing.assert_close(lc, le)
        torch.testing.assert_close(ac, ae)
        for name in ge:
            torch.testing.assert_close(gc[name], ge[name], msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    compiled.eval()
    eager.eval()
    src, lengths, prev = make_batch(d, seed=4)
    logits, attn = full_forward(eager, src, lengths, prev)
    with torch.no_grad():
        enc = compiled.encoder(src, lengths)
    inc_logits, inc_attn = incremental_forward(compiled, enc, prev, {})
    torch.testing.assert_close(inc_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inc_attn, attn, atol=1e-5, rtol=1e-5)


def test_stack_of_one_step_is_a_view_with_the_values_of_torch_stack():
    """Incremental decoding stacks one step (and one layer's state): a view, not a copy."""
    from fairseq_s2s_attn.decoder import stack

    a, b = torch.randn(5, 4), torch.randn(5, 4)
    for dim in (0, 1):
        one = stack([a], dim=dim)
        assert torch.equal(one, torch.stack([a], dim=dim)) and one.data_ptr() == a.data_ptr()
        assert torch.equal(stack([a, b], dim=dim), torch.stack([a, b], dim=dim))


# ------------------------------------------------------------------ dropout, site by site


D_IN, D_OUT = 0.5, 0.75  # the stand-ins' factors for dropout_in and dropout_out


def with_scaled_dropout(model):
    """Replaces the encoder's and decoder's dropout modules by ``Scale`` stand-ins and turns off
    nn.LSTM/nn.GRU's own random dropout between layers (checked separately, see
    test_rnn_dropout_between_layers_is_dropout_out); the model is left in training mode."""
    for m in (model.encoder, model.decoder):
        m.dropout_in, m.dropout_out = Scale(D_IN), Scale(D_OUT)
        m.rnn.dropout = 0.0
    return model.train()


def rnn_step(rnn, x, hs, cs):
    """One step of a multi-layer nn.LSTM/nn.GRU from per-layer states (lists of B x H), with
    dropout_out's stand-in between layers, where nn.LSTM/GRU applies its dropout."""
    new_h, new_c = [], []
    for k in range(rnn.num_layers):
        inp = x if k == 0 else new_h[-1] * D_OUT
        w = [getattr(rnn, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if isinstance(rnn, torch.nn.LSTM):
            h, c = torch.lstm_cell(inp, (hs[k], cs[k]), *w)
            new_c.append(c)
        else:
            h = torch.gru_cell(inp, hs[k], *w)
        new_h.append(h)
    return new_h, (new_c if cs is not None else None)


def _scaled_dropout_run(arch, **opts):
    """A model in fp64 with the dropout stand-ins, its training forward on make_batch (features,
    attention) and what a manual loop starts from: the encoder's output, the decoder's initial
    per-layer states (decoder_init final, equal sizes; cells for an LSTM), values and keys."""
    model = with_scaled_dropout(build_model(arch, dtype=torch.float64, **opts))
    src, lengths, prev = make_batch(make_dict())
    feats, extra = model(src, lengths, prev, features_only=True)
    with torch.no_grad():
        enc = model.encoder(src, lengths)
        hs = list(enc["final_hidden"].unbind(0))
        cs = list(enc["final_cell"].unbind(0)) if enc.get("final_cell") is not None else None
        values = enc["encoder_out"].transpose(0, 1)
        keys = model.decoder.attention.keys(values, enc["encoder_padding_mask"])
    return (model, prev, feats.detach(), extra["attn"][0].detach(), enc, hs, cs, values, keys)


@pytest.mark.parametrize("rnn_type", ["gru", "lstm"])
@pytest.mark.parametrize("input_feeding, layers", [(True, 1), (True, 2), (False, 1)],
                         ids=["feed-L1", "feed-L2", "nofeed-L1"])
def test_luong_training_applies_dropout_where_documented(input_feeding, layers, rnn_type):
    """In training (dropout stand-ins: embeddings x D_IN, outputs x D_OUT) Luong's decoder is

      x_t = D_in(E y_{t-1}) (with [x_t; h~_{t-1}] for input feeding); s = RNN(x_t), D_out
      between layers; h_t = D_out(s_top); c_t = Attn(h_t); h~_t = D_out(tanh(W_c [h_t; c_t]))

    (fairseq's LSTMDecoder's places): the embedding, between layers, the top state (also as
    the attention query) and h~ (also as fed back). Step loop (input feeding) and whole-sequence
    path (without) alike; the incremental step path gives the same in training."""
    model, prev, feats, attn, enc, hs, cs, values, keys = _scaled_dropout_run(
        "rnn_luong_tiny", input_feeding=input_feeding, encoder_layers=layers, decoder_layers=layers,
        rnn_type=rnn_type)
    dec = model.decoder
    with torch.no_grad():
        feed = torch.zeros(len(SRC_LENGTHS), dec.out_embed_dim, dtype=torch.float64)
        for t in range(prev.size(1)):
            x = dec.embed_tokens(prev[:, t]) * D_IN
            if input_feeding:
                x = torch.cat([x, feed], -1)
            hs, cs = rnn_step(dec.rnn, x, hs, cs)
            h = hs[-1] * D_OUT
            ctx, a = dec.attention(h, keys, values, enc["encoder_padding_mask"])
            feed = torch.tanh(dec.readout(torch.cat([h, ctx], -1))) * D_OUT
            torch.testing.assert_close(feats[:, t], feed)
            torch.testing.assert_close(attn[:, t], a)
        # the single-step path of incremental decoding places dropout alike
        inc, _ = incremental_forward(model, enc, prev, {})
    torch.testing.assert_close(inc, dec.output_layer(feats))


@pytest.mark.parametrize("layers", [1, 2])
def test_bahdanau_training_applies_dropout_where_documented(layers):
    """In training (stand-ins as above) Bahdanau's decoder is

      e_i = D_in(E y_{i-1}); c_i = Attn(s_{i-1}); s_i = RNN([e_i; c_i], s_{i-1}) with D_out
      between layers; t_i = D_out(tanh(W_o [D_out(s_i); c_i; e_i]))

    the readout's state input and output dropped, the attention query and the recurrent state
    not. The incremental step path gives the same in training."""
    model, prev, feats, attn, enc, hs, cs, values, keys = _scaled_dropout_run(
        "rnn_bahdanau_tiny", rnn_type="lstm", decoder_layers=layers, encoder_layers=layers,
        coverage=False)
    dec = model.decoder
    with torch.no_grad():
        for t in range(prev.size(1)):
            e = dec.embed_tokens(prev[:, t]) * D_IN
            ctx, a = dec.attention(hs[-1], keys, values, enc["encoder_padding_mask"])
            hs, cs = rnn_step(dec.rnn, torch.cat([e, ctx], -1), hs, cs)
            ti = torch.tanh(dec.readout(torch.cat([hs[-1] * D_OUT, ctx, e], -1))) * D_OUT
            torch.testing.assert_close(feats[:, t], ti)
            torch.testing.assert_close(attn[:, t], a)
        inc, _ = incremental_forward(model, enc, prev, {})
    torch.testing.assert_close(inc, dec.output_layer(feats))


@pytest.mark.parametrize("arch, opts", [
    ("rnn_vanilla_tiny", {}), ("rnn_bahdanau_tiny", {}), ("rnn_luong_tiny", dict(input_feeding=True)),
])
def test_rnn_dropout_between_layers_is_dropout_out(arch, opts):
    """A multi-layer encoder's and decoder's nn.LSTM/nn.GRU drop between layers with
    dropout_out (their whole-sequence calls: the encoder, vanilla and Luong without input
    feeding; the step loop applies dropout_out itself); a single layer has none (PyTorch
    warns about dropout on a single layer)."""
    model = build_model(arch, dropout=True, encoder_layers=2, decoder_layers=2,
                        encoder_dropout_out=0.3, decoder_dropout_out=0.2, **opts)
    assert model.encoder.rnn.dropout == model.encoder.dropout_out.p == 0.3
    assert model.decoder.rnn.dropout == model.decoder.dropout_out.p == 0.2
    one = build_model(arch, dropout=True, encoder_layers=1, decoder_layers=1,
                      encoder_dropout_out=0.3, decoder_dropout_out=0.2, **opts)
    assert one.encoder.rnn.dropout == 0 and one.decoder.rnn.dropout == 0


@pytest.mark.parametrize("arch, opts, has_bias", [
    ("rnn_luong_tiny", dict(input_feeding=True), False),
    ("rnn_luong_tiny", dict(input_feeding=False), False),
    ("rnn_bahdanau_tiny", {}, True),
    ("rnn_bahdanau_tiny", dict(readout="maxout"), True),
    ("rnn_vanilla_tiny", {}, True),
])
def test_readout_bias_follows_the_papers(arch, opts, has_bias):
    """Luong's h~_t = tanh(W_c [h_t; c_t]) (eq. 5) has no bias; the deep output of vanilla and
    Bahdanau, t_i = R(W_o [s; c; E y_{i-1}] + b), keeps one (the maxout pieces' too)."""
    dec = build_model(arch, **opts).decoder
    assert (dec.readout.bias is not None) is has_bias
