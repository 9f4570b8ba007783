"""Defined behaviour for source sentences a model cannot translate as given.

- Empty source lines (nothing but end-of-sentence, e.g. a blank line in fairseq-interactive or
  an empty line of a test set) translate to an empty hypothesis (score 0), and one warning is
  logged. Decoded from an empty encoding the model would otherwise write made-up words, and
  skipping the line would shift every later output line against its input. One hypothesis per
  input is kept, with the line's id, so outputs stay aligned with inputs.
  This applies to ensembles of ``rnn_s2s`` models; other fairseq models are left alone.
- Sources longer than the limit (``--max-source-positions`` of the task, and of the model's
  training options): fairseq stops with ``Size of sample #N is invalid`` and a traceback. We
  keep its choices and say them in one ``error:`` line: ``--skip-invalid-size-inputs-valid-test``
  skips such sentences (fairseq logs how many, and their ids; they get no output line), and for
  binarized data ``--truncate-source`` cuts sources to the limit (not offered in
  fairseq-interactive, where it does nothing). Nothing is truncated or skipped unless asked for.
- Input that is not UTF-8 text (fairseq-interactive): one error naming the line, not a traceback.
- Text given to a model of sentencepiece pieces without ``--bpe sentencepiece``
  (fairseq-interactive) or ``spm_model`` (the hub): one error line, not ``<unk>``s translated.
- A sentencepiece model the source side was not encoded with (fairseq-interactive, the hub):
  one error line, not ``<unk>``s translated without a word.
- ``--tokenizer moses`` without ``--source-lang``/``--target-lang``: the tokenizer takes the
  data-bin's language pair, as the task does (fairseq: a hydra traceback before any input).
- A data folder that is missing or holds no dictionaries, training or validating without
  --max-tokens/--batch-size, and a --beam or --nbest below 1: one error line each (fairseq:
  tracebacks).
"""

import contextvars
import glob
import logging
import os
import sys

import numpy as np
import torch

from .errors import ConfigError, S2SError
from .patching import replaces
from .runtime import command_module, running_fairseq_command

logger = logging.getLogger(__name__)


class InputError(S2SError, ValueError):
    """Input a model cannot handle as given (reported as one ``error:`` line)."""


def _all_rnn_s2s(generator) -> bool:
    from .model import RNNS2SModel

    models = getattr(getattr(generator, "model", None), "models", None)
    return bool(models) and all(isinstance(m, RNNS2SModel) for m in models)


def _empty_hypothesis(eos: int, src_len: int, like: torch.Tensor):
    return {
        "tokens": torch.tensor([eos], dtype=torch.long, device=like.device),
        "score": torch.tensor(0.0, device=like.device),
        "attention": torch.zeros(src_len, 1, device=like.device),  # src_len x tgt_len
        "alignment": torch.empty(0),
        "positional_scores": torch.zeros(1, device=like.device),
    }


