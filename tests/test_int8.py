"""int8 weight copies for --cpu-int8 decoding (fairseq_s2s_attn/int8.py): products within the
rounding that int8 weights and 7-bit inputs allow, run where they may and nowhere else."""

import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model, count_calls, inference_cfg, random_tokens
from fairseq_s2s_attn import int8, packed

needs_int8 = pytest.mark.skipif(not int8.available(), reason="no fbgemm int8 product in this torch")


@pytest.fixture(autouse=True)
def copy_any_size(monkeypatch):
    """The tests' weights and tiny models are smaller than int8 copies are made for."""
    monkeypatch.setattr(int8, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)


@pytest.fixture
def calls(monkeypatch):
    """Counts fbgemm's int8 products (int8.LINEAR_DYNAMIC)."""
    return count_calls(monkeypatch, int8, "LINEAR_DYNAMIC")


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.1


def _bound(x, weight):
    """The largest error of an int8 product x W^T: W's rows rounded to their int8 grid (at most
    half a row's scale per weight) and x to 7-bit steps of (max - min) / 127 over the call's rows
    (at most half a step, min and max widened to include 0). Per output: sum_k |x_k| * scale_n / 2
    + sum_k |W_nk| * step / 2, plus fp32 slack."""
    q, scale = int8.quantize_rows(weight)
    flat = x.reshape(-1, x.size(-1)).float()
    step = (flat.max().clamp_min(0) - flat.min().clamp_max(0)) / 127
    w_err = flat.abs().sum(-1, keepdim=True) * scale.float() / 2  # rows x N
    x_err = weight.abs().float().sum(-1) * step / 2  # N
    return (w_err + x_err).view(*x.shape[:-1], -1) * 1.01 + 1e-5


@needs_int8
@pytest.mark.parametrize("n,k", [(7, 5), (64, 48), (600, 40)])
def test_int8_products_are_within_their_rounding(n, k):
    w, b = _weight(n, k), torch.randn(n)
    entry = int8.pack(w)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for shape in [(k,), (1, k), (5, k), (80, k), (4, 3, k)]:
            x = torch.randn(*shape, generator=g)
            for bias in (b, None):
                got = packed.linear(x, w, bias)
                exact = F.linear(x, w, bias)
                assert got.shape == exact.shape and got.dtype == torch.float32
                err = (got - exact).abs()
                assert (err <= _bound(x, w)).all(), (shape, err.max())
                # int8 arithmetic, not the fp32 product: the products differ somewhere
                assert not torch.equal(got, exact)
    assert int8.int8_weight(w) is entry


@needs_int8
def test_the_weight_grid_is_one_scale_per_row():
    w = _weight(30, 20)
    w[3] *= 50  # a row of large weights does not coarsen the others' grid
    w[5] = 0  # an all-zero row stays zero
    q, scale = int8.quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    largest = w.abs().amax(1)
    assert torch.allclose(scale.float(), (largest / 127).where(largest > 0, torch.ones(30)))
    back = q.double() * scale[:, None]
    assert ((back - w.double()).abs() <= scale[:, None] / 2 + 1e-12).all()
    assert torch.equal(q[5], torch.zeros(20, dtype=torch.int8))


@needs_int8
def test_under_cpu_bf16_the_products_give_bf16_and_the_output_layer_fp32():
    w, out = _weight(64, 32), _weight(100, 32, seed=2)
    int8.pack(w)
    int8.pack(out, fp32_out=True)
    x = torch.randn(5, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed.linear(x, w).dtype == torch.bfloat16 == F.linear(x, w).dtype
        assert packed.linear(x.bfloat16(), out).dtype == torch.float32
        ref = F.linear(x, out).float()
        assert (packed.linear(x, out) - ref).abs().max() < 0.05


@needs_int8
def test_plain_product_where_the_int8_copy_may_not_serve(calls, monkeypatch):
    w, b = _weight(32, 16), torch.randn(32)
    int8.pack(w)
    x = torch.randn(6, 16)
    # autograd recording (training): the plain product, with its gradient
    xg = x.clone().requires_grad_()
    out = packed.linear(xg, w, b)
    assert torch.equal(out, F.linear(x, w, b)) and calls[0] == 0
    out.sum().backward()
    assert xg.grad is not None
    with torch.no_grad():
        packed.linear(x, w, b)
        assert calls[0] == 1
        monkeypatch.setattr(int8, "ENABLED", False)  # turned off (beam_ab's lever)
        assert torch.equal(packed.linear(x, w, b), F.linear(x, w, b)) and calls[0] == 1
        monkeypatch.setattr(int8, "ENABLED", True)
        w.mul_(2)  # changed in place: the copy is stale
        assert torch.equal(packed.linear(x, w, b), F.linear(x, w, b)) and calls[0] == 1
        int8.pack(w)
        packed.linear(x, w, b)
        assert calls[0] == 2
        w.data = _weight(32, 16, seed=3)  # new storage
        assert torch.equal(packed.linear(x, w, b), F.linear(x, w, b)) and calls[0] == 2


@needs_int8
def test_the_bias_is_packed_once_and_again_after_it_changes():
    w, b, other = _weight(40, 16), torch.randn(40), torch.randn(40)
    entry = int8.pack(w)
    x = torch.randn(5, 16)
    with torch.no_grad():
        plain = packed.linear(x, w)  # no bias: the same int8 product without it

        def check(bias):
            assert torch.allclose(packed.linear(x, w, bias), plain + bias, atol=1e-5)

        check(b)
        first = entry.with_bias
        check(b)
        assert entry.with_bias is first  # not packed again
        b.add_(1)  # in place
        check(b)
        assert entry.with_bias is not first
        b.data = torch.randn(40)  # new storage, the same version
        check(b)
        check(other)
        check(b)


# decoder variants whose per-step products differ (as tests/test_packed.py)
VARIANTS = {
    "bahdanau-lstm": ("rnn_bahdanau_tiny", {}),
    "bahdanau-gru-maxout-coverage": ("rnn_bahdanau_tiny", dict(rnn_type="gru", readout="maxout", coverage=True)),
    "luong-general-feed-2layers": ("rnn_luong_tiny", dict(
        attention="general", input_feeding=True, decoder_layers=2, encoder_layers=2)),
    "luong-concat-tied": ("rnn_luong_tiny", dict(attention="concat", share_decoder_input_output_embed=True)),
}


def _beam_search(model, src, beam=3):
    from fairseq.sequence_generator import SequenceGenerator

    d = model.decoder.dictionary
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)}}
    search = SequenceGenerator([model], d, beam_size=beam, max_len_b=7)
    return [h for hypos in search.generate([model], sample) for h in hypos]


