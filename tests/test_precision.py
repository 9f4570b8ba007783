"""fairseq's --bf16 without a TPU (precision.py): fairseq-train, fairseq-generate and
fairseq-interactive run a bfloat16 model on the machine's own device instead of dying on
'NoneType' object has no attribute 'xla_device'. On CPU here; the same code path runs on CUDA
(scripts/gpu_check.sh)."""

import argparse

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from clitools import REPO, parse_generate, run
from conftest import build_model, inference_cfg
from fairseq_s2s_attn import precision

USER_DIR = ("--user-dir", REPO / "fairseq_s2s_attn")


def test_implied_tpu_is_cleared_only_for_bf16_without_torch_xla(monkeypatch):
    def cfg(bf16, tpu):
        return OmegaConf.create({"common": {"bf16": bf16, "tpu": tpu, "cpu": True},
                                 "optimizer": {"tpu": tpu, "lr": [0.1]}, "task": None})

    c = cfg(True, True)
    assert precision.clear_implied_tpu(c)
    assert c.common.tpu is False and c.optimizer.tpu is False
    c = cfg(False, True)  # --tpu asked for without --bf16: left alone
    assert not precision.clear_implied_tpu(c) and c.common.tpu is True
    monkeypatch.setattr(precision, "tpu_available", lambda: True)
    c = cfg(True, True)  # a TPU machine: fairseq's meaning stays
    assert not precision.clear_implied_tpu(c) and c.common.tpu is True


def test_bf16_inference_converts_the_model_and_fp16_wins():
    model = build_model("rnn_luong_tiny")
    common = argparse.Namespace(bf16=True, fp16=False)
    cfg = argparse.Namespace(common=common, generation=argparse.Namespace(beam=5))
    model.prepare_for_inference_(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    half = build_model("rnn_luong_tiny").half()
    common.fp16 = True  # fairseq-generate already made it fp16: no second conversion
    half.prepare_for_inference_(cfg)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_help_describes_what_bf16_now_does():
    out = run("fairseq-train", "--user-dir", REPO / "fairseq_s2s_attn", "--help").stdout
    flat = " ".join(out.split())
    assert "--bf16 use bfloat16: the model in bf16 with fp32 master weights" in flat
    assert "use bfloat16; implies --tpu" not in flat


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["rnn_bahdanau_tiny", "rnn_luong_tiny", "lstm"])
def test_bf16_train_generate_interactive(arch, small_data_bin, tmp_path):
    extra = (["--encoder-embed-dim", 16, "--decoder-embed-dim", 16, "--encoder-hidden-size", 16,
              "--decoder-hidden-size", 16, "--decoder-out-embed-dim", 16] if arch == "lstm" else [])
    common = ["--optimizer", "adam", "--lr", "0.005", "--max-tokens", 1000, "--max-update", 12,
              "--no-progress-bar", "--cpu", "--seed", 3, "--no-epoch-checkpoints", *extra]
    train = run("fairseq-train", small_data_bin, *USER_DIR, "--arch", arch, *common,
                "--save-dir", tmp_path / "bf16", "--bf16")
    out = train.stdout + train.stderr
    assert "xla_device" not in out and "Traceback" not in out
    assert "num_updates 12" in out
    assert "--bf16 on CPU: bfloat16 model with fp32 master weights" in out
    assert "'tpu': True" not in out.split("--bf16 on CPU")[1]  # no section left on TPU
    train_line = [line for line in out.splitlines() if "| train |" in line][-1]
    assert "loss_scale" not in train_line  # no loss scaling (--fp16 logs loss_scale)

    ckpt = tmp_path / "bf16" / "checkpoint_best.pt"
    gen = run("fairseq-generate", small_data_bin, *USER_DIR, "--path", ckpt, "--beam", 4,
              "--cpu", "--bf16", "--batch-size", 8, *(["--print-alignment"] if arch != "lstm" else []))
    res = parse_generate(gen.stdout)
    assert sorted(res["H"]) == list(range(20))
    assert "BLEU4" in gen.stdout
    inter = run("fairseq-interactive", small_data_bin, *USER_DIR, "--path", ckpt, "--beam", 3,
                "--cpu", "--bf16", input="3 4 5\n6 7\n")
    assert len([line for line in inter.stdout.splitlines() if line.startswith("H-")]) == 2