def _select_rows(sample, rows: torch.Tensor, bsz: int):
    """The sample restricted to some sentences (every tensor whose first dimension is the batch)."""

    def pick(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == bsz:
            return value.index_select(0, rows.to(value.device))
        if isinstance(value, dict):
            return {k: pick(v) for k, v in value.items()}
        return value

    return pick(sample)


def empty_sources_translate_to_empty() -> None:
    """fairseq's beam search decodes an empty source (a blank line of fairseq-interactive, an
    empty line of a test set) like any other, and our models then wrote made-up words for it;
    now such rows get the empty hypothesis (score 0, one per beam slot) and the other rows of
    the batch are decoded as without them, with their --prefix-size prefixes. Only for
    ensembles of rnn_s2s models (see the module's docstring)."""
    from fairseq.sequence_generator import SequenceGenerator

    @replaces(SequenceGenerator, "_generate")
    def _generate(original, self, sample, prefix_tokens=None, constraints=None, bos_token=None):
        src = sample.get("net_input", {}).get("src_tokens")
        if src is None or src.dim() != 2 or not _all_rnn_s2s(self):
            return original(self, sample, prefix_tokens=prefix_tokens, constraints=constraints,
                            bos_token=bos_token)
        empty = (src.ne(self.pad) & src.ne(self.eos)).sum(dim=1).eq(0)
        if not bool(empty.any()):
            return original(self, sample, prefix_tokens=prefix_tokens, constraints=constraints,
                            bos_token=bos_token)
        if not getattr(self, "_s2s_warned_empty", False):
            logger.warning("empty source sentence(s): translated to empty output")
            self._s2s_warned_empty = True
        bsz = src.size(0)
        finalized = [None] * bsz
        keep = (~empty).nonzero().squeeze(1)
        if keep.numel() > 0:
            sub = _select_rows(sample, keep, bsz)
            sub_prefix = None if prefix_tokens is None else prefix_tokens.index_select(0, keep)
            sub_constraints = None if constraints is None else constraints.index_select(0, keep)
            done = original(self, sub, prefix_tokens=sub_prefix, constraints=sub_constraints,
                            bos_token=bos_token)
            for j, i in enumerate(keep.tolist()):
                finalized[i] = done[j]
        for i in empty.nonzero().squeeze(1).tolist():
            # as many hypotheses as the beam gives, which SequenceGeneratorWithAlignment expects
            finalized[i] = [_empty_hypothesis(self.eos, src.size(1), src) for _ in range(self.beam_size)]
        return finalized


def clear_error_for_long_sources() -> None:
    """fairseq stops at a source longer than the limit with ``Exception: Size of sample #N is
    invalid`` and a traceback; the same stop is now one error line naming the sizes, the limit
    and fairseq's own options for such sentences (see the module's docstring); for a language
    model's samples (one size each, e.g. ``--lm-path``'s model in training) its own options."""
    from fairseq.tasks.fairseq_task import FairseqTask

    @replaces(FairseqTask, "filter_indices_by_size")
    def filter_indices_by_size(original, self, indices, dataset, max_positions=None,
                               ignore_invalid_inputs=False):
        try:
            return original(self, indices, dataset, max_positions=max_positions,
                            ignore_invalid_inputs=ignore_invalid_inputs)
        except Exception as e:
            if ignore_invalid_inputs or not str(e).startswith("Size of sample #"):
                raise
        _, ignored = dataset.filter_indices_by_size(indices, max_positions)
        size = dataset.size(int(ignored[0]))
        if np.ndim(size) == 0 and np.ndim(max_positions) == 0:  # a language model's samples
            raise InputError(
                f"{len(ignored)} sample(s) longer than the limit: the first has {int(size)} "
                f"tokens, the limit is {max_positions} (--tokens-per-sample, and the model's "
                "--max-target-positions). Add --skip-invalid-size-inputs-valid-test to skip them "
                "(with a warning)") from None
        # --truncate-source acts where the task loads binarized data; fairseq-interactive's
        # lines never pass there, so it is not offered to them
        truncate = ("" if running_fairseq_command("interactive")
                    else ", or --truncate-source to cut binarized sources to the limit")
        raise InputError(
            f"{len(ignored)} input sentence(s) longer than the limit: the first has "
            f"{_describe(size)} tokens (counting </s>), the limit is "
            f"{_describe(max_positions)} (--max-source-positions/--max-target-positions, and the "
            f"model's own). Add --skip-invalid-size-inputs-valid-test to skip them (with a "
            f"warning){truncate}"
        ) from None


def _describe(size) -> str:
    """(source, target) sizes or limits as words."""
    if isinstance(size, (int, float)) or size is None:
        return f"{size} source"
    parts = [f"{'-' if n is None else int(n)} {side}" for n, side in zip(size, ("source", "target"))]
    return " / ".join(parts)


def _interactive_module():
    """fairseq_cli.interactive where this process runs fairseq-interactive, else None."""
    return command_module("interactive")


def utf8_input_lines() -> None:
    """fairseq-interactive reads its input as UTF-8: a file with other bytes stopped with a
    UnicodeDecodeError traceback, and standard input (decoded with surrogate escapes) with one
    from sentencepiece ("Unable to cast Python instance of type <class 'str'>"). Now one error
    names the line; the lines before it are translated as usual. Installed only in a process
    running fairseq-interactive (importing fairseq_cli.interactive elsewhere would make every
    process look like one to ``runtime.running_fairseq_command``)."""
    interactive = _interactive_module()
    if interactive is None or not hasattr(interactive, "buffered_read"):
        return

    @replaces(interactive, "buffered_read")
    def buffered_read(original, input, buffer_size):
        name = "standard input" if input == "-" else input
        done, buffers = 0, original(input, buffer_size)
        while True:
            try:
                buffer = next(buffers)
            except StopIteration:
                return
            except UnicodeDecodeError:
                line = _first_non_utf8_line(input) if input != "-" else None
                where = f"line {line}" if line else f"a line after line {done}"
                raise InputError(f"{name}: {where} is not UTF-8 text") from None
            for i, line in enumerate(buffer):
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError:  # bytes that stdin's decoder kept as surrogates
                    raise InputError(f"{name}: line {done + i + 1} is not UTF-8 text") from None
            done += len(buffer)
            yield buffer


# sentencepiece's word-boundary mark, which begins every piece that begins a word
WORD_START = "\u2581"


def holds_pieces(dictionary) -> bool:
    """Whether a fairseq dictionary holds sentencepiece pieces: at least a tenth of its types
    begin a word (the demo's joined dictionary: 3,574 of its 5,988 types; a dictionary of words
    or of subword-nmt units: none)."""
    types = dictionary.symbols[dictionary.nspecial:]
    return bool(types) and sum(t.startswith(WORD_START) for t in types) >= 0.1 * len(types)


def is_text_not_pieces(line: str) -> bool:
    """A line of words, not of sentencepiece pieces: sentencepiece begins every encoded sentence
    with a word-start piece (\u2581...), which typed or copied text does not hold."""
    words = line.split()
    return bool(words) and not words[0].startswith(WORD_START)


def is_pieces(line: str) -> bool:
    """A line already encoded by sentencepiece (its first word a word-start piece)."""
    words = line.split()
    return bool(words) and words[0].startswith(WORD_START)


def text_for_a_pieces_model_is_an_error() -> None:
    """fairseq-interactive without ``--bpe sentencepiece`` reads each input line as the pieces of
    the data-bin's dictionary. Given text for a model of sentencepiece pieces (prepare_data's),
    most words were ``<unk>`` or word-inner pieces ("Open the file" read as ``<unk> <unk> file``:
    "Open" and "the" are types only as the word-start pieces ``\u2581Open``, ``\u2581the``) and it
    translated that without a word (the demo's model: "Profiling-Datei"). Now a line of text (no
    word-start piece first) for such a dictionary without --bpe is one error line naming the
    line and the options to give; lines already encoded (spm_encode's output) translate as
    before. The other way round, pieces given with ``--bpe sentencepiece`` were encoded again
    ("\u2581Open \u2581the \u2581file": "Die Profiling-Datei" instead of "Datei"): one error line too.
    The lines before it are translated, as with input that is not UTF-8."""
    interactive = _interactive_module()
    if interactive is None or not hasattr(interactive, "make_batches"):
        return
    # the lines make_batches was given so far, in order; whether the source dictionary holds
    # pieces, read once (a pass over its ~6k types took 0.8 ms, called for every buffer of lines)
    read = {"lines": 0, "pieces": {}}

    @replaces(interactive, "make_batches")
    def make_batches(original, lines, cfg, task, *args, **kwargs):
        first, read["lines"] = read["lines"], read["lines"] + len(lines)
        bpe = getattr(getattr(cfg, "bpe", None), "_name", None)
        pieces = read["pieces"]  # by the dictionary's id (fairseq's Dictionary is not hashable)
        if id(task.source_dictionary) not in pieces:
            pieces[id(task.source_dictionary)] = holds_pieces(task.source_dictionary)
        wrong, advice = None, None
        if bpe is None and pieces[id(task.source_dictionary)]:
            wrong, advice = is_text_not_pieces, (
                "is text, but the model reads sentencepiece pieces (its dictionary's): give --bpe "
                "sentencepiece --sentencepiece-model SPM (the model the data-bin was made with, "
                "prepare_data: <work>/spm/spm.model), or input encoded with spm_encode")
        elif bpe == "sentencepiece":
            wrong, advice = is_pieces, (
                "is in sentencepiece pieces already (it begins with \u2581), and --bpe "
                "sentencepiece would encode them again: give text, or leave out --bpe")
        constraints = getattr(getattr(cfg, "generation", None), "constraints", None)
        for i, line in enumerate(lines if wrong is not None else ()):
            if wrong(line.split("\t")[0] if constraints else line):
                source = getattr(getattr(cfg, "interactive", None), "input", "-")
                name = "standard input" if source == "-" else source
                raise InputError(f"{name}: line {first + i + 1} {advice}")
        return original(lines, cfg, task, *args, **kwargs)


def target_dictionary_holds_pieces(cfg) -> bool:
    """Whether the target dictionary of fairseq-generate's data-bin (the first of --data's
    paths; the pair as given or as fairseq infers it from the file names) holds sentencepiece
    pieces; False where it cannot be read (fairseq then says why)."""
    from fairseq import utils
    from fairseq.data import Dictionary, data_utils

    task = getattr(cfg, "task", None)
    paths = utils.split_paths(getattr(task, "data", None) or "")
    if not paths:
        return False
    try:
        target = getattr(task, "target_lang", None)
        if target is None:
            target = data_utils.infer_language_pair(paths[0])[1]
        path = os.path.join(paths[0], f"dict.{target}.txt")
        return target is not None and os.path.isfile(path) and holds_pieces(Dictionary.load(path))
    except Exception:  # no such folder, an unreadable dictionary: fairseq's task setup says why
        return False


def pieces_output_warns() -> None:
    """fairseq-generate without ``--post-process sentencepiece`` (or ``--bpe sentencepiece``)
    on a data-bin of sentencepiece pieces writes its H- and D- lines in pieces ("▁Öffne n ▁Sie"),
    and its final BLEU4 is then over pieces, higher than over words (fairseq warns about that only
    where --bpe is given). A user scoring ``grep ^D-`` with sacrebleu against the text references
    got a number that means nothing. Now a warning on stderr (visible when the output goes to a
    file) says how to get text; the output stays as fairseq writes it."""
    generate = command_module("generate")
    if generate is None or command_module("interactive") is not None or \
            not hasattr(generate, "_main"):
        return

    @replaces(generate, "_main")
    def _main(original, cfg, output_file):
        common_eval = getattr(cfg, "common_eval", None)
        if getattr(common_eval, "post_process", None) is None and \
                getattr(getattr(cfg, "bpe", None), "_name", None) is None and \
                target_dictionary_holds_pieces(cfg):
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq-generate"
            print(f"{prog}: warning: the data-bin's target dictionary holds sentencepiece pieces "
                  "and neither --post-process nor --bpe is given: the H- and D- lines will be "
                  "pieces, and BLEU4 is over pieces; --post-process sentencepiece writes text",
                  file=sys.stderr)
        return original(cfg, output_file)


def _first_non_utf8_line(path: str):
    """The number of the first line of the file that is not UTF-8, or None."""
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return number
    except OSError:
        return None
    return None


def checked_data_bin() -> None:
    """The translation task's data folder: fairseq's own errors were a FileNotFoundError
    traceback (a missing folder) and "Exception: Could not infer language pair" (a folder without
    dictionaries, e.g. the raw text's). Now one error line says which folder and what it needs.
    For every model of the translation task (fairseq's too)."""
    from fairseq import utils
    from fairseq.tasks.translation import TranslationTask

    @replaces(TranslationTask, "setup_task")
    def setup_task(original, cfg, **kwargs):
        paths = utils.split_paths(cfg.data) if cfg.data else []
        for path in paths:
            check_data_bin(path, dictionaries=path == paths[0])  # fairseq reads them from the first
        return original(cfg, **kwargs)


def check_data_bin(path: str, dictionaries: bool = True) -> None:
    """A folder, with fairseq-preprocess's dictionaries (dict.*.txt) if asked, or ConfigError."""
    if not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "not found"
        raise ConfigError(f"data-bin {path} {what}: give the folder fairseq-preprocess writes "
                          "(dict.SRC.txt, dict.TGT.txt and the binarized splits)")
    if dictionaries and not glob.glob(os.path.join(path, "dict.*.txt")):
        raise ConfigError(f"{path} is not a data-bin: it holds no dict.*.txt (run "
                          "fairseq-preprocess, or scripts/prepare_data.py, to make one)")


def batch_size_required() -> None:
    """fairseq-train and fairseq-validate without --max-tokens or --batch-size stopped with a
    traceback ending in "AssertionError: Must specify batch size either with --max-tokens or
    --batch-size"; with --max-tokens 0 or less fairseq-train stopped with an IndexError in
    fairseq's batching, with --update-freq 0 with a ZeroDivisionError. Now each is one error
    line, before any work."""
    from fairseq.distributed import utils as distributed_utils

    @replaces(distributed_utils, "call_main")
    def call_main(original, cfg, main, **kwargs):
        if getattr(main, "__module__", None) in ("fairseq_cli.train", "fairseq_cli.validate"):
            check_batch_options(cfg)
        return original(cfg, main, **kwargs)


def check_batch_options(cfg) -> None:
    """A batch size (--max-tokens or --batch-size), positive sizes and a positive --update-freq,
    or ConfigError."""
    dataset, optimization = getattr(cfg, "dataset", None), getattr(cfg, "optimization", None)
    if dataset is None:
        return
    if dataset.max_tokens is None and dataset.batch_size is None:
        raise ConfigError("give the batch size: --max-tokens N (tokens per batch, e.g. 4000) "
                          "or --batch-size N (sentences)")
    for option in ("max_tokens", "batch_size", "max_tokens_valid", "batch_size_valid"):
        value = getattr(dataset, option, None)
        if value is not None and value <= 0:
            raise ConfigError(f"--{option.replace('_', '-')} must be a positive number (got {value})")
    update_freq = list(getattr(optimization, "update_freq", None) or [])
    if any(n <= 0 for n in update_freq):
        raise ConfigError("--update-freq must be positive: batches per update (got "
                          f"{','.join(map(str, update_freq))})")


def generation_options_checked() -> None:
    """Generation options fairseq's search cannot serve are one error line each, where fairseq's
    task builds the search (``FairseqTask.build_generator``: the commands, --eval-bleu in
    training, the hub), before a sentence is translated. For every model (fairseq's own too):

    - ``--beam 0`` died inside the model's first step (a ZeroDivisionError in our attention,
      which groups the beam's rows per sentence), a negative beam in torch ("Trying to create
      tensor with negative dimension -2"), ``--nbest 0`` after the first batch in fairseq's
      scoring (ZeroDivisionError): ``check_beam_and_nbest``.
    - Options the running command has nothing for died with a traceback once the models had
      loaded (``check_generation_options``): fairseq-generate ``--constraints`` at its first
      batch (``TypeError: 'NoneType' object is not iterable`` in LexicallyConstrainedBeamSearch:
      its batches hold no constraints, only fairseq-interactive reads them, after a tab on each
      input line), fairseq-generate ``--print-step`` and ``--retain-iter-history`` after the first
      batch (``KeyError: 'steps'`` / ``'history'``: only iterative refinement, the
      translation_lev task's generator, which it builds itself, makes them), fairseq-interactive
      ``--score-reference`` at its first line (``KeyError: 'target'``: its input has no
      reference). The command is the one running (``_RUNNING``), not one merely imported: a
      program may import both (fairseq-interactive imports fairseq-generate's module;
      scripts/gpu_check.py runs both in one process)."""
    from fairseq.tasks.fairseq_task import FairseqTask

    for name, entry in (("generate", "_main"), ("interactive", "main")):
        module = command_module(name)
        if module is not None and hasattr(module, entry):
            _names_itself(module, entry, name)

    @replaces(FairseqTask, "build_generator")
    def build_generator(original, self, models, args, *rest, **kwargs):
        check_beam_and_nbest(args)
        check_generation_options(args, _RUNNING.get())
        return original(self, models, args, *rest, **kwargs)


def check_beam_and_nbest(generation) -> None:
    """--beam and --nbest (fairseq's generation options) at least 1, or ConfigError."""
    for option in ("beam", "nbest"):
        value = getattr(generation, option, None)
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"--{option} must be at least 1 (got {value})")


