"""Every decoder keeps the CUDA kernels' argument contracts, checked on CPU (see cuda_contracts.py).

The step-loop decoders (Bahdanau, input feeding, coverage) once passed a B x 4H tensor as the
LSTM cell's bias: right on CPU, fatal on the first CUDA update. These tests run training
(forward + backward), incremental decoding and beam search of every variant with the CUDA
branch taken and the CUDA checks enforced, in fp32/fp64 and in the low precisions fairseq's
--fp16, --bf16 and --amp (autocast) produce, and compare the results with the plain CPU path.
Beam search's steps are also checked for host reads of tensor values (free on CPU, a wait for
the device on a GPU).
"""

import contextlib

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

import cuda_contracts
from fairseq_s2s_attn import encoder as encoder_module
from conftest import build_model, make_dict
from test_decoder import VARIANTS, full_forward, incremental_forward, make_batch, vid


def runs_steps(model) -> bool:
    dec = model.decoder
    return dec.placement == "before" or dec.input_feeding or dec.coverage


def forward_backward(model, src, lengths, prev):
    model.zero_grad(set_to_none=True)
    logits, extra = model(src, lengths, prev)
    # fp64 stays fp64 (a cast to fp32 here would make CPU and CUDA gradients differ by fp32
    # rounding); fp16/bf16 logits are summed in fp32
    logits.to(torch.promote_types(logits.dtype, torch.float32)).logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), extra["attn"][0], grads


@pytest.mark.parametrize("bias_shape", [(3, 8), (1, 8)])
def test_checker_refuses_the_2d_bias_that_cuda_refuses(monkeypatch, bias_shape):
    """The guard itself: the call the old decoder made (the hoisted embedding part as bias)."""
    cuda_contracts.enforce(monkeypatch)
    x, h, c = torch.randn(3, 5), torch.randn(3, 2), torch.randn(3, 2)
    w_ih, w_hh = torch.randn(8, 5), torch.randn(8, 2)
    with pytest.raises(cuda_contracts.CudaContractError, match="1-dimensional"):
        torch.lstm_cell(x, (h, c), w_ih, w_hh, torch.randn(*bias_shape), None)
    with pytest.raises(cuda_contracts.CudaContractError, match="1-dimensional"):
        torch.gru_cell(x, h, torch.randn(6, 5), torch.randn(6, 2), torch.randn(3, 6), None)
    torch.lstm_cell(x, (h, c), w_ih, w_hh, torch.randn(8), torch.randn(8))  # 1-D: accepted


def test_checker_refuses_mixed_dtypes(monkeypatch):
    cuda_contracts.enforce(monkeypatch)
    g = torch.randn(2, 8)
    with pytest.raises(cuda_contracts.CudaContractError, match="mixed dtypes"):
        cuda_contracts.fused_lstm_cell(g.bfloat16(), g.bfloat16(), torch.randn(2, 2))


@pytest.mark.parametrize("variant", VARIANTS, ids=[vid(v) for v in VARIANTS])
def test_training_step_keeps_cuda_contracts_and_equals_the_cpu_path(monkeypatch, variant):
    arch, opts = variant
    d = make_dict()
    model = build_model(arch, dtype=torch.float64, **opts).train()
    src, lengths, prev = make_batch(d, seed=2)
    plain = forward_backward(model, src, lengths, prev)
    calls = cuda_contracts.enforce(monkeypatch)
    strict = forward_backward(model, src, lengths, prev)
    if runs_steps(model):
        assert calls["lstm"] + calls["gru"] > 0, "the CUDA branch of the cell did not run"
    torch.testing.assert_close(strict[0], plain[0])
    if plain[1] is not None:
        torch.testing.assert_close(strict[1], plain[1])
    assert strict[2].keys() == plain[2].keys()
    for name in plain[2]:
        torch.testing.assert_close(strict[2][name], plain[2][name], msg=name)