# --cpu-bf16: the encoder outputs, target embeddings and vanilla's context vector are cast to bf16
# once per sentence (precision.cast_for_products) instead of by autocast at every product
HOIST_VARIANTS = {
    "vanilla": ("rnn_vanilla_tiny", {}),
    "bahdanau-gru-coverage": ("rnn_bahdanau_tiny", dict(rnn_type="gru", coverage=True)),
    "bahdanau-lstm": ("rnn_bahdanau_tiny", dict(rnn_type="lstm", coverage=False)),
    "luong-feed-lstm": ("rnn_luong_tiny", dict(rnn_type="lstm", input_feeding=True)),
    "luong-gru": ("rnn_luong_tiny", dict(rnn_type="gru", input_feeding=False)),
    "luong-local-p-2-layers": ("rnn_luong_tiny", dict(attention_mode="local-p", local_window=2,
                                                      decoder_layers=2, encoder_layers=2)),
}


def _bf16_model(name, hoist, monkeypatch):
    monkeypatch.setattr(precision, "HOIST_CASTS", hoist)
    arch, overrides = HOIST_VARIANTS[name]
    return build_model(arch, seed=5, cpu_bf16=True, init_range=0.3, **overrides)


def _train_and_decode(model, src, prev):
    """Training forward + backward (logits, attention, gradients) and incremental decoding with
    the batch reordered half-way (a row dropped, one repeated): everything a path changes."""
    d = model.decoder.dictionary
    model.train()
    model.zero_grad()
    logits, extra = model(src, src.ne(d.pad()).sum(1), prev)
    logits.float().log_softmax(-1)[..., 4].sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.eval()
    attn = extra["attn"][0]
    return [logits.float()] + ([attn.float()] if attn is not None else []) + grads + _steps(model, src, prev)


def _steps(model, src, prev):
    """Incremental decoding, the batch reordered at step 2 (a row dropped, one repeated)."""
    state, steps = {}, []
    with torch.no_grad():
        enc = model.encoder(src, None)
        for t in range(prev.size(1)):
            if t == 2:
                order = torch.tensor([2, 0, 0, 3])
                model.decoder.reorder_incremental_state_scripting(state, order)
                enc = model.encoder.reorder_encoder_out(enc, order)
                prev = prev.index_select(0, order)
            out, _ = model.decoder(prev[:, :t + 1], enc, incremental_state=state)
            steps.append(out.float())
    return steps


