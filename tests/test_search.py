"""search.py: fairseq's BeamSearch.step with its candidates from native.beam_topk on a CPU,
against fairseq's own step (torch.topk) and in fairseq's SequenceGenerator; fairseq's
DiverseBeamSearch on batches that carry dataset ids; the lines of fairseq's search rewritten
(the NaN scrub, the temperature) against fairseq's own; --no-repeat-ngram-size against its
definition; shallow fusion's language model one token a step against fairseq's whole prefixes."""

import argparse

import pytest
import torch
from fairseq.models.lstm import LSTMModel, base_architecture
from fairseq.search import BeamSearch, DiverseBeamSearch
from fairseq.sequence_generator import SequenceGenerator
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import FakeTask, build_model, make_dict, random_tokens
from fairseq_s2s_attn import native, search
from fairseq_s2s_attn.patching import innermost


@pytest.fixture
def topk_calls(monkeypatch):
    """k of every call of native.beam_topk."""
    seen = []
    monkeypatch.setattr(native, "beam_topk",
                        lambda *a, _f=native.beam_topk: seen.append(a[2]) or _f(*a))
    return seen


def model_and_batch(arch, d):
    """An untrained model (ours or fairseq's lstm, 16 wide) and a batch of 4 padded sources."""
    if arch == "lstm":
        torch.manual_seed(0)
        args = argparse.Namespace(encoder_embed_dim=16, decoder_embed_dim=16,
                                  encoder_hidden_size=16, decoder_hidden_size=16,
                                  decoder_out_embed_dim=16, encoder_layers=1, decoder_layers=1,
                                  dropout=0.0, criterion="cross_entropy")
        base_architecture(args)
        model = LSTMModel.build_model(args, FakeTask(d, d))
    else:
        model = build_model(arch, task=FakeTask(d, d))
    model.eval()
    g = torch.Generator().manual_seed(7)
    lengths = [7, 6, 5, 3]  # decreasing: fairseq's lstm packs the sources
    src = random_tokens(d, lengths, left_pad=True, generator=g)
    return model, {"net_input": {"src_tokens": src, "src_lengths": torch.tensor(lengths)}}


def same_hypotheses(got, want):
    for hyps_a, hyps_b in zip(got, want):
        for a, b in zip(hyps_a, hyps_b):
            assert torch.equal(a["tokens"], b["tokens"])
            torch.testing.assert_close(a["score"], b["score"], rtol=0, atol=0)


def fairseq_step(monkeypatch, *args):
    """What fairseq's own BeamSearch.step returns (the loop off)."""
    with monkeypatch.context() as m:
        m.setattr(native, "TOPK", False)
        return BeamSearch(make_dict()).step(*args)


def test_the_step_is_installed_once():
    """The plugin's import installed the step over fairseq's; installing again changes nothing."""
    step = BeamSearch.step
    assert getattr(step, "_s2s_replacement", "").startswith("fairseq_s2s_attn.search.")
    assert getattr(step.__wrapped__, "_s2s_replacement", None) is None  # fairseq's own below
    search.install()
    assert BeamSearch.step is step