@pytest.mark.parametrize("variant", VARIANTS, ids=[vid(v) for v in VARIANTS])
def test_incremental_decoding_keeps_cuda_contracts(monkeypatch, variant):
    arch, opts = variant
    d = make_dict()
    model = build_model(arch, dtype=torch.float64, **opts).eval()
    src, lengths, prev = make_batch(d, seed=3)
    logits, attn = full_forward(model, src, lengths, prev)
    calls = cuda_contracts.enforce(monkeypatch)
    with torch.no_grad():
        enc = model.encoder(src, lengths)
    inc_logits, inc_attn = incremental_forward(model, enc, prev, {})
    if runs_steps(model):
        assert calls["lstm"] + calls["gru"] > 0
    torch.testing.assert_close(inc_logits, logits, atol=1e-6, rtol=1e-6)
    if attn is not None:
        torch.testing.assert_close(inc_attn, attn, atol=1e-6, rtol=1e-6)


# the architectures as shipped (tiny sizes) in the precisions fairseq's GPU options give them:
# --fp16 / --bf16 convert the model (model.half() / .to(bfloat16)); --amp runs an fp32 model under
# autocast (on CPU, autocast's dtype is bf16: the same mix of dtypes reaches the cells)
PRECISION_ARCHS = [
    ("rnn_vanilla_tiny", {}),
    ("rnn_bahdanau_tiny", {}),
    # LSTM: the GRU with input feeding drifts further in a bf16 model (log-probabilities up to
    # 0.37 from fp32 on this tiny model, mean 0.046; the LSTM rows at most 0.12 / 0.019; open)
    ("rnn_luong_tiny", dict(rnn_type="lstm", input_feeding=True)),
    ("rnn_luong_tiny", {}),  # as shipped: no input feeding
    ("rnn_bahdanau_tiny", dict(rnn_type="lstm", coverage=True)),
    ("rnn_luong_tiny", dict(attention_mode="local-p", local_window=1, decoder_layers=2, rnn_type="lstm",
                            input_feeding=True)),
    ("rnn_bahdanau_paper", {"encoder_embed_dim": 12, "decoder_embed_dim": 10,
                            "encoder_hidden_size": 16, "decoder_hidden_size": 20,
                            "attention_dim": 14, "maxout_dim": 9}),
]
PRECISIONS = ["fp16-model", "bf16-model", "autocast"]


def in_precision(model, precision):
    if precision == "fp16-model":
        return model.half(), torch.autocast("cpu", enabled=False)
    if precision == "bf16-model":
        return model.to(torch.bfloat16), torch.autocast("cpu", enabled=False)
    return model, torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", PRECISION_ARCHS, ids=[vid(v) for v in PRECISION_ARCHS])
def test_low_precision_training_and_beam_search_keep_cuda_contracts(monkeypatch, variant, precision):
    arch, opts = variant
    d = make_dict()
    reference = build_model(arch, **opts).train()
    src, lengths, prev = make_batch(d, seed=4)
    ref_logits = forward_backward(reference, src, lengths, prev)[0]
    model, region = in_precision(build_model(arch, **opts).train(), precision)
    calls = cuda_contracts.enforce(monkeypatch)
    with region:
        logits, _attn, grads = forward_backward(model, src, lengths, prev)
    if runs_steps(model):
        assert calls["lstm"] + calls["gru"] > 0
    check_low_precision(model, region, d, src, lengths, logits, grads, ref_logits)


def check_low_precision(model, region, d, src, lengths, logits, grads, ref_logits):
    """A low-precision training step's results against the fp32 reference, then beam search."""
    assert all(torch.isfinite(g.float()).all() for g in grads.values())
    # the same function in fewer bits: log-probabilities agree to a few hundredths
    torch.testing.assert_close(torch.log_softmax(logits.float().cpu(), -1),
                               torch.log_softmax(ref_logits, -1), atol=0.1, rtol=0.05)
    model.eval()
    gen = SequenceGenerator([model], d, beam_size=3, max_len_b=6)
    with torch.no_grad(), region:
        hypos = gen.generate([model], {"net_input": {"src_tokens": src, "src_lengths": lengths}})
    assert len(hypos) == src.size(0) and all(len(h) == 3 for h in hypos)