@pytest.mark.parametrize("name", HOIST_VARIANTS)
def test_casts_made_once_give_the_plain_autocast_path_exactly(name, monkeypatch, gen):
    from conftest import random_tokens
    model = _bf16_model(name, True, monkeypatch)
    d = model.decoder.dictionary
    src = random_tokens(d, [7, 4, 6, 2], left_pad=True, generator=gen)
    prev = random_tokens(d, [5, 3, 5, 1], left_pad=False, generator=gen, with_eos=False)
    hoisted = _train_and_decode(model, src, prev)
    monkeypatch.setattr(precision, "HOIST_CASTS", False)
    plain = _train_and_decode(model, src, prev)
    assert len(hoisted) == len(plain)
    for a, b in zip(hoisted, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("hoist", [True, False], ids=["hoisted", "plain"])
def test_beam_steps_do_not_cast_the_encoder_output_again(hoist, monkeypatch, gen):
    """After the first incremental step no step casts the B x S x C encoder output (the plain
    autocast path casts it at every step's context product, as the second case shows)."""
    from conftest import random_tokens
    model = _bf16_model("bahdanau-lstm", hoist, monkeypatch).eval()
    d = model.decoder.dictionary
    src = random_tokens(d, [7, 4, 6, 2], left_pad=True, generator=gen)
    prev = random_tokens(d, [5, 3, 5, 1], left_pad=False, generator=gen, with_eos=False)

    def later_steps():
        for t in range(1, prev.size(1)):
            model.decoder(prev[:, :t + 1], enc, incremental_state=state)

    with torch.no_grad():
        enc = model.encoder(src, None)
        state = {}
        model.decoder(prev[:, :1], enc, incremental_state=state)
        casts = _cast_shapes(later_steps)
    values_shape = tuple(enc["encoder_out"].transpose(0, 1).shape)
    assert (values_shape in casts) is (not hoist), casts


# --cpu-bf16 decoding: prepare_for_inference_ stores the weights that enter only matrix products
# in bf16 (RNNS2SModel.prepare_for_inference_); autocast would cast them to those values anyway
STORED_VARIANTS = {
    **HOIST_VARIANTS,
    "bahdanau-normalized-shared-maxout": ("rnn_bahdanau_tiny", dict(
        rnn_type="gru", attention_normalize=True, share_all_embeddings=True, readout="maxout",
        decoder_init="backward_first")),
    "luong-concat-scaled-tied-bridge": ("rnn_luong_tiny", dict(
        attention="concat", share_decoder_input_output_embed=True, decoder_init="bridge",
        input_feeding=True)),
    "luong-dot-scaled-local-m": ("rnn_luong_tiny", dict(
        attention="dot", attention_scale=True, attention_mode="local-m", local_window=2)),
}


def _inference_cfg():
    """As fairseq-generate --print-alignment: the attention is compared too."""
    return inference_cfg(print_alignment=True)


def _cast_shapes(fn):
    """Shapes of the tensors cast (aten._to_copy) while fn() runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    casts = []

    class CastLog(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                casts.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with CastLog():
        fn()
    return casts


def _decode(model, src, prev):
    """Eval forward over whole targets (logits, attention), incremental decoding with the batch
    reordered half-way, and beam search (tokens, scores, attention)."""
    from fairseq.sequence_generator import SequenceGenerator

    d = model.decoder.dictionary
    lengths = src.ne(d.pad()).sum(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, extra = model(src, lengths, prev)
    outs = [logits.float()] + ([extra["attn"][0].float()] if extra["attn"][0] is not None else [])
    outs += _steps(model, src, prev)
    gen = SequenceGenerator([model], d, beam_size=3, max_len_b=6)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    for hypos in gen.generate([model], sample):
        for h in hypos:
            outs += [h["tokens"].float(), h["positional_scores"].float(), h["score"].float().view(1)]
            if h["attention"] is not None:
                outs.append(h["attention"].float())
    return outs


@pytest.mark.parametrize("name", STORED_VARIANTS)
def test_weights_stored_in_bf16_for_decoding_give_the_same_outputs(name, gen):
    from conftest import random_tokens
    arch, overrides = STORED_VARIANTS[name]
    model = build_model(arch, seed=5, cpu_bf16=True, init_range=0.3, **overrides).eval()
    d = model.decoder.dictionary
    src = random_tokens(d, [7, 4, 6, 2], left_pad=True, generator=gen)
    prev = random_tokens(d, [5, 3, 5, 1], left_pad=False, generator=gen, with_eos=False)
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before = _decode(model, src, prev)
    model.prepare_for_inference_(_inference_cfg())
    stored = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    bytes_ = sum(p.numel() * p.element_size() for p in model.parameters())
    after = _decode(model, src, prev)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the RNNs' weight matrices, the embeddings and the output layer are stored in bf16; the
    # decoder RNN's biases are not (summed in fp32)
    assert {"encoder.rnn.weight_ih_l0", "decoder.rnn.weight_hh_l0", "encoder.embed_tokens.weight"} <= stored
    assert "decoder.rnn.bias_ih_l0" not in stored
    assert bytes_ < 0.6 * fp32_bytes


def test_weights_stay_fp32_without_cpu_bf16_and_for_training():
    model = build_model("rnn_bahdanau_tiny", cpu_bf16=False)
    model.prepare_for_inference_(_inference_cfg())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    bf16 = build_model("rnn_bahdanau_tiny", cpu_bf16=True)
    bf16.train()  # validation and training never call prepare_for_inference_
    bf16(torch.tensor([[5, 6, 2]]), torch.tensor([3]), torch.tensor([[2, 5]]))
    assert {p.dtype for p in bf16.parameters()} == {torch.float32}


def test_stored_weights_are_not_cast_again_while_decoding(gen):
    """With fp32 weights autocast casts every weight matrix (and keeps the copy while its region
    is open); with the stored ones no weight matrix is cast during a beam search."""
    from conftest import random_tokens
    from fairseq.sequence_generator import SequenceGenerator

    model = build_model("rnn_bahdanau_tiny", seed=5, cpu_bf16=True, init_range=0.3).eval()
    d = model.decoder.dictionary
    src = random_tokens(d, [7, 4, 6, 2], left_pad=True, generator=gen)
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)}}
    # weight matrices; the additive score's v (1 x A) stays fp32 (normalised in fp32 when asked)
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2 and p.size(0) > 1}

    def cast_weights():
        search = SequenceGenerator([model], d, beam_size=3, max_len_b=5)
        return [s for s in _cast_shapes(lambda: search.generate([model], sample)) if s in weights]

    assert cast_weights()  # the fp32 model: autocast casts them
    model.prepare_for_inference_(_inference_cfg())
    assert cast_weights() == []


def test_fairseq_generate_and_interactive_store_the_weights_in_bf16(small_data_bin, tmp_path):
    common = ["--user-dir", REPO / "fairseq_s2s_attn", "--cpu"]
    run("fairseq-train", small_data_bin, *common, "--arch", "rnn_bahdanau_tiny", "--cpu-bf16",
        "--optimizer", "adam", "--lr", "0.005", "--max-tokens", 1000, "--max-update", 2,
        "--save-dir", tmp_path, "--no-progress-bar", "--disable-validation")
    ckpt = tmp_path / "checkpoint_last.pt"
    gen = run("fairseq-generate", small_data_bin, *common, "--path", ckpt, "--beam", 3,
              "--batch-size", 8)
    assert "--cpu-bf16: weight matrices stored in bf16 for decoding" in gen.stdout
    from fairseq_s2s_attn import packed
    assert ("weight matrices of the decoder's steps packed for oneDNN" in gen.stdout) is packed.available()
    assert sorted(parse_generate(gen.stdout)["H"]) == list(range(20))
    fp32 = run("fairseq-generate", small_data_bin, *common, "--path", ckpt, "--beam", 3,
               "--batch-size", 8, "--model-overrides", "{'cpu_bf16': False}")
    assert "stored in bf16" not in fp32.stdout
    inter = run("fairseq-interactive", small_data_bin, *common, "--path", ckpt, "--beam", 3,
                input="3 4 5\n6 7\n")
    assert "stored in bf16" in inter.stdout
    assert len([line for line in inter.stdout.splitlines() if line.startswith("H-")]) == 2


def test_stored_weights_go_back_to_fp32_when_the_model_leaves_the_cpu():
    """--cpu-bf16 does nothing off the CPU: a prepared model moved to another device (here
    "meta", as .cuda() would) gets fp32 weights again; the ones that were never stored keep
    theirs, and a model moved within the CPU keeps the bf16 ones."""
    model = build_model("rnn_luong_tiny", cpu_bf16=True).eval()
    model.prepare_for_inference_(_inference_cfg())
    stored = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert stored and model.encoder.rnn_input_dtype is torch.float32
    model.to("cpu")
    assert {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16} == stored
    model.to("meta")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.encoder.rnn_input_dtype is None


def test_encoder_outputs_are_kept_in_bf16_for_decoding_only(monkeypatch, gen):
    """In --cpu-bf16 inference the encoder hands over its outputs in bf16 (the decoder uses them
    in bf16 products only; fairseq's search keeps one copy per hypothesis), its final states in
    the RNN's own dtype; in training the outputs stay as the RNN made them (fp32 here)."""
    from conftest import random_tokens
    model = _bf16_model("bahdanau-gru-coverage", True, monkeypatch)
    src = random_tokens(model.encoder.dictionary, [7, 4, 6, 2], left_pad=True, generator=gen)
    with torch.no_grad():
        out = model.eval().encoder(src, None)
    assert out["encoder_out"].dtype == torch.bfloat16 and out["final_hidden"].dtype == torch.float32
    out = model.train().encoder(src, None)
    assert out["encoder_out"].dtype == torch.float32


@pytest.mark.parametrize("arch", ["rnn_bahdanau_tiny", "rnn_luong_tiny"])
def test_fp16_conversion_of_a_cpu_bf16_model_decodes_in_fp16(arch):
    """fairseq-generate and -interactive --fp16 call model.half() before prepare_for_inference_,
    on a CPU too: bf16 autocast over the fp16 model stopped the first padded batch ("Unexpected
    floating ScalarType in at::autocast::prioritize"), and the weight matrices were then stored
    in bf16 over their fp16 values. Such a model now runs in fp16, as with --cpu-bf16 off."""
    from fairseq.sequence_generator import SequenceGenerator

    from conftest import random_tokens
    results = []
    for cpu_bf16 in (True, False):
        model = build_model(arch, seed=5, cpu_bf16=cpu_bf16, init_range=0.3).eval().half()
        model.prepare_for_inference_(inference_cfg())
        assert {p.dtype for p in model.parameters()} == {torch.float16}
        d = model.decoder.dictionary
        src = random_tokens(d, [7, 4, 6, 2], left_pad=True, generator=torch.Generator().manual_seed(3))
        sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)}}
        search = SequenceGenerator([model], d, beam_size=3, max_len_b=6)
        with torch.no_grad():
            hypos = search.generate([model], sample)
        results.append([(h["tokens"].tolist(), h["score"].item()) for hs in hypos for h in hs])
    assert results[0] == results[1] and len(results[0]) == 12