# the fairseq command whose main function is running in this context ("generate",
# "interactive"), or None (the hub, fairseq-train's --eval-bleu, other programs)
_RUNNING: contextvars.ContextVar = contextvars.ContextVar("s2s_running_command", default=None)


def _names_itself(module, entry: str, name: str) -> None:
    """module.entry (fairseq-generate's ``_main``, fairseq-interactive's ``main``) runs with
    ``_RUNNING`` set to name."""
    @replaces(module, entry)
    def running(original, *args, **kwargs):
        token = _RUNNING.set(name)
        try:
            return original(*args, **kwargs)
        finally:
            _RUNNING.reset(token)


def check_generation_options(generation, command) -> None:
    """ConfigError for an option of fairseq's generation options the command (``generate``,
    ``interactive`` or None) cannot serve with a search of ``FairseqTask.build_generator``."""
    def given(option):
        return bool(getattr(generation, option.replace("-", "_"), None))

    if command == "generate" and given("constraints"):
        raise ConfigError("--constraints: fairseq-generate has no constraints to read (a data-bin "
                          "holds none); fairseq-interactive reads them after a tab on each input "
                          "line (source<TAB>constraint<TAB>...)")
    if command == "generate":
        for option in ("print-step", "retain-iter-history"):
            if given(option):
                raise ConfigError(f"--{option} prints the refinement steps of iterative refinement "
                                  "(the translation_lev task's models); beam search and sampling "
                                  "write one token per step and have none")
    if command == "interactive" and given("score-reference"):
        raise ConfigError("--score-reference scores the references of a data-bin: "
                          "fairseq-generate; fairseq-interactive's input lines have none")