def test_beam_search_fp32_under_contracts_equals_plain(monkeypatch):
    """Same hypotheses and scores with the CUDA branch as with the plain CPU path."""
    d = make_dict()
    model = build_model("rnn_bahdanau_tiny", dtype=torch.float64).eval()
    src, lengths, _ = make_batch(d, seed=5)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    gen = SequenceGenerator([model], d, beam_size=4, max_len_b=7)
    plain = gen.generate([model], sample)
    cuda_contracts.enforce(monkeypatch)
    strict = gen.generate([model], sample)
    for a, b in zip(plain, strict):
        for ha, hb in zip(a, b):
            assert torch.equal(ha["tokens"], hb["tokens"])
            torch.testing.assert_close(ha["score"], hb["score"])


def finish_sentence_early(model, d, beam, sentence=1, at_call=2):
    """Makes every hypothesis of one sentence choose EOS at decoder call ``at_call`` of each
    search, so that sentence finishes before the others and fairseq's search drops its rows at
    the next step. Returns the call counter (reset it to 0 before a search)."""
    calls = [0]
    original = model.get_normalized_probs

    def get_normalized_probs(*args, **kwargs):
        lprobs = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == at_call:
            rows = slice(sentence * beam, (sentence + 1) * beam)  # no sentence has left yet
            lprobs = lprobs.clone()
            lprobs[rows] = float("-inf")
            lprobs[rows, ..., d.eos()] = 0
        return lprobs

    model.get_normalized_probs = get_normalized_probs
    return calls


@pytest.mark.parametrize("variant", VARIANTS, ids=[vid(v) for v in VARIANTS])
def test_beam_search_steps_read_no_values_on_the_host(monkeypatch, variant):
    """What our code does at each step of fairseq's beam search (the decoder, both reorders, the
    log-probabilities) reads no tensor value on the host: on a GPU every such read (``torch.equal``,
    ``.item()``, ``bool()``) waits until the device has finished the queued work. The encoder's
    reorder once compared the order's values twice per step to keep the source side one row per
    sentence (fairseq's lstm reads nothing there; fairseq's search itself reads ~1.5 times per
    step). Checked through a step where a sentence finishes and its source rows leave, with the
    cells' CUDA branch taken; the hypotheses equal those of the checked path
    (``encoder.source_order``, for callers other than fairseq's search)."""
    arch, opts = variant
    d = make_dict()
    model = build_model(arch, dtype=torch.float64, **opts).eval()
    src, lengths, _ = make_batch(d, seed=6)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    beam = 3
    cuda_contracts.enforce(monkeypatch)
    calls = finish_sentence_early(model, d, beam)
    reads = cuda_contracts.HostReads(monkeypatch)
    for name, owner in (("reorder_encoder_out", model.encoder), ("forward", model.decoder),
                        ("reorder_incremental_state_scripting", model.decoder),
                        ("get_normalized_probs", model)):
        monkeypatch.setattr(owner, name, reads.watch(getattr(owner, name), name))
    sizes = []
    reorder = model.encoder.reorder_encoder_out
    monkeypatch.setattr(model.encoder, "reorder_encoder_out",
                        lambda out, order: (sizes.append(order.numel()), reorder(out, order))[1])

    def search():
        calls[0] = 0
        gen = SequenceGenerator([model], d, beam_size=beam, max_len_a=0, max_len_b=6)
        with torch.no_grad():
            return gen.generate([model], sample)

    with reads:
        fast = search()
    assert reads.reads == []
    bsz = src.size(0)
    assert sizes[0] == bsz * beam and (bsz - 1) * beam in sizes  # the sentence left mid-search
    assert len(fast[1]) == beam and all(len(h["tokens"]) == 2 for h in fast[1])  # EOS at step 1
    # the checked path (source_order reads the order) gives the same hypotheses
    monkeypatch.setattr(encoder_module, "sentence_runs", contextlib.nullcontext)
    checked = search()
    for a, b in zip(fast, checked):
        for ha, hb in zip(a, b):
            assert torch.equal(ha["tokens"], hb["tokens"])
            torch.testing.assert_close(ha["positional_scores"], hb["positional_scores"], rtol=0, atol=0)
