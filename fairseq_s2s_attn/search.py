"""fairseq's beam search steps: the candidates of each sentence from one C loop on a CPU,
diverse beam search on every batch, and no pass over a step's log-probabilities for nothing.

Which fairseq behaviour: ``BeamSearch.step`` (fairseq/search.py), at every step of beam search,
adds each hypothesis's score to its log-probabilities (a new B x beam x V tensor), runs
``torch.topk`` for the 2 beam best of the beam x V values of each sentence, and divides and takes
the remainder of their flat indices (hypothesis, word). On a CPU at batch 16, beam 5 and 5,992
words that step took 640 us of a ~6 ms step of rnn_bahdanau with --cpu-bf16 (torch.topk alone
~600 us; one thread of an AMD EPYC, BENCHMARKS.md 2026-12-07), for fairseq's own models as for
ours. ``native.beam_topk`` does the three in one pass over the values, 16 at a time against the
k-th best so far (the step: 119-126 us): the same values and indices in the same order, except
among exactly equal values, whose order torch.topk leaves open (it depends on its selection
algorithm) and the loop fixes: the lower flat index first, so of two words equally likely the
more frequent one (fairseq's dictionaries are sorted by count). Equal values are not rare with
--cpu-bf16, whose logits are bf16; either order is the same beam search, and a translation can
differ where a tie decides between candidates. Everything else is fairseq's: other devices and
dtypes, a step with a NaN among the values (torch.topk ranks NaN above all), and the other
searches' own steps (sampling, constraints; diverse beam search's groups call this step).
``S2S_NATIVE=0`` or ``native.TOPK = False`` keeps torch.topk.

Also a fairseq bug: ``DiverseBeamSearch.step`` (cumulative diversity, fairseq PR #5069) keeps its
groups' overlap counts with one row per sentence of the batch's first step and indexes them with
``original_batch_idxs``, which fairseq's SequenceGenerator fills with the sentences' dataset ids
(``sample["id"]``): ``fairseq-generate --diverse-beam-groups N`` died with an IndexError (``index
189 is out of bounds for dimension 0 with size 32``) at the first batch holding an id beyond its
size, for fairseq's own models as for ours. ``diverse_beam_search_on_every_batch`` hands it each
sentence's row in the first step's batch instead, which is what its counts are indexed by.

And two lines of fairseq's search that pass over all log-probabilities of a step for nothing
(``search_lines_in_one_pass``). ``SequenceGenerator._generate`` replaces NaN log-probabilities by
-inf with ``lprobs[lprobs != lprobs] = torch.tensor(-math.inf).to(lprobs)``: a comparison into a
B x beam x V mask, then ``masked_fill_``, whose CPU kernel is a scalar loop (on CUDA, also a copy
of the -inf from the host at every step). At batch 16, beam 5 and 5,992 words that line took
~830 us a step on one thread of an AMD EPYC, 14% of a rnn_luong --cpu-bf16 beam pass
(torch.profiler, 2026-12-07); ``torch.nan_to_num_`` with -inf for NaN and the infinities kept
does the same in one vectorised pass (~40 us). ``EnsembleModel.forward_decoder`` divides the
decoder's last logits by the temperature in place, also by 1.0 (fairseq-generate's default),
which leaves every value as it is: the division is skipped there (~80 us a step of bf16 logits).
Both give exactly fairseq's values, for fairseq's models as for ours. fairseq's functions are
long and the change is one line each, so the line is rewritten in place
(``patching.rewrite_lines``) rather than the function copied; where fairseq's line is not found
(another fairseq) the function stays fairseq's.

And a fairseq bug that made ``--no-repeat-ngram-size N`` do nothing unless fairseq's CUDA
extension was built (fairseq issue #5206): ``NGramRepeatBlock._no_repeat_ngram``, its fallback,
compares each earlier (N-1)-gram with the last N-1 entries of the whole token buffer (padding
beyond the current step, never equal) instead of the hypothesis's last N-1 words, so it banned no
word: on a CPU, fairseq-generate's 1,000 demo test translations at beam 5 came out identical with
--no-repeat-ngram-size 2 and without (168 of them repeat a bigram), for fairseq's models as for
ours. ``repeated_ngrams_blocked`` bans, for each hypothesis, every word that would complete an
N-gram the hypothesis already holds, as fairseq's CUDA kernel does (the start token counts as a
word of the history, as there), in a few tensor operations on any device instead of a Python loop
over hypotheses and steps. With N = 1 (no word twice) the start token, which is the end-of-sentence
symbol, is not banned: fairseq's kernel bans it, and no translation could then end before the
length limit; its extension is used for N >= 2 where it is built.

And shallow fusion with a language model (``--lm-path LM --lm-weight W``; Gulcehre et al.,
2015, "On Using Monolingual Corpora in Neural Machine Translation", sec. 4.1): at every step of
beam search fairseq ran the language model over each hypothesis's whole prefix and took the
log-softmax of the whole B x T x V output, of which it uses the last position: each step cost
as much as all the steps before it. The first 200 demo test sentences (beam 5, batches of 32,
a one-layer 64-wide transformer_lm, one thread) took 19.3-19.7 s with it against 1.3-1.4 s
without (3.0-3.1 s with this change). ``lm_steps_incremental`` runs the language model one
token a step with its incremental state (as the translation model runs), reordered with the
hypotheses at every step, where its decoder is one of fairseq's incremental decoders
(transformer_lm, lstm_lm); the log-softmax is taken over the last position only (one line of
``_generate``). The same scores up to rounding
(the cached keys' products round differently; in bf16 under --cpu-bf16's autocast, which
covers the language model too), for fairseq's models as for ours.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from . import native
from .encoder import rows_holding
from .patching import innermost, replaces, rewrite_lines, use_rewritten_lines


def beam_candidates_in_one_loop() -> None:
    from fairseq.search import BeamSearch

    @replaces(BeamSearch, "step")
    def step(original, self, step: int, lprobs: Tensor, scores: Optional[Tensor],
             prev_output_tokens: Optional[Tensor] = None,
             original_batch_idxs: Optional[Tensor] = None, candidate_multiple: int = 2):
        bsz, beam_size, vocab_size = lprobs.size()
        # as fairseq: at the first step all hypotheses are equal, the first one stands for them
        lprobs_used = lprobs[:, :1, :] if step == 0 else lprobs  # B x G x V
        score = None if step == 0 else scores[:, :, step - 1]  # B x G
        if not native.topk_usable(lprobs_used, score):
            return original(self, step, lprobs, scores, prev_output_tokens, original_batch_idxs,
                            candidate_multiple)
        # -1 as fairseq: so that pad is never selected
        k = min(candidate_multiple * beam_size, lprobs_used.size(1) * vocab_size - 1)
        found = native.beam_topk(lprobs_used, score, k)
        if found is None:  # a NaN: torch.topk's ranking
            return original(self, step, lprobs, scores, prev_output_tokens, original_batch_idxs,
                            candidate_multiple)
        values, beams, words = found
        return values, words, beams  # fairseq's order: scores, indices (words), beams


def diverse_beam_search_on_every_batch() -> None:
    from fairseq.search import DiverseBeamSearch

    @replaces(DiverseBeamSearch, "step")
    def step(original, self, step: int, lprobs: Tensor, scores: Optional[Tensor],
             prev_output_tokens: Optional[Tensor] = None,
             original_batch_idxs: Optional[Tensor] = None):
        if original_batch_idxs is not None:
            if step == 0:  # the rows of its overlap counts, made at this step
                self.s2s_first_ids = original_batch_idxs
            first = getattr(self, "s2s_first_ids", None)
            if first is not None:  # each remaining sentence's row at the first step
                original_batch_idxs = rows_holding(original_batch_idxs, first)
        return original(self, step, lprobs, scores, prev_output_tokens, original_batch_idxs)


# (owner, function): {fairseq's line: the plugin's}
SEARCH_LINES = {
    ("SequenceGenerator", "_generate"): {
        "lprobs[lprobs != lprobs] = torch.tensor(-math.inf).to(lprobs)":
            "torch.nan_to_num_(lprobs, nan=-math.inf, posinf=math.inf, neginf=-math.inf)",
        # --lm-path: the language model's log-probabilities of the last position only
        "lm_out, log_probs=True, sample=None":
            "(lm_out[0][:, -1:, :], *lm_out[1:]), log_probs=True, sample=None",
    },
    ("EnsembleModel", "forward_decoder"): {
        "decoder_out[0][:, -1:, :].div_(temperature),":
            "decoder_out[0][:, -1:, :] if temperature == 1.0"
            " else decoder_out[0][:, -1:, :].div_(temperature),",
    },
}


def block_repeated_ngrams(tokens: Tensor, lprobs: Tensor, step: int, n: int) -> Tensor:
    """Sets to -inf the log-probability of each word that would repeat an n-gram of its
    hypothesis: for hypothesis h, the word w is banned at step + 1 where the last n - 1 tokens
    (step - n + 2 .. step) followed by w occur in tokens[h, 0 .. step] (position 0 the start
    token). n = 1 bans every word written so far, not the start token. In place; returns lprobs.

    tokens: BB x L (BB = batch x beam; L >= step + 1), lprobs: BB x V
    """
    starts = step + 2 - n  # the n-grams starting at 0 .. starts - 1 are complete
    if starts <= 0 or n < 1:
        return lprobs
    history = tokens[:, : step + 1]  # BB x (step + 1)
    if n == 1:
        lprobs.scatter_(1, history[:, 1:], -math.inf)  # every word so far
        return lprobs
    windows = history.unfold(1, n - 1, 1)[:, :starts]  # BB x starts x (n - 1)
    last = history[:, starts:]  # BB x (n - 1): the newest n - 1 tokens
    repeats = (windows == last.unsqueeze(1)).all(-1)  # BB x starts
    following = history[:, n - 1:]  # BB x starts: the word after each window
    banned = torch.full(following.shape, math.inf, dtype=lprobs.dtype, device=lprobs.device)
    banned.masked_fill_(repeats, -math.inf)
    # min(lprob, -inf) where some window repeats, lprob where none: duplicates agree, no sync
    return lprobs.scatter_reduce_(1, following, banned, reduce="amin")


def repeated_ngrams_blocked() -> None:
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    @replaces(NGramRepeatBlock, "forward")
    def forward(original, self, tokens: Tensor, lprobs: Tensor, bsz: int, beam_size: int,
                step: int):
        if self.use_extension and self.no_repeat_ngram_size > 1:  # fairseq's CUDA kernel
            return original(self, tokens, lprobs, bsz, beam_size, step)
        if not tokens.size(0) == lprobs.size(0) == bsz * beam_size:
            raise ValueError(f"expected {bsz * beam_size} hypotheses, got {tokens.size(0)} "
                             f"tokens and {lprobs.size(0)} log-probabilities")
        return block_repeated_ngrams(tokens, lprobs, step, self.no_repeat_ngram_size)


class IncrementalLM(torch.nn.Module):
    """What SequenceGenerator calls as ``self.lm_model`` during one search: the language model
    run on the newest token of each hypothesis with its incremental state (the decoders of
    fairseq's language models take the whole prefix and read its last token when given a state)
    and ``reorder`` with the hypotheses' new order, which the search passes to the translation
    models at every step."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.state = {}  # the language model decoder's incremental state

    def forward(self, tokens: Tensor):  # tokens: BB x (step + 1)
        return self.lm(tokens, incremental_state=self.state)  # logits: BB x 1 x V

    def get_normalized_probs(self, *args, **kwargs):
        return self.lm.get_normalized_probs(*args, **kwargs)

    def reorder(self, new_order: Tensor) -> None:
        self.lm.decoder.reorder_incremental_state_scripting(self.state, new_order)


# where the plugin's search runs the language model one token a step (tests: False for fairseq's)
LM_INCREMENTAL = True


def lm_steps_incremental() -> None:
    from fairseq.models import FairseqIncrementalDecoder
    from fairseq.sequence_generator import SequenceGenerator

    @replaces(SequenceGenerator, "_generate")
    def _generate(original, self, *args, **kwargs):
        lm = getattr(self, "lm_model", None)
        if not LM_INCREMENTAL or lm is None or isinstance(lm, IncrementalLM) or \
                not isinstance(getattr(lm, "decoder", None), FairseqIncrementalDecoder):
            return original(self, *args, **kwargs)
        stepped = IncrementalLM(lm)
        models_reorder = self.model.reorder_incremental_state

        def reorder_incremental_state(incremental_states, new_order):
            models_reorder(incremental_states, new_order)
            stepped.reorder(new_order)

        self.lm_model, self.model.reorder_incremental_state = stepped, reorder_incremental_state
        try:
            return original(self, *args, **kwargs)
        finally:
            self.lm_model = lm
            del self.model.reorder_incremental_state  # the class's method again


def _search_functions():
    from fairseq import sequence_generator

    return {key: innermost(getattr(sequence_generator, key[0]), key[1]) for key in SEARCH_LINES}


def search_lines_in_one_pass() -> None:
    """fairseq's NaN scrub as one ``nan_to_num_``, no division by a temperature of 1.0."""
    for key, fn in _search_functions().items():
        rewrite_lines(fn, SEARCH_LINES[key])


def use_search_lines(on: bool) -> None:
    """The plugin's lines (True) or fairseq's own (False), for tests and scripts/beam_ab.py."""
    for fn in _search_functions().values():
        use_rewritten_lines(fn, on)


def install() -> None:
    search_lines_in_one_pass()
    beam_candidates_in_one_loop()
    diverse_beam_search_on_every_batch()
    repeated_ngrams_blocked()
    lm_steps_incremental()