@pytest.mark.parametrize("step", [0, 3])
@pytest.mark.parametrize("beam", [1, 5])
def test_the_step_returns_fairseqs_candidates(step, beam, topk_calls, monkeypatch):
    """scores, words and hypotheses of 2 beam candidates per sentence, as fairseq's step with
    torch.topk (values without ties: the same order); the first step reads the first
    hypothesis of each sentence only."""
    g = torch.Generator().manual_seed(beam + step)
    B, V = 3, 41
    lprobs = torch.log_softmax(torch.randn(B * beam, V, generator=g) * 3, -1).view(B, beam, V)
    scores = (torch.randn(B * beam, 6, generator=g) - 3).view(B, beam, -1)[:, :, :step]
    got = BeamSearch(make_dict()).step(step, lprobs, scores)
    assert topk_calls == [2 * beam]
    want = fairseq_step(monkeypatch, step, lprobs, scores)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_step_leaves_nan_other_dtypes_and_the_loop_off_to_torch(topk_calls, monkeypatch):
    """A NaN among the values: the loop stops and fairseq's step (torch.topk, NaN first) gives
    the result; fp64 values and native.TOPK off never reach the loop."""
    B, beam, V = 2, 3, 17
    lprobs = torch.log_softmax(torch.randn(B, beam, V), -1)
    scores = torch.randn(B, beam, 2)
    nan = lprobs.clone()
    nan[1, 2, 4] = float("nan")
    got = BeamSearch(make_dict()).step(1, nan, scores)
    assert topk_calls == [6]  # tried, found the NaN, handed over
    want = fairseq_step(monkeypatch, 1, nan, scores)
    assert got[0][1, 0].isnan()  # torch.topk's NaN first
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    BeamSearch(make_dict()).step(1, lprobs.double(), scores.double())
    monkeypatch.setattr(native, "TOPK", False)
    BeamSearch(make_dict()).step(1, lprobs, scores)
    assert topk_calls == [6]


@pytest.mark.parametrize("arch,diverse", [("rnn_bahdanau_tiny", False), ("lstm", False),
                                          ("rnn_luong_tiny", True)])
def test_beam_search_translates_the_same_with_the_loop(arch, diverse, topk_calls, monkeypatch):
    """fairseq's SequenceGenerator at beam 4 over a batch of padded sources gives the same
    hypotheses and scores with the loop as with torch.topk, for our models and fairseq's lstm,
    and with diverse beam search (2 groups, each through this step, the second with its
    diversity penalty)."""
    d = make_dict(20)
    model, sample = model_and_batch(arch, d)
    strategy = DiverseBeamSearch(d, num_groups=2, diversity_strength=0.5) if diverse else None
    gen = SequenceGenerator([model], d, beam_size=4, max_len_b=9, search_strategy=strategy)
    with torch.no_grad():
        got = gen.generate([model], sample)
        assert topk_calls and set(topk_calls) == {2 if diverse else 8}
        n = len(topk_calls)
        monkeypatch.setattr(native, "TOPK", False)
        want = gen.generate([model], sample)
    assert len(topk_calls) == n
    same_hypotheses(got, want)


def test_diverse_beam_search_takes_sentences_with_dataset_ids():
    """fairseq-generate's batches carry the sentences' dataset ids (sample["id"]); fairseq's
    DiverseBeamSearch indexed its per-sentence overlap counts with them and died with an
    IndexError for any id beyond the batch size. Now a batch with ids translates as the same
    batch without (fairseq then numbers the sentences 0..B-1), also after a sentence finished
    and left the batch."""
    d = make_dict(20)
    model = build_model("rnn_bahdanau_tiny", task=FakeTask(d, d)).eval()
    with torch.no_grad():  # EOS likelier: sentences finish at different steps
        model.decoder.fc_out.bias[d.eos()] += 3.0
    g = torch.Generator().manual_seed(11)
    lengths = [7, 6, 5, 3]
    src = random_tokens(d, lengths, left_pad=True, generator=g)
    plain = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor(lengths)}}
    with_ids = dict(plain, id=torch.tensor([10, 3, 57, 25]))
    strategy = DiverseBeamSearch(d, num_groups=2, diversity_strength=0.5)
    rows = []  # sentences in the batch at each step
    strategy.step = lambda *a, _f=strategy.step: rows.append(a[1].size(0)) or _f(*a)
    gen = SequenceGenerator([model], d, beam_size=4, max_len_b=12, min_len=2,
                            search_strategy=strategy)
    with torch.no_grad():
        want = gen.generate([model], plain)
        got = gen.generate([model], with_ids)
    assert rows[0] == 4 and min(rows) < 4  # the batch shrank
    for hyps_a, hyps_b in zip(got, want):
        for a, b in zip(hyps_a, hyps_b):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["score"], b["score"])


