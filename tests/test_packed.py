"""Weight matrices prepacked for oneDNN in --cpu-bf16 decoding (fairseq_s2s_attn/packed.py): the
packed products give F.linear's bits, run where they may and nowhere else."""

import gc

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model, count_calls, inference_cfg, random_tokens
from fairseq_s2s_attn import packed

needs_onednn_bf16 = pytest.mark.skipif(not packed.available(), reason="no oneDNN bf16 on this CPU")


@pytest.fixture(autouse=True)
def pack_any_size(monkeypatch):
    """The tests' weights and tiny models are smaller than packing pays for (MIN_ELEMENTS)."""
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)


@pytest.fixture
def calls(monkeypatch):
    """Counts the packed products (packed.PACKED_LINEAR)."""
    return count_calls(monkeypatch, packed, "PACKED_LINEAR")


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.1).bfloat16()


def _packed(n, k, calls):
    """A packed n x k bf16 weight, the call count reset (packing tries the product once)."""
    w = _weight(n, k)
    assert packed.pack(w) is not None
    calls[0] = 0
    return w


@needs_onednn_bf16
@pytest.mark.parametrize("n,k", [(7, 5), (64, 48), (600, 40)])
def test_packed_products_equal_f_linear_bit_for_bit(n, k, calls):
    w, b = _packed(n, k, calls), torch.randn(n).bfloat16()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for shape in [(k,), (1, k), (5, k), (80, k), (300, k), (4, 3, k), (6, 1, k)]:
            x = torch.randn(*shape, generator=g).bfloat16()
            for bias in (b, None):
                assert torch.equal(packed.linear(x, w, bias), F.linear(x, w, bias))
            # fp32 input and bias under CPU bf16 autocast: cast as autocast casts them
            x32, b32 = x.float() * 1.01, b.float()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got, want = packed.linear(x32, w, b32), F.linear(x32, w, b32)
            assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    assert calls[0] == 7 * 3


@needs_onednn_bf16
def test_plain_product_where_packing_would_not_give_its_bits_or_its_gradient(calls):
    w = _packed(32, 16, calls)
    x = torch.randn(6, 16).bfloat16()
    with torch.no_grad():
        strided = torch.randn(16, 3, 4).bfloat16().transpose(0, 2)  # 4 x 3 x 16, not contiguous
        assert torch.equal(packed.linear(strided, w), F.linear(strided, w))
        x32 = x.float()  # fp32 input without autocast: F.linear's own dtype error, unchanged
        with pytest.raises(RuntimeError):
            packed.linear(x32, w)
    assert calls[0] == 0
    # autograd recording (training): the plain product, with its gradient
    leaf = w.detach().requires_grad_()
    packed.pack(leaf)
    calls[0] = 0
    xg = x.clone().requires_grad_()
    packed.linear(xg, leaf).float().sum().backward()
    assert calls[0] == 0 and xg.grad is not None and leaf.grad is not None


@needs_onednn_bf16
def test_a_weight_changed_after_packing_is_multiplied_as_it_is_now(calls):
    w = _packed(24, 8, calls)
    x = torch.randn(5, 8).bfloat16()
    with torch.no_grad():
        assert torch.equal(packed.linear(x, w), F.linear(x, w)) and calls[0] == 1
        w.mul_(2)  # in place (an optimizer's step): the packed copy is stale
        assert torch.equal(packed.linear(x, w), F.linear(x, w)) and calls[0] == 1
        packed.pack(w)
        assert torch.equal(packed.linear(x, w), F.linear(x, w)) and calls[0] == 3
        w.data = _weight(24, 8, seed=3)  # new storage
        assert torch.equal(packed.linear(x, w), F.linear(x, w)) and calls[0] == 3