@needs_int8
@pytest.mark.parametrize("cpu_bf16", [True, False], ids=["cpu_bf16", "fp32"])
@pytest.mark.parametrize("name", VARIANTS)
def test_cpu_int8_decoding_runs_every_step_product_in_int8(name, cpu_bf16, calls, gen, monkeypatch):
    arch, overrides = VARIANTS[name]
    model = build_model(arch, seed=5, cpu_bf16=cpu_bf16, cpu_int8=True, init_range=0.3, **overrides).eval()
    model.prepare_for_inference_(inference_cfg())
    weights = model.decoder.step_weights()
    assert all(int8.int8_weight(w) is not None for w in weights)
    assert not any(packed.packed_weight(w) for w in weights)  # no oneDNN copy beside the int8 one
    output = int8.int8_weight(model.decoder.output_projection()[0])
    assert output.fp32_out and sum(int8.int8_weight(w).fp32_out for w in weights) == 1
    src = random_tokens(model.decoder.dictionary, [7, 4, 6, 2, 5], left_pad=True, generator=gen)
    steps, extract = [], model.decoder.extract_features

    def counted_step(*args, **kwargs):
        steps.append(1)
        return extract(*args, **kwargs)

    model.decoder.extract_features = counted_step
    _beam_search(model, src)
    assert steps and calls[0] >= len(weights) * len(steps)
    # a given target's log-probabilities (forced decoding, fairseq-generate --score-reference):
    # within int8's rounding of the plain path's, and not equal to them
    d = model.decoder.dictionary
    prev = random_tokens(d, [6, 3, 5, 2, 4], left_pad=False, generator=gen)
    prev = torch.cat([torch.full((5, 1), d.eos()), prev[:, :-1]], 1)

    def log_probs():
        with torch.no_grad():
            out = model(src, src.ne(d.pad()).sum(1), prev)
            return model.get_normalized_probs(out, log_probs=True), out[0].dtype

    count = calls[0]
    with_int8, dtype = log_probs()
    assert calls[0] > count and dtype == torch.float32  # the output layer's logits stay fp32
    monkeypatch.setattr(int8, "ENABLED", False)
    count = calls[0]
    plain, plain_dtype = log_probs()
    assert calls[0] == count and plain_dtype == (torch.bfloat16 if cpu_bf16 else torch.float32)
    keep = prev.ne(d.pad())
    err = (with_int8 - plain).abs()[keep]
    assert 0 < err.max() < 0.1, err.max()


def test_int8_copies_are_for_cpu_int8_decoding_only():
    plain = build_model("rnn_bahdanau_tiny", cpu_bf16=True).eval()
    plain.prepare_for_inference_(inference_cfg())
    assert not any(int8.int8_weight(w) for w in plain.decoder.step_weights())
    trained = build_model("rnn_bahdanau_tiny", cpu_int8=True)  # training never prepares
    loss = trained(torch.tensor([[5, 6, 2]]), torch.tensor([3]), torch.tensor([[2, 5]]))[0].sum()
    loss.backward()
    assert not any(int8.int8_weight(w) for w in trained.decoder.step_weights())


@needs_int8
@pytest.mark.parametrize("cpu_bf16", [True, False], ids=["cpu_bf16", "fp32"])
def test_a_model_leaving_the_cpu_drops_its_int8_copies(cpu_bf16):
    model = build_model("rnn_luong_tiny", cpu_bf16=cpu_bf16, cpu_int8=True).eval()
    model.prepare_for_inference_(inference_cfg())
    model.to("cpu")  # a call that changes nothing keeps them (fp32 models have no bf16 copies)
    old = model.decoder.step_weights()
    assert all(int8.int8_weight(w) is not None for w in old)
    model.to("meta")  # as .cuda() would
    assert not {id(w) for w in old} & set(int8._INT8)


@needs_int8
def test_without_the_int8_product_decoding_warns_and_runs_plain(monkeypatch, caplog):
    monkeypatch.setattr(int8, "_AVAILABLE", False)
    model = build_model("rnn_luong_tiny", cpu_int8=True).eval()
    with caplog.at_level(logging.WARNING):
        model.prepare_for_inference_(inference_cfg())
    assert "--cpu-int8: this torch has no int8 dynamic product" in caplog.text
    assert not any(int8.int8_weight(w) for w in model.decoder.step_weights())