@pytest.fixture
def fairseq_lines():
    """fairseq's own lines of search while the test asks (search.use_search_lines(False))."""
    yield lambda: search.use_search_lines(False)
    search.use_search_lines(True)


class FullStepOps(TorchDispatchMode):
    """The element-wise ops of a beam search over whole B*beam x V log-probabilities or
    logits: fairseq's NaN scrub (ne, then masked_fill_ or index_put_) and its division by the
    temperature (div_); nan_to_num_ is the plugin's scrub."""

    def __init__(self, rows, vocab):
        super().__init__()
        self.shape, self.seen = (rows, vocab), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if (name in ("ne", "masked_fill_", "index_put_", "div_", "nan_to_num_")
                and args[0].shape[0] == self.shape[0] and args[0].shape[-1] == self.shape[1]):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_fairseqs_nan_scrub_and_temperature_one_pass_no_more(fairseq_lines):
    """The plugin's import rewrote two lines of fairseq's search (the functions are fairseq's,
    in fairseq's file): at each step of a beam search the NaN scrub of all log-probabilities is
    one nan_to_num_, where fairseq's line compares them with themselves and fills through the
    mask, and a temperature of 1 divides nothing (fairseq's line: every logit by 1.0)."""
    from fairseq import sequence_generator

    for owner, name in search.SEARCH_LINES:
        fn = innermost(getattr(sequence_generator, owner), name)
        assert fn.__code__.co_filename == sequence_generator.__file__
    assert "nan_to_num_" in innermost(SequenceGenerator, "_generate").__code__.co_names
    search.install()  # again: nothing changes
    d = make_dict(20)
    model, sample = model_and_batch("rnn_luong_tiny", d)
    gen = SequenceGenerator([model], d, beam_size=4, max_len_b=9, min_len=9)
    steps = 10  # 9 words and EOS, every hypothesis as long
    with torch.no_grad():
        with FullStepOps(4 * 4, len(d)) as ops:
            gen.generate([model], sample)
        assert ops.seen == ["nan_to_num_"] * steps
        fairseq_lines()
        with FullStepOps(4 * 4, len(d)) as ops:
            gen.generate([model], sample)
        assert ops.seen.count("div_") == steps and ops.seen.count("ne") == steps
        assert "nan_to_num_" not in ops.seen