@pytest.mark.parametrize("name", ["bahdanau-lstm", "luong-feed-lstm", "bahdanau-gru-coverage"])
def test_training_context_products_run_in_fp32(name, monkeypatch, gen):
    """--cpu-bf16 training: the attention context's per-step products run in fp32 over fp32
    values (converted once per batch where the encoder's RNN gave bf16), where autocast ran
    them in bf16 (casting fp32 values at every step); decoding keeps autocast's bf16 products.
    The two training paths agree to bf16 rounding."""
    from conftest import random_tokens
    from fairseq_s2s_attn import attention

    seen = []
    context = attention.context

    def spy(weights, values):
        out = context(weights, values)
        seen.append((values.dtype, out.dtype, torch.is_grad_enabled()))
        return out

    monkeypatch.setattr(attention, "context", spy)
    model = _bf16_model(name, True, monkeypatch)
    d = model.decoder.dictionary
    src = random_tokens(d, [7, 4, 6, 2], left_pad=True, generator=gen)
    prev = random_tokens(d, [5, 3, 5, 1], left_pad=False, generator=gen, with_eos=False)
    fast = _train_and_decode(model, src, prev)
    assert {(v, o) for v, o, grad in seen if grad} == {(torch.float32, torch.float32)}
    assert {o for _, o, grad in seen if not grad} == {torch.bfloat16}
    seen.clear()
    # an encoder output in bf16 (oneDNN's LSTM under autocast at larger sizes) is converted
    enc = model.train().encoder(src, None)
    enc = dict(enc, encoder_out=enc["encoder_out"].bfloat16())
    model.decoder(prev, enc)
    assert {(v, o) for v, o, grad in seen} == {(torch.float32, torch.float32)}
    seen.clear()
    monkeypatch.setattr(attention, "FP32_CONTEXT", False)
    plain = _train_and_decode(model, src, prev)
    assert {o for _, o, grad in seen if grad} == {torch.bfloat16}
    assert len(fast) == len(plain)
    for a, b in zip(fast, plain):
        scale = b.abs().max().clamp_min(1e-3)
        assert (a - b).abs().max() <= 2 ** -4 * scale


