"""RNN encoder: shapes, left/right padding, final states, reverse_source, reordering."""

import itertools

import pytest
import torch
from fairseq.models.transformer import Embedding

from fairseq_s2s_attn.encoder import RNNEncoder, compact_left, sentence_runs, source_runs

from conftest import Scale, random_tokens

E, H = 8, 5
LENGTHS = [6, 3, 1, 4]

CONFIGS = [
    dict(rnn_type=r, num_layers=n, bidirectional=bi)
    for r, n, bi in itertools.product(["lstm", "gru"], [1, 2], [False, True])
]


def cfg_id(c):
    return f"{c['rnn_type']}-L{c['num_layers']}-{'bi' if c['bidirectional'] else 'uni'}"


def make_encoder(d, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("rnn_type", "lstm")
    kw.setdefault("num_layers", 1)
    enc = RNNEncoder(d, Embedding(len(d), E, d.pad()), hidden_size=H, **kw)
    return enc.eval()


def run(enc, tokens):
    with torch.no_grad():
        return enc(tokens, tokens.ne(enc.padding_idx).sum(1))


def token_positions(tokens, pad):
    return [row.ne(pad).nonzero().flatten() for row in tokens]


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_output_shapes(tiny_dict, gen, cfg):
    enc = make_encoder(tiny_dict, **cfg)
    tokens = random_tokens(tiny_dict, LENGTHS, left_pad=True, generator=gen)
    out = run(enc, tokens)
    bsz, seqlen = tokens.shape
    dirs = 2 if cfg["bidirectional"] else 1
    C = H * dirs
    assert enc.output_dim == C
    assert out["encoder_out"].shape == (seqlen, bsz, C)
    assert out["encoder_padding_mask"].shape == (bsz, seqlen)
    assert torch.equal(out["encoder_padding_mask"], tokens.eq(tiny_dict.pad()))
    assert out["final_hidden"].shape == (cfg["num_layers"], bsz, C)
    if cfg["rnn_type"] == "lstm":
        assert out["final_cell"].shape == (cfg["num_layers"], bsz, C)
    else:
        assert out["final_cell"] is None


@pytest.mark.parametrize("reverse_source", [False, True], ids=["fwd", "reversed"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_left_and_right_padding_agree_and_match_unpadded(tiny_dict, gen, cfg, reverse_source):
    enc = make_encoder(tiny_dict, reverse_source=reverse_source, **cfg)
    left = random_tokens(tiny_dict, LENGTHS, left_pad=True, generator=gen)
    pad = tiny_dict.pad()
    # the same sentences, right padded
    right = torch.full_like(left, pad)
    for b, n in enumerate(LENGTHS):
        right[b, :n] = left[b, left.size(1) - n:]
    out_l, out_r = run(enc, left), run(enc, right)
    pos_l, pos_r = token_positions(left, pad), token_positions(right, pad)

    for b, n in enumerate(LENGTHS):
        # outputs stay at the positions of the tokens as given
        yl = out_l["encoder_out"][pos_l[b], b]
        yr = out_r["encoder_out"][pos_r[b], b]
        torch.testing.assert_close(yl, yr, rtol=1e-5, atol=1e-6)
        # zeros at padding
        assert torch.all(out_l["encoder_out"][left[b].eq(pad), b] == 0)
        assert torch.all(out_r["encoder_out"][right[b].eq(pad), b] == 0)
        # the sentence alone, unpadded: same outputs and final states
        alone = run(enc, right[b : b + 1, :n])
        torch.testing.assert_close(yl, alone["encoder_out"][:, 0], rtol=1e-5, atol=1e-6)
        for key in ("final_hidden", "final_cell"):
            if alone[key] is None:
                assert out_l[key] is None and out_r[key] is None
                continue
            torch.testing.assert_close(out_l[key][:, b], alone[key][:, 0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out_r[key][:, b], alone[key][:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_bidirectional_final_state_is_last_forward_and_first_backward_output(tiny_dict, gen, rnn_type):
    """final_hidden[-1] = [forward output at the last token; backward output at the first token]."""
    enc = make_encoder(tiny_dict, rnn_type=rnn_type, num_layers=2, bidirectional=True)
    tokens = random_tokens(tiny_dict, LENGTHS, left_pad=True, generator=gen)
    out = run(enc, tokens)
    for b, pos in enumerate(token_positions(tokens, tiny_dict.pad())):
        first, last = pos[0], pos[-1]
        torch.testing.assert_close(out["final_hidden"][-1, b, :H], out["encoder_out"][last, b, :H])
        torch.testing.assert_close(out["final_hidden"][-1, b, H:], out["encoder_out"][first, b, H:])


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("left_pad", [True, False], ids=["left_pad", "right_pad"])
def test_reverse_source_reads_the_sentence_backwards(tiny_dict, gen, bidirectional, left_pad):
    """reverse_source on x == the plain encoder on reversed x, outputs mapped back to x's positions."""
    rev = make_encoder(tiny_dict, bidirectional=bidirectional, reverse_source=True)
    plain = make_encoder(tiny_dict, bidirectional=bidirectional, reverse_source=False)
    plain.load_state_dict(rev.state_dict())
    tokens = random_tokens(tiny_dict, LENGTHS, left_pad=left_pad, generator=gen)
    pad = tiny_dict.pad()
    out = run(rev, tokens)
    differs = False
    for b, pos in enumerate(token_positions(tokens, pad)):
        sent = tokens[b, pos]
        ref = run(plain, sent.flip(0).unsqueeze(0))
        torch.testing.assert_close(out["encoder_out"][pos, b], ref["encoder_out"][:, 0].flip(0),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["final_hidden"][:, b], ref["final_hidden"][:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["final_cell"][:, b], ref["final_cell"][:, 0], rtol=1e-5, atol=1e-6)
        fwd = run(plain, sent.unsqueeze(0))
        if len(pos) > 1 and not torch.allclose(fwd["final_hidden"], ref["final_hidden"]):
            differs = True
    assert differs, "reversing the source should change the encoding"
    assert torch.all(out["encoder_out"][tokens.eq(pad).t()] == 0)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_reorder_encoder_out_equals_encoding_reordered_batch(tiny_dict, gen, rnn_type):
    enc = make_encoder(tiny_dict, rnn_type=rnn_type, num_layers=2, bidirectional=True)
    tokens = random_tokens(tiny_dict, LENGTHS, left_pad=True, generator=gen)
    new_order = torch.tensor([2, 0, 0, 3, 1])  # a permutation with a repeat, like a beam expansion
    reordered = enc.reorder_encoder_out(run(enc, tokens), new_order)
    direct = run(enc, tokens[new_order])
    assert set(reordered) == set(direct)
    # src_ids says which sentence of the encoded batch each row holds
    assert torch.equal(reordered["src_ids"], new_order)
    for key, val in direct.items():
        if key == "src_ids":
            continue
        if val is None:
            assert reordered[key] is None
        else:
            assert reordered[key].shape == val.shape
            torch.testing.assert_close(reordered[key], val, rtol=1e-5, atol=1e-6)


def test_training_dropout_keeps_padding_zero_and_eval_is_deterministic(tiny_dict, gen):
    enc = make_encoder(tiny_dict, bidirectional=True, num_layers=2, dropout_in=0.3, dropout_out=0.3)
    tokens = random_tokens(tiny_dict, LENGTHS, left_pad=True, generator=gen)
    enc.train()
    out = enc(tokens, None)["encoder_out"]
    assert torch.all(out[tokens.eq(tiny_dict.pad()).t()] == 0)
    enc.eval()
    a, b = run(enc, tokens), run(enc, tokens)
    assert torch.equal(a["encoder_out"], b["encoder_out"])


def test_compact_left():
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    order = compact_left(mask)
    assert order.tolist() == [[2, 3, 0, 1], [0, 1, 2, 3]]
    assert compact_left(torch.tensor([[False, False, True], [False, True, True]])) is None
    assert compact_left(torch.zeros(2, 3, dtype=torch.bool)) is None


def test_no_padding_batch(tiny_dict, gen):
    """A batch without padding takes the unpacked path and gives the same as per-sentence runs."""
    enc = make_encoder(tiny_dict, bidirectional=True)
    tokens = random_tokens(tiny_dict, [4, 4], left_pad=True, generator=gen)
    out = run(enc, tokens)
    for b in range(2):
        alone = run(enc, tokens[b : b + 1])
        torch.testing.assert_close(out["encoder_out"][:, b], alone["encoder_out"][:, 0])
        torch.testing.assert_close(out["final_hidden"][:, b], alone["final_hidden"][:, 0])


@pytest.mark.parametrize("left_pad", [True, False], ids=["left_pad", "right_pad"])
@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_final_state_is_the_output_at_the_last_real_token(tiny_dict, gen, rnn_type, left_pad):
    """decoder_init 'final' starts from final_hidden: the last state, i.e. the (unidirectional)
    encoder's output at the last real token, wherever the padding is."""
    enc = make_encoder(tiny_dict, rnn_type=rnn_type, num_layers=2, bidirectional=False)
    tokens = random_tokens(tiny_dict, LENGTHS, left_pad=left_pad, generator=gen)
    out = run(enc, tokens)
    for b, pos in enumerate(token_positions(tokens, tiny_dict.pad())):
        torch.testing.assert_close(out["final_hidden"][-1, b], out["encoder_out"][pos[-1], b])


@pytest.mark.parametrize("reverse_source", [False, True], ids=["fwd", "reversed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("left_pad", [True, False], ids=["left_pad", "right_pad"])
@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_backward_first_is_the_right_to_left_state_at_the_first_token(
        tiny_dict, gen, rnn_type, left_pad, bidirectional, reverse_source):
    """Bahdanau's h<-_1: the state of the direction reading the source right to left, at the first
    real token (its final state). Without reversal that is the backward direction (output half
    H:); with --reverse-source the forward direction reads the given source right to left."""
    enc = make_encoder(tiny_dict, rnn_type=rnn_type, num_layers=2, bidirectional=bidirectional,
                       reverse_source=reverse_source)
    tokens = random_tokens(tiny_dict, LENGTHS, left_pad=left_pad, generator=gen)
    out = run(enc, tokens)
    if not bidirectional and not reverse_source:
        assert out["backward_first_hidden"] is None and out["backward_first_cell"] is None
        return
    first = out["backward_first_hidden"]
    assert first.shape == (2, len(LENGTHS), H)
    half = slice(0, H) if reverse_source or not bidirectional else slice(H, 2 * H)
    for b, pos in enumerate(token_positions(tokens, tiny_dict.pad())):
        torch.testing.assert_close(first[-1, b], out["encoder_out"][pos[0], b, half])
        torch.testing.assert_close(first[:, b], out["final_hidden"][:, b, half])
    if rnn_type == "lstm":
        torch.testing.assert_close(out["backward_first_cell"], out["final_cell"][..., half])
    else:
        assert out["backward_first_cell"] is None


def per_hypothesis(out):
    """The encoder output with one row per hypothesis (row r of a grouped output serves
    hypotheses r * groups .. r * groups + groups - 1)."""
    groups = out.get("hyps_per_source") or 1
    rows = torch.arange(out["encoder_padding_mask"].size(0)).repeat_interleave(groups)
    return {k: v.index_select(1 if v.dim() == 3 else 0, rows)
            for k, v in out.items() if isinstance(v, torch.Tensor)}


def test_beam_search_orders_keep_one_source_row_per_sentence(tiny_dict, gen):
    """Beam search repeats each sentence beam times, then shuffles hypotheses within sentences
    and drops finished ones: the source side stays one row per sentence (no copy unless a
    sentence leaves), and every reorder equals reordering the per-hypothesis rows."""
    enc = make_encoder(tiny_dict, num_layers=1, bidirectional=True)
    tokens = random_tokens(tiny_dict, LENGTHS, left_pad=True, generator=gen)
    bsz, beam = tokens.size(0), 3
    first = run(enc, tokens)
    expand = torch.arange(bsz).repeat_interleave(beam)  # what SequenceGenerator does first
    out = enc.reorder_encoder_out(first, expand)
    assert out["hyps_per_source"] == beam and out["encoder_out"] is first["encoder_out"]

    def check(before, order, after):
        want = per_hypothesis(before)
        got = per_hypothesis(after)
        for key, val in want.items():
            torch.testing.assert_close(got[key], val.index_select(1 if val.dim() == 3 else 0, order))

    check(first, expand, out)
    within = (torch.arange(bsz * beam).view(bsz, beam).flip(1)).reshape(-1)  # rows stay in their sentence
    kept = enc.reorder_encoder_out(out, within)
    assert kept["encoder_out"] is out["encoder_out"] and kept["hyps_per_source"] == beam
    check(out, within, kept)
    # sentence 1 finished: fairseq keeps the others' hypotheses in runs (here shuffled within)
    moved = torch.tensor([0, 0, 2, 7, 6, 6, 9, 10, 11])
    shrunk = enc.reorder_encoder_out(out, moved)
    assert shrunk["encoder_out"].size(1) == 3 and shrunk["hyps_per_source"] == beam
    assert torch.equal(shrunk["src_ids"], torch.tensor([0, 2, 3]))
    check(out, moved, shrunk)
    # an order that mixes sentences within a run: one row per hypothesis, still equal
    mixed = torch.tensor([0, 3, 3, 1, 4, 8])
    flat = enc.reorder_encoder_out(shrunk, mixed)
    assert "hyps_per_source" not in flat and flat["encoder_out"].size(1) == len(mixed)
    assert torch.equal(flat["src_ids"], torch.tensor([0, 2, 2, 0, 2, 3]))
    check(shrunk, mixed, flat)


@pytest.mark.parametrize("beam", [1, 3])
def test_beam_search_orders_inside_sentence_runs_equal_the_checked_path(tiny_dict, gen, beam):
    """Inside ``sentence_runs()`` (fairseq's search) the rows kept follow from the order's size
    alone; for the search's orders (expand, shuffle within sentences, a sentence leaving) the
    result equals the checked path's, beam 1 included."""
    enc = make_encoder(tiny_dict, num_layers=1, bidirectional=True)
    tokens = random_tokens(tiny_dict, LENGTHS, left_pad=True, generator=gen)
    bsz = tokens.size(0)
    within = torch.arange(bsz * beam).view(bsz, beam).flip(1).reshape(-1)
    leave = torch.cat([torch.arange(beam).flip(0), torch.arange(2 * beam, bsz * beam)])  # 1 left
    orders = [torch.arange(bsz).repeat_interleave(beam), within, leave]

    def run_orders():
        outs = [run(enc, tokens)]
        for order in orders:
            outs.append(enc.reorder_encoder_out(outs[-1], order))
        return outs

    checked = run_orders()
    with sentence_runs():
        trusted = run_orders()
    for a, b in zip(checked, trusted):
        assert a.get("hyps_per_source") == b.get("hyps_per_source")
        for key, val in a.items():
            if isinstance(val, torch.Tensor):
                assert torch.equal(val, b[key]), key
    assert trusted[2]["encoder_out"] is trusted[0]["encoder_out"]  # no copy while none leaves
    assert torch.equal(trusted[3]["src_ids"], torch.tensor([0] + list(range(2, bsz))))
    with pytest.raises(ValueError, match="in runs of 3"):
        source_runs(torch.arange(5), 3, 4)  # not whole runs
    with pytest.raises(ValueError, match="for 3 source rows"):
        source_runs(torch.arange(7), 1, 3)  # not a repeat of every row


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_training_drops_the_embeddings_and_the_outputs(tiny_dict, gen, rnn_type):
    """In training the encoder is out = D_out(RNN(D_in(E x))), fairseq's LSTMEncoder's places
    (dropout stand-ins: D_in x 0.5, D_out x 0.75); the final states (the decoder's initial
    state) are the RNN's, not dropped. Between layers nn.LSTM/GRU drops with dropout_out."""
    enc = make_encoder(tiny_dict, rnn_type=rnn_type, num_layers=2, bidirectional=True,
                       dropout_in=0.3, dropout_out=0.2)
    assert enc.rnn.dropout == enc.dropout_out.p == 0.2
    enc.dropout_in, enc.dropout_out = Scale(0.5), Scale(0.75)
    enc.rnn.dropout = 0.0  # its random dropout between layers: checked above
    enc.train()
    tokens = random_tokens(tiny_dict, LENGTHS, left_pad=False, generator=gen)
    with torch.no_grad():
        out = enc(tokens, None)
        for b, n in enumerate(LENGTHS):
            y, state = enc.rnn(enc.embed_tokens(tokens[b : b + 1, :n]).transpose(0, 1) * 0.5)
            torch.testing.assert_close(out["encoder_out"][:n, b], y[:, 0] * 0.75)
            assert torch.all(out["encoder_out"][n:, b] == 0)
            h = state[0] if rnn_type == "lstm" else state
            # the top layer's final state, directions side by side
            torch.testing.assert_close(out["final_hidden"][-1, b], torch.cat([h[-2, 0], h[-1, 0]]))
