"""``--replace-unk`` of fairseq-generate and fairseq-interactive: each ``<unk>`` of a translation
replaced by the source word it attends to most, or by that word's entry in an alignment
dictionary (Luong et al., 2015, "Addressing the Rare Word Problem in Neural Machine
Translation"; Jean et al., 2015), a classic use of an attention model's weights.

fairseq 0.12's option did not work (fairseq issue #3533), in four ways this module fixes:

- ``--replace-unk`` without a file (copy the source word, its documented default) stopped with
  ``@@ : No such file or directory``: argparse's constant for the bare option, ``"@@ "``, was
  opened as the dictionary file (``load_align_dict``). A dictionary line that is not ``SOURCE
  TARGET`` was an IndexError; now one error line names it.
- The alignment fairseq indexed (``alignment[i]``: the source position of output token i) was
  an empty tensor without ``--print-alignment`` (IndexError) and a list of (source, output)
  pairs with it (TypeError). With our attention models the generator now computes fairseq's
  hard alignment (the most attended source token per output token) whenever ``--replace-unk``
  is given, and the replacement reads either form; ``--print-alignment`` prints as before.
- fairseq-interactive took the source words from the dictionary, where an unknown word is
  ``<unk>``: the very words to copy were lost. They now come from the input line as the model
  reads it (after ``--bpe``, split at spaces, as fairseq splits it into tokens).
- The replacement ran after ``--post-process`` had joined sentencepiece pieces into words, so
  output position i was no longer output token i. It now runs on the tokens, then the
  post-processing.

fairseq-interactive's ``--print-alignment soft`` died at its first A- line (it unpacked every
alignment as pairs); it now prints fairseq-generate's rows of weights.

That alignment (``utils.extract_hard_alignment``) is computed in tensor operations, the same
pairs as fairseq's Python loop, which had made ``--print-alignment`` 1.8-1.9x slower.

A model without attention (rnn_vanilla) has no alignment: its ``<unk>`` stay, with a warning.
Other models (fairseq's lstm, transformer) are aligned by fairseq only with --print-alignment: a
warning says so where it is not given.
fairseq-generate reads the source tokens from the raw-text data-bin that fairseq requires for
the option (``fairseq-preprocess --dataset-impl raw``; a binarised one no longer holds the words).
"""
import contextvars
import logging
from typing import List, Optional, Sequence

from .errors import ConfigError
from .patching import replaces
from .runtime import has_attention

logger = logging.getLogger(__name__)

BARE_OPTION = "@@ "  # what argparse gives --replace-unk without a value (fairseq's argparse_const)

# fairseq-interactive: the source tokens (strings) of each row of the batch being translated
_BATCH_SOURCES: contextvars.ContextVar = contextvars.ContextVar("s2s_batch_sources", default=None)


class SourceAlignment(list):
    """A hypothesis's alignment as fairseq made it (a list: (source, output) pairs, or soft
    rows), with the source tokens it indexes, where known."""

    def __init__(self, alignment, source_tokens: Optional[List[str]]):
        super().__init__(alignment)
        self.source_tokens = source_tokens