def test_row_buckets_are_few_and_close_above_the_rows():
    """padded_rows: at least the rows, at most 1/8 more from 512 rows on (64-row steps below),
    8 buckets per octave; the buckets are fixed points."""
    for n in range(1, 9000):
        p = precision.padded_rows(n)
        assert p >= n and p % precision.MIN_ROW_STEP == 0 and precision.padded_rows(p) == p
        assert p - n < max(precision.MIN_ROW_STEP, n / 8)
    assert len({precision.padded_rows(n) for n in range(1025, 2049)}) == 8
    assert len({precision.padded_rows(n) for n in range(4097, 8193)}) == 8


def _padded_linear_case(gen, rows=19):
    x = torch.randn(2, rows, 24, generator=gen).transpose(0, 1)  # rows x 2 x 24, a view
    w = torch.randn(40, 24, generator=gen)
    b = torch.randn(40, generator=gen)
    return x, w, b


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-tensors"])
def test_padded_rows_linear_gives_each_row_its_own_product(autocast, monkeypatch):
    """bf16 training on a CPU: the product runs over a bucket's rows (zeros appended) and the
    result is sliced back; each row's result and x's gradient equal, bit for bit, the product
    over x's own rows (one 2-D product, the bias added in it), the weight's and bias's gradients
    to rounding (the zero rows add nothing)."""
    seen = []
    linear = torch.nn.functional.linear

    def spy(x, w, b=None):
        seen.append(x.shape[0])
        return linear(x, w, b)

    def run(pad):
        monkeypatch.setattr(precision, "PAD_ROWS", pad)
        x0, w0, b0 = _padded_linear_case(torch.Generator().manual_seed(3))
        if not autocast:
            x0, w0, b0 = x0.bfloat16(), w0.bfloat16(), b0.bfloat16()
        x, w, b = (t.detach().requires_grad_() for t in (x0, w0, b0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if pad:
                out = precision.padded_rows_linear(x, w, b)
            else:  # the same product over x's own 38 rows
                out = spy(x.reshape(-1, x.size(-1)), w, b).view(*x.shape[:-1], -1)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [out, x.grad, w.grad, b.grad]

    monkeypatch.setattr(precision.F, "linear", spy)
    padded, plain = run(True), run(False)
    assert seen == [64, 38]  # 38 rows (19 x 2) padded to 64
    assert padded[0].shape == plain[0].shape == (19, 2, 40)
    assert torch.equal(padded[0], plain[0]) and torch.equal(padded[1], plain[1])
    for a, b in zip(padded[2:], plain[2:]):
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=1e-3)


def test_padded_rows_linear_leaves_fp32_gpus_and_decoding_alone(gen, monkeypatch):
    """No padding where oneDNN compiles nothing per shape or nothing is trained: fp32 products
    (MKL), no autograd (decoding goes through packed.linear), CUDA."""
    seen = []
    monkeypatch.setattr(precision.F, "linear",
                        lambda x, w, b=None: seen.append(x.shape[0]) or torch.matmul(x, w.t()))
    x, w, b = _padded_linear_case(gen)
    precision.padded_rows_linear(x.requires_grad_(), w, b)  # fp32: x itself, 19 x 2 x 24
    assert seen == [19] and not precision.pads_rows(x)
    assert not precision.pads_rows(x.to("meta").bfloat16())  # not a CPU tensor
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert precision.pads_rows(x)
        with torch.no_grad():
            assert not precision.pads_rows(x)
        monkeypatch.setattr(precision, "PAD_ROWS", False)
        assert not precision.pads_rows(x)


class MatmulShapes(TorchDispatchMode):
    """The argument shapes of every 2-D matrix product (mm, addmm) that runs."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in ("mm", "addmm"):
            self.shapes.add(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["bahdanau-lstm", "luong-feed-lstm", "bahdanau-gru-coverage"])
@pytest.mark.parametrize("pad", [True, False], ids=["padded", "plain"])
def test_training_batches_of_other_lengths_meet_the_same_product_shapes(name, pad, monkeypatch, gen):
    """--cpu-bf16 training, forward and backward with fairseq's fused criterion: batches whose
    B x T target positions differ (T 9, 10, 11 at B 4: 36, 40, 44 rows) but share a bucket run
    every 2-D matrix product (over all positions: the first layer's embedding part, the readout,
    the attention keys, the output layer; forward and backward) in the same shapes, which oneDNN
    compiles once; over their own rows each batch meets new ones."""
    from conftest import FakeTask, make_dict, random_tokens
    from fairseq_s2s_attn.criterion import FusedLabelSmoothedCrossEntropyCriterion

    monkeypatch.setattr(precision, "PAD_ROWS", pad)
    arch, overrides = HOIST_VARIANTS[name]
    d = make_dict()
    task = FakeTask(d, d)
    model = build_model(arch, task=task, seed=5, cpu_bf16=True, **overrides).train()
    crit = FusedLabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    src = random_tokens(d, [7, 4, 6, 2], left_pad=True, generator=gen)
    shapes = []
    for t in (9, 10, 11):
        target = random_tokens(d, [t, 3, t - 1, 2], left_pad=False, generator=gen)
        prev = torch.roll(target, 1, 1)
        prev[:, 0] = d.eos()
        sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1),
                                "prev_output_tokens": prev}, "target": target,
                  "ntokens": int(target.ne(d.pad()).sum())}
        with MatmulShapes() as mode:
            loss, _, _ = crit(model, sample)
            loss.backward()
        shapes.append(mode.shapes)
    if pad:
        assert shapes[0] == shapes[1] == shapes[2]
        assert any(64 in s for shape in shapes[0] for s in shape)  # the 64-row bucket
    else:
        assert shapes[0] != shapes[1] != shapes[2]