@needs_onednn_bf16
def test_an_fp32_bias_is_cast_once_and_again_after_it_changes(calls):
    """The RNN biases stay fp32 in --cpu-bf16 models: the packed product keeps their bf16 copy
    and makes it again for another bias tensor or after a change (in place, new storage)."""
    w = _packed(24, 8, calls)
    b, other = torch.randn(24), torch.randn(24)
    x = torch.randn(5, 8).bfloat16()

    def plain(bias):  # what the decoder's product does with an fp32 bias (CPU bf16 autocast)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.linear(x, w, bias)

    with torch.no_grad():
        assert torch.equal(packed.linear(x, w, b), plain(b))
        copy = packed.packed_weight(w).bias_bf16
        assert torch.equal(packed.linear(x, w, b), plain(b))
        assert packed.packed_weight(w).bias_bf16 is copy  # not cast again
        b.add_(1)  # in place: the copy is stale
        assert torch.equal(packed.linear(x, w, b), plain(b))
        b.data = torch.randn(24)  # new storage, the same version
        assert torch.equal(packed.linear(x, w, b), plain(b))
        assert torch.equal(packed.linear(x, w, other), plain(other))
        assert torch.equal(packed.linear(x, w, b), plain(b))
    assert calls[0] == 6


@needs_onednn_bf16
def test_a_freed_weight_takes_its_packed_copy_along():
    w = _weight(16, 8)
    packed.pack(w)
    key = id(w)
    assert key in packed._PACKED
    del w
    gc.collect()
    assert key not in packed._PACKED


def test_only_2d_bf16_cpu_weights_are_packed(monkeypatch):
    assert packed.pack(_weight(8, 4).float()) is None
    assert packed.pack(torch.zeros(8).bfloat16()) is None
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 1 << 13)  # the default: tiny ones stay plain
    assert packed.pack(_weight(128, 32)) is None
    if packed.available():
        assert packed.pack(_weight(128, 64)) is not None
    monkeypatch.setenv("S2S_PACK_WEIGHTS", "0")
    assert not packed.available() and packed.pack(_weight(8, 4)) is None


# decoder variants whose per-step products differ: the RNN (LSTM, GRU, two layers), the scores
# with a per-step projection (additive, location, local-p), input feeding, a tied output layer
VARIANTS = {
    "bahdanau-lstm": ("rnn_bahdanau_tiny", {}),
    "bahdanau-gru-maxout-coverage": ("rnn_bahdanau_tiny", dict(
        rnn_type="gru", readout="maxout", coverage=True)),
    "luong-general-feed-2layers": ("rnn_luong_tiny", dict(
        attention="general", input_feeding=True, decoder_layers=2, encoder_layers=2)),
    "luong-location-nofeed": ("rnn_luong_tiny", dict(attention="location", input_feeding=False)),
    "luong-concat-local-p-tied": ("rnn_luong_tiny", dict(
        attention="concat", attention_mode="local-p", local_window=2,
        share_decoder_input_output_embed=True)),
    "vanilla": ("rnn_vanilla_tiny", {}),
}


def _beam_search(model, src):
    from fairseq.sequence_generator import SequenceGenerator

    d = model.decoder.dictionary
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)}}
    search = SequenceGenerator([model], d, beam_size=3, max_len_b=7)
    outs = []
    for hypos in search.generate([model], sample):
        for h in hypos:
            outs += [h["tokens"], h["positional_scores"], h["score"].view(1), h["attention"]]
    return outs