@pytest.mark.parametrize("arch", ["rnn_bahdanau_tiny", "lstm"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_beam_search_translates_the_same_with_the_plugins_lines(arch, temperature,
                                                                fairseq_lines):
    """The same hypotheses and scores with the plugin's lines as with fairseq's, for our models
    and fairseq's lstm, at a temperature of 1 and another, where a word's log-probabilities are
    NaN at every step (both scrubs make them -inf: the word is never chosen) and where one
    hypothesis's whole row is NaN at one step."""
    d = make_dict(20)
    model, sample = model_and_batch(arch, d)
    word = d.nspecial + 3
    calls = []

    def with_nans(net_output, log_probs, sample=None, _f=model.get_normalized_probs):
        lprobs = _f(net_output, log_probs, sample)
        lprobs[..., word] = float("nan")
        calls.append(None)
        if len(calls) == 3:
            lprobs[1] = float("nan")
        return lprobs

    model.get_normalized_probs = with_nans
    gen = SequenceGenerator([model], d, beam_size=4, max_len_b=9, temperature=temperature)
    with torch.no_grad():
        got = gen.generate([model], sample)
        assert not any((h["tokens"] == word).any() for hyps in got for h in hyps)
        calls.clear()
        fairseq_lines()
        want = gen.generate([model], sample)
    same_hypotheses(got, want)


def banned_by_definition(history, n):
    """The words the hypothesis `history` (start token first) may not write next."""
    if n == 1:
        return set(history[1:])
    last = history[len(history) - n + 1:]
    return {history[i + n - 1] for i in range(len(history) - n + 1)
            if history[i:i + n - 1] == last}


def banned_positions(lprobs):
    return [set(torch.nonzero(row == float("-inf")).flatten().tolist()) for row in lprobs]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_ngrams_are_banned_as_defined(n, dtype):
    """--no-repeat-ngram-size n: each hypothesis's next word may not complete an n-gram it
    already holds (n = 1: no word twice, the start token aside), at every step, with the rest of
    the token buffer padding; the other log-probabilities stay as they were."""
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    g = torch.Generator().manual_seed(n)
    BB, L, V = 12, 14, 9  # few words: many repeats
    block = NGramRepeatBlock(n, use_extension=False)
    for step in range(L - 1):
        tokens = torch.full((BB, L), 1, dtype=torch.long)  # pad beyond the step
        tokens[:, 0] = 2  # the start token (eos)
        tokens[:, 1:step + 1] = torch.randint(4, V, (BB, step), generator=g)
        lprobs = torch.log_softmax(torch.randn(BB, V, generator=g), -1).to(dtype)
        got = block(tokens, lprobs.clone(), BB // 3, 3, step)
        want = [banned_by_definition(row[:step + 1].tolist(), n) for row in tokens]
        assert banned_positions(got) == want
        kept = got != float("-inf")
        assert torch.equal(got[kept], lprobs[kept])
        assert 2 not in set().union(*want)  # the end of sentence stays possible
    assert any(want)  # the test bans something


def test_fairseqs_own_fallback_banned_nothing():
    """fairseq's NGramRepeatBlock without its CUDA extension (fairseq issue #5206) compared the
    earlier (n-1)-grams with the buffer's padding: a hypothesis repeating a bigram was free to
    repeat it again. The plugin's replacement bans it."""
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    tokens = torch.tensor([[2, 5, 6, 7, 5, 1, 1, 1]])  # "5 6" written; the last word is 5
    lprobs = torch.zeros(1, 9)
    block = NGramRepeatBlock(2, use_extension=False)
    assert banned_positions(block(tokens, lprobs.clone(), 1, 1, 4)) == [{6}]
    fairseqs = innermost(NGramRepeatBlock, "forward")
    assert banned_positions(fairseqs(block, tokens, lprobs.clone(), 1, 1, 4)) == [set()]


def test_fairseqs_cuda_kernel_stays_where_it_is_built(monkeypatch):
    """Where fairseq's CUDA extension is built it bans n-grams of 2 and more; n = 1 (which its
    kernel would apply to the start token, the end of sentence) is the plugin's."""
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    calls = []
    tokens, lprobs = torch.tensor([[2, 5, 5, 1]]), torch.zeros(1, 9)
    for n in (1, 2):
        block = NGramRepeatBlock(n, use_extension=False)
        block.use_extension = True
        monkeypatch.setattr(block, "call_cuda_extension",
                            lambda *a, _n=n: calls.append(_n) or a[1])
        block(tokens, lprobs.clone(), 1, 1, 2)
    assert calls == [2]


def repeating(hypos, n):
    """How many hypotheses hold some n-gram twice."""
    count = 0
    for hyps in hypos:
        for h in hyps:
            t = h["tokens"].tolist()
            grams = [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
            count += len(set(grams)) < len(grams)
    return count


@pytest.mark.parametrize("arch", ["rnn_bahdanau_tiny", "lstm"])
def test_beam_search_writes_no_ngram_twice(arch, monkeypatch):
    """fairseq's SequenceGenerator with no_repeat_ngram_size 2 on a CPU: no hypothesis holds a
    bigram twice, where without it (and with fairseq's own fallback) they do; with 1 no word
    twice, and the hypotheses still end (eos) before the length limit."""
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    d = make_dict(20)
    model, sample = model_and_batch(arch, d)
    with torch.no_grad():
        def generate(n):
            gen = SequenceGenerator([model], d, beam_size=4, max_len_b=30, min_len=2,
                                    no_repeat_ngram_size=n)
            return gen.generate([model], sample)

        assert repeating(generate(0), 2) > 0
        assert repeating(generate(2), 2) == 0
        ones = generate(1)
        assert repeating(ones, 1) == 0  # eos once, at the end
        assert all(h["tokens"][-1] == d.eos() and len(h["tokens"]) < 30 for hs in ones for h in hs)
        monkeypatch.setattr(NGramRepeatBlock, "forward", innermost(NGramRepeatBlock, "forward"))
        assert repeating(generate(2), 2) > 0


def language_model(kind, d):
    """An untrained fairseq language model over d (16 wide): transformer_lm or lstm_lm."""
    torch.manual_seed(5)
    if kind == "transformer_lm":
        from fairseq.models.transformer_lm import TransformerLanguageModel, base_lm_architecture
        args = argparse.Namespace(decoder_layers=2, decoder_embed_dim=16, decoder_ffn_embed_dim=32,
                                  decoder_attention_heads=2, dropout=0.0, tokens_per_sample=64)
        base_lm_architecture(args)
        return TransformerLanguageModel.build_model(args, FakeTask(d, d)).eval()
    from fairseq.models.lstm_lm import LSTMLanguageModel, base_architecture as lstm_lm_arch
    args = argparse.Namespace(decoder_embed_dim=16, decoder_hidden_size=16,
                              decoder_out_embed_dim=16, decoder_layers=1, dropout=0.0,
                              tokens_per_sample=64, criterion="cross_entropy")
    lstm_lm_arch(args)
    task = FakeTask(d, d)
    task.dictionary = d
    return LSTMLanguageModel.build_model(args, task).eval()


EOS_BIAS = {"rnn_bahdanau_tiny": 2.0, "lstm": 0.2}  # hypotheses of several lengths


@pytest.mark.parametrize("kind", ["transformer_lm", "lstm_lm"])
@pytest.mark.parametrize("arch", ["rnn_bahdanau_tiny", "lstm"])
def test_shallow_fusion_runs_the_language_model_a_token_a_step(kind, arch, monkeypatch):
    """--lm-path: the language model runs on one new token per hypothesis and step with its
    incremental state, reordered with the hypotheses (sentences finish at different steps), and
    the search gives fairseq's hypotheses, which ran it over every whole prefix, with the same
    scores up to rounding; the generator and the ensemble are left as they were."""
    d = make_dict(20)
    model, sample = model_and_batch(arch, d)
    with torch.no_grad():  # EOS likelier: sentences finish at different steps
        model.decoder.fc_out.bias[d.eos()] += EOS_BIAS[arch]
    lm = language_model(kind, d)
    widths = []
    lm.decoder.register_forward_pre_hook(lambda m, a, k: widths.append(
        (a[0].size(1), k.get("incremental_state") is not None)), with_kwargs=True)
    gen = SequenceGenerator([model], d, beam_size=4, max_len_b=12, lm_model=lm, lm_weight=0.5)
    with torch.no_grad():
        got = gen.generate([model], sample)
        steps = len(widths)
        assert steps >= 3 and all(stepped for _, stepped in widths)
        assert [w for w, _ in widths] == list(range(1, steps + 1))  # the prefix; one token read
        assert gen.lm_model is lm and "reorder_incremental_state" not in vars(gen.model)
        monkeypatch.setattr(search, "LM_INCREMENTAL", False)
        search.use_search_lines(False)
        try:
            want = gen.generate([model], sample)
        finally:
            search.use_search_lines(True)
    assert not any(stepped for _, stepped in widths[steps:])  # fairseq's: whole prefixes
    lengths = {len(h["tokens"]) for hyps in got for h in hyps}
    assert len(lengths) > 1
    for hyps_a, hyps_b in zip(got, want):
        for a, b in zip(hyps_a, hyps_b):
            assert torch.equal(a["tokens"], b["tokens"])
            torch.testing.assert_close(a["positional_scores"], b["positional_scores"],
                                       rtol=0, atol=1e-5)