def sentencepiece_model_of_the_source() -> None:
    """fairseq-interactive with ``--bpe sentencepiece --sentencepiece-model`` of another corpus or
    language translated words read as ``<unk>`` without a word; now one error line
    (``check_pieces_cover``, which says what each dictionary layout catches). Only there:
    fairseq-generate reads binarized sources and uses the model only to join output pieces. For
    every model of the task (fairseq's too)."""
    from fairseq.data.encoders.sentencepiece_bpe import SentencepieceBPE
    from fairseq.tasks.fairseq_task import FairseqTask

    @replaces(FairseqTask, "build_bpe")
    def build_bpe(original, self, args):
        bpe = original(self, args)
        src_dict = getattr(self, "source_dictionary", None)
        if isinstance(bpe, SentencepieceBPE) and src_dict is not None and \
                running_fairseq_command("interactive"):
            check_pieces_cover(src_dict, getattr(self, "target_dictionary", None),
                               args.sentencepiece_model)
        return bpe


def check_pieces_cover(src_dict, tgt_dict, path: str, side: str = "source") -> None:
    """The sentencepiece model must be the one the source side was encoded with (with
    ``side="target"``: src_dict the target dictionary, tgt_dict None, for a target side's own
    model, which ``Translator.score`` encodes translations with). With separate
    dictionaries every type of the source dictionary is then one of its pieces: another model
    (another corpus's or language's) gave pieces the dictionary lacks, read as ``<unk>``, and a
    smaller one of the same corpus cut words differently from training; either translated badly
    without a word. The output is joined back into text without the model, so a target side
    encoded with a model of its own (prepare_data --separate) is fine. A joined dictionary (the
    default of prepare_data) also holds the target side's types, with --separate pieces of
    another model; there the model's pieces are judged instead: a source side encoded with the
    model uses most of them. That catches another corpus's or language's model, not another
    vocabulary size of the same text. Measured on the demo's joined dictionary (5,987 types):
    its own model has 5,987 of its 5,997 pieces in it, a French model 1,312 of 5,997 (refused),
    5,000- and 6,500-piece models of the same text 4,975 of 4,997 and 5,977 of 6,497 (taken);
    as separate dictionaries, 5,987, 1,312, 4,975 (refused) and 5,977 of the 5,987 types would
    be pieces of these models."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i))}
    types = {src_dict[i] for i in range(src_dict.nspecial, len(src_dict))
             if not src_dict[i].startswith("madeupword")}  # fairseq's padding to a multiple of 8
    known = len(types & pieces)
    if tgt_dict is not None and tgt_dict.symbols == src_dict.symbols:
        short = pieces and known < 0.5 * len(pieces)
        what = f"{known} of its {len(pieces)} pieces are types of the (joined) dictionary"
    else:
        short = types and known < 0.95 * len(types)
        what = f"{known} of the {len(types)} types of the source dictionary are pieces of it"
    if short:
        lang = "src" if side == "source" else "tgt"
        what = what.replace("source dictionary", f"{side} dictionary")
        raise ConfigError(
            f"sentencepiece model {path} is not the one the {side} side was encoded with: only "
            f"{what}; give the model the data-bin was made with (prepare_data: "
            f"<work>/spm/spm.model, or spm.<{lang}>.model with --separate)")


def tokenizer_languages_from_the_data() -> None:
    """``--tokenizer moses`` (fairseq-generate, fairseq-interactive) without ``--source-lang``
    and ``--target-lang`` died before reading a sentence, with a hydra traceback ("Error merging
    override tokenizer.source_lang=null": field 'tokenizer.source_lang' is not Optional): the
    tokenizer's languages are the same options as the translation task's, which are None until
    the task takes them from the data-bin's file names (``train.en-de.en``). Now the tokenizer
    takes the same pair as the task (``data_utils.infer_language_pair`` of the first data path),
    where the options are not given; where the data names none, one error line asks for them. The
    task's own options are left as given. For any tokenizer or bpe with these two fields, for
    every model."""
    import copy

    from fairseq.dataclass import utils as dataclass_utils

    @replaces(dataclass_utils, "_override_attr")
    def _override_attr(original, sub_node, data_class, args):
        fields = getattr(data_class, "__dataclass_fields__", {})
        unset = [name for name in ("source_lang", "target_lang")
                 if name in fields and fields[name].type in (str, "str")  # not Optional
                 and getattr(args, name, "") is None]
        if sub_node in ("tokenizer", "bpe") and unset:
            args = copy.copy(args)
            pair = _data_language_pair(args, sub_node)
            for name in unset:
                setattr(args, name, pair[name == "target_lang"])
        return original(sub_node, data_class, args)


def eval_bleu_detokenizer_languages() -> None:
    """``fairseq-train --eval-bleu --eval-bleu-detok moses`` detokenized the validation
    hypotheses and references with English rules whatever the target language (French elisions,
    for one, stayed apart): the translation task builds the detokenizer from
    ``--eval-bleu-detok-args`` alone, and moses's languages default to "en". Languages the args do
    not give are now the task's pair (its options, or the data-bin's file names, as
    ``tokenizer_languages_from_the_data`` gives fairseq-generate's tokenizer); the args as given
    win. For any tokenizer with these two fields, for every model."""
    import json
    from argparse import Namespace

    from fairseq.data import encoders
    from fairseq.tasks.translation import TranslationTask

    @replaces(TranslationTask, "build_model")
    def build_model(original, self, cfg, *args, **kwargs):
        model = original(self, cfg, *args, **kwargs)
        detok = getattr(self.cfg, "eval_bleu_detok", None)
        if getattr(self.cfg, "eval_bleu", False) and detok in encoders.TOKENIZER_REGISTRY:
            given = json.loads(self.cfg.eval_bleu_detok_args or "{}")
            fields = getattr(getattr(encoders.TOKENIZER_REGISTRY[detok], "__dataclass", None),
                             "__dataclass_fields__", {})
            pair = {name: getattr(self.cfg, name, None) for name in ("source_lang", "target_lang")
                    if name in fields and name not in given}
            if any(pair.values()):
                self.tokenizer = encoders.build_tokenizer(
                    Namespace(tokenizer=detok, **{k: v for k, v in pair.items() if v}, **given))
        return model


def _data_language_pair(args, sub_node: str):
    """(source, target) of the data-bin as fairseq's translation task infers them."""
    from fairseq import utils
    from fairseq.data import data_utils

    name = getattr(args, sub_node, sub_node)
    data = getattr(args, "data", None)
    path = utils.split_paths(data)[0] if data else None
    pair = data_utils.infer_language_pair(path) if path and os.path.isdir(path) else (None, None)
    if None in pair:
        raise ConfigError(f"--{sub_node} {name} needs --source-lang and --target-lang: "
                          f"{path or 'the data'} has no SRC-TGT files to take them from")
    return pair


def install() -> None:
    empty_sources_translate_to_empty()
    clear_error_for_long_sources()
    utf8_input_lines()
    text_for_a_pieces_model_is_an_error()
    pieces_output_warns()
    checked_data_bin()
    batch_size_required()
    generation_options_checked()
    sentencepiece_model_of_the_source()
    tokenizer_languages_from_the_data()
    eval_bleu_detokenizer_languages()