@needs_onednn_bf16
@pytest.mark.parametrize("name", VARIANTS)
def test_decoding_with_packed_weights_equals_decoding_without(name, calls, gen):
    arch, overrides = VARIANTS[name]
    model = build_model(arch, seed=5, cpu_bf16=True, init_range=0.3, **overrides).eval()
    model.prepare_for_inference_(inference_cfg(print_alignment=True))
    calls[0] = 0
    weights = model.decoder.step_weights()
    assert all(packed.packed_weight(w) is not None for w in weights)
    assert packed.packed_bytes(weights) >= sum(w.numel() * 2 for w in weights)
    src = random_tokens(model.decoder.dictionary, [7, 4, 6, 2, 5], left_pad=True, generator=gen)
    steps, extract = [], model.decoder.extract_features

    def counted_step(*args, **kwargs):  # the search calls the decoder once per step
        steps.append(1)
        return extract(*args, **kwargs)

    model.decoder.extract_features = counted_step
    with_packing = _beam_search(model, src)
    # every step's products went through the packed copies: at least one per weight and step
    assert steps and calls[0] >= len(weights) * len(steps)
    packed.unpack(model.parameters())
    count = calls[0]
    without = _beam_search(model, src)
    assert calls[0] == count
    assert len(with_packing) == len(without)
    for a, b in zip(with_packing, without):
        if a is None:
            assert b is None
        else:
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_packing_is_for_cpu_bf16_decoding_only():
    fp32 = build_model("rnn_bahdanau_tiny", cpu_bf16=False).eval()
    fp32.prepare_for_inference_(inference_cfg())
    assert not any(packed.packed_weight(w) for w in fp32.decoder.step_weights())
    trained = build_model("rnn_bahdanau_tiny", cpu_bf16=True)  # training never prepares
    trained(torch.tensor([[5, 6, 2]]), torch.tensor([3]), torch.tensor([[2, 5]]))
    assert not any(packed.packed_weight(w) for w in trained.decoder.step_weights())


@needs_onednn_bf16
def test_a_model_leaving_the_cpu_drops_its_packed_weights():
    model = build_model("rnn_luong_tiny", cpu_bf16=True).eval()
    model.prepare_for_inference_(inference_cfg())
    old = model.decoder.step_weights()  # held here: only _apply can drop their copies
    assert all(packed.packed_weight(w) is not None for w in old)
    model.to("meta")  # as .cuda() would; --cpu-bf16 does nothing there
    assert not {id(w) for w in old} & set(packed._PACKED)
    assert not any(packed.packed_weight(w) for w in model.decoder.step_weights())


@needs_onednn_bf16
def test_a_model_cast_on_the_cpu_drops_its_stale_packed_weights():
    """.float() on the CPU gives the weights new data: their copies can serve no product."""
    model = build_model("rnn_luong_tiny", cpu_bf16=True).eval()
    model.prepare_for_inference_(inference_cfg())
    weights = model.decoder.step_weights()
    assert all(packed.packed_weight(w) is not None for w in weights)
    model.float()
    assert not {id(w) for w in weights} & set(packed._PACKED)
    # a call that changes nothing keeps them
    model2 = build_model("rnn_luong_tiny", cpu_bf16=True).eval()
    model2.prepare_for_inference_(inference_cfg())
    model2.to("cpu")
    assert all(packed.packed_weight(w) is not None for w in model2.decoder.step_weights())


@needs_onednn_bf16
def test_a_weight_whose_packed_product_would_differ_stays_plain(monkeypatch):
    """pack() tries the packed product on a probe and keeps the packed copy only where it gives
    F.linear's bits (a CPU's packed kernel may block the sums differently): with a kernel one
    bf16 rounding step off (the real one scaled by 1 + 2^-7) the weight is refused, and
    linear() is F.linear, bit for bit, with no packed product run."""
    op, calls = packed.PACKED_LINEAR, [0]

    def off_by_a_step(*args):
        calls[0] += 1
        return op(*args) * (1 + 2 ** -7)

    monkeypatch.setattr(packed, "PACKED_LINEAR", off_by_a_step)
    w, b = _weight(32, 16), torch.randn(32).bfloat16()
    assert packed.pack(w) is None and packed.packed_weight(w) is None
    assert packed.pack_for_decoding_([w]) == 0
    assert calls[0] == 2  # each packing attempt ran the probe once
    x = torch.randn(5, 16).bfloat16()
    with torch.no_grad():
        assert torch.equal(packed.linear(x, w, b), F.linear(x, w, b))
    assert calls[0] == 2