def load_align_dict_reads_the_bare_option() -> None:
    from fairseq import utils

    @replaces(utils, "load_align_dict")
    def load_align_dict(original, replace_unk):
        """``--replace-unk`` alone: no dictionary, copy the source word (fairseq opened "@@ ")."""
        if replace_unk is None:
            return None
        if replace_unk in (BARE_OPTION, ""):
            return {}
        align_dict = {}
        with open(replace_unk, "r", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                cols = line.split()
                if not cols:
                    continue
                if len(cols) < 2:
                    raise ConfigError(f"--replace-unk {replace_unk}: line {number} is not 'SOURCE "
                                      f"TARGET' (two words), got {line.strip()!r}")
                align_dict[cols[0]] = cols[1]
        return align_dict


def _ours_with_attention(models) -> bool:
    from .model import RNNS2SModel

    return bool(models) and all(isinstance(m, RNNS2SModel) and has_attention(m) for m in models)


def generators_align_for_replace_unk() -> None:
    from fairseq.sequence_generator import SequenceGeneratorWithAlignment
    from fairseq.tasks.fairseq_task import FairseqTask

    @replaces(FairseqTask, "build_generator")
    def build_generator(original, self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        **kwargs):
        """With --replace-unk and our attention models: fairseq's generator with alignment."""
        wanted = getattr(args, "replace_unk", None) is not None
        if wanted and seq_gen_cls is None and not getattr(args, "print_alignment", None):
            if _ours_with_attention(models):
                for model in models:  # prepare_for_inference_ turned it off: no --print-alignment
                    model.decoder.need_attn = True
                seq_gen_cls = SequenceGeneratorWithAlignment
                extra_gen_cls_kwargs = {**(extra_gen_cls_kwargs or {}), "print_alignment": "hard"}
            elif not any(has_attention(m) for m in models):
                logger.warning("--replace-unk: a model without attention (rnn_vanilla) has no "
                               "alignment; its <unk> stay")
            else:  # fairseq's models: its generator aligns only with --print-alignment
                logger.warning("--replace-unk: give --print-alignment too with this model (not "
                               "of fairseq_s2s_attn); without an alignment its <unk> stay")
        generator = original(self, models, args, seq_gen_cls=seq_gen_cls,
                             extra_gen_cls_kwargs=extra_gen_cls_kwargs, **kwargs)
        generator._s2s_replace_unk = wanted
        return generator

    @replaces(FairseqTask, "inference_step")
    def inference_step(original, self, generator, models, sample, *args, **kwargs):
        """Each hypothesis's alignment carries the source tokens it indexes (fairseq-interactive:
        those of the input line)."""
        hypos = original(self, generator, models, sample, *args, **kwargs)
        sources = _BATCH_SOURCES.get()
        if sources is None and getattr(generator, "_s2s_replace_unk", False):
            sources = _dataset_sources(self, sample)
        if getattr(generator, "_s2s_replace_unk", False) and sources is not None:
            for row, source in zip(hypos, sources):
                for hypo in row:
                    alignment = hypo.get("alignment")
                    if isinstance(alignment, list):
                        hypo["alignment"] = SourceAlignment(alignment, source)
        return hypos


def _dataset_sources(task, sample) -> Optional[List[List[str]]]:
    """fairseq-generate: the source tokens of a sample's sentences, from the one raw-text
    dataset loaded (``--dataset-impl raw``), else None."""
    from fairseq.tokenizer import tokenize_line

    loaded = [d for d in getattr(task, "datasets", {}).values()
              if hasattr(getattr(d, "src", None), "get_original_text")]
    ids = sample.get("id") if isinstance(sample, dict) else None
    if len(loaded) != 1 or ids is None:
        return None
    return [tokenize_line(loaded[0].src.get_original_text(i)) for i in ids.tolist()]


def interactive_keeps_the_source_words() -> None:
    from .inputs import _interactive_module

    interactive = _interactive_module()
    if interactive is None or not hasattr(interactive, "make_batches"):
        return

    @replaces(interactive, "make_batches")
    def make_batches(original, lines, cfg, task, max_positions, encode_fn, *args, **kwargs):
        if getattr(getattr(cfg, "generation", None), "replace_unk", None) is None:
            yield from original(lines, cfg, task, max_positions, encode_fn, *args, **kwargs)
            return
        from fairseq.tokenizer import tokenize_line

        tokens = None
        for batch in original(lines, cfg, task, max_positions, encode_fn, *args, **kwargs):
            if tokens is None:  # after fairseq took the constraints off the lines
                tokens = [tokenize_line(encode_fn(line)) for line in lines]
            reset = _BATCH_SOURCES.set([tokens[i] for i in batch.ids.tolist()])
            try:
                yield batch
            finally:
                _BATCH_SOURCES.reset(reset)


def _source_positions(alignment, n_source: int) -> dict:
    """{output position: source position} from a fairseq alignment: (source, output) pairs
    (hard), rows of weights over the source tokens and EOS (soft), or source positions."""
    positions = {}
    for i, entry in enumerate(alignment if alignment is not None else ()):
        if isinstance(entry, (tuple, list)) and len(entry) == 2 and not isinstance(entry[0], str):
            positions[int(entry[1])] = int(entry[0])
        elif isinstance(entry, (tuple, list)) and entry:  # soft: weights as strings
            weights = [float(w) for w in entry[:n_source]]
            if weights:
                positions[i] = max(range(len(weights)), key=weights.__getitem__)
        elif not isinstance(entry, (tuple, list)):
            positions[i] = int(entry)
    return positions


def replace_unks(tokens: Sequence[str], source: Sequence[str], alignment, align_dict, unk: str):
    """``tokens`` with each ``unk`` replaced by its aligned source token, through ``align_dict``
    where that holds the token; an ``unk`` without an aligned source token stays."""
    positions = _source_positions(alignment, len(source))
    out = list(tokens)
    for i, token in enumerate(out):
        j = positions.get(i)
        if token == unk and j is not None and 0 <= j < len(source):
            out[i] = align_dict.get(source[j], source[j])
    return out


def replacement_on_tokens() -> None:
    from fairseq import utils
    from fairseq.data import data_utils
    from fairseq.tokenizer import tokenize_line

    @replaces(utils, "post_process_prediction")
    def post_process_prediction(original, hypo_tokens, src_str, alignment, align_dict, tgt_dict,
                                remove_bpe=None, extra_symbols_to_ignore=None):
        """The replacement on the output tokens, then --post-process (fairseq: the other way)."""
        if align_dict is None:
            return original(hypo_tokens, src_str, alignment, align_dict, tgt_dict, remove_bpe,
                            extra_symbols_to_ignore)
        tokens = tokenize_line(tgt_dict.string(hypo_tokens, None,
                                               extra_symbols_to_ignore=extra_symbols_to_ignore))
        source = getattr(alignment, "source_tokens", None)
        if source is None:
            source = tokenize_line(src_str)
        text = " ".join(replace_unks(tokens, source, alignment, align_dict, tgt_dict.unk_string()))
        hypo_str = data_utils.post_process(text, remove_bpe) if remove_bpe else text
        # as fairseq: the tokens again, for its BLEU (the dictionary may grow)
        return tgt_dict.encode_line(hypo_str, add_if_not_exist=True), hypo_str, alignment


def hard_alignment_in_tensor_ops() -> None:
    """fairseq's ``extract_hard_alignment`` (``--print-alignment``, and ``--replace-unk`` here),
    run once for each of the beam's hypotheses, numbered the tokens in a Python loop over tensor
    elements (``get_token_to_word_mapping``: 0.4 ms a sentence side): a quarter of the
    translation time of the demo's model at beam 5. The same alignment in a few tensor
    operations: the valid tokens' running count numbers them, ties go to the same source token
    (the same ``max``)."""
    import torch
    from fairseq import utils

    @replaces(utils, "extract_hard_alignment")
    def extract_hard_alignment(original, attn, src_sent, tgt_sent, pad, eos):
        src_invalid = (src_sent == pad) | (src_sent == eos)
        tgt_valid = ((tgt_sent != pad) & (tgt_sent != eos)).nonzero(as_tuple=False).squeeze(dim=-1)
        if len(tgt_valid) == 0 or bool(src_invalid.all()):
            return []
        attn_valid = attn[tgt_valid]  # a copy (advanced indexing), as fairseq's
        attn_valid[:, src_invalid] = float("-inf")
        src_indices = attn_valid.max(dim=1)[1]
        src_word = torch.cumsum(~src_invalid, 0) - 1  # fairseq's token_to_word - 1
        tgt_word = torch.cumsum((tgt_sent != pad) & (tgt_sent != eos), 0) - 1
        return list(zip(src_word[src_indices].tolist(), tgt_word[tgt_valid].tolist()))


# fairseq-interactive's A- line: soft rows (lists of weights) as fairseq-generate prints them
SOFT_ALIGNMENT_LINES = {
    '["{}-{}".format(src, tgt) for src, tgt in alignment]':
        '[",".join(a) if isinstance(a, list) else "{}-{}".format(*a) for a in alignment]',
}


def interactive_prints_soft_alignments() -> None:
    """``fairseq-interactive --print-alignment soft`` stopped at the first sentence with
    ``ValueError: too many values to unpack``: it printed every alignment as (source, output)
    pairs, and a soft one is a row of weights over the source tokens per output token. Its A-
    line is now fairseq-generate's: the rows, weights joined by commas; hard ones as before."""
    from .inputs import _interactive_module
    from .patching import innermost, rewrite_lines

    interactive = _interactive_module()
    if interactive is not None and hasattr(interactive, "main"):
        rewrite_lines(innermost(interactive, "main"), SOFT_ALIGNMENT_LINES)


def install() -> None:
    hard_alignment_in_tensor_ops()
    interactive_prints_soft_alignments()
    load_align_dict_reads_the_bare_option()
    generators_align_for_replace_unk()
    interactive_keeps_the_source_words()
    replacement_on_tokens()
