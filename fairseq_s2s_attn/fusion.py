"""Shallow fusion (``--lm-path LM --lm-weight W``; Gulcehre et al., 2015, sec. 4.1) from every
command: beam search adds W times a target-side language model's log-probabilities to the
translation model's at each step. fairseq wires it up in fairseq-generate only; what this module
changes, for fairseq's models as for ours (the search itself, one token a step, is
``search.lm_steps_incremental``):

- fairseq-interactive and the hub (``Translator.translate(..., lm_path=, lm_weight=)``) loaded no
  language model and translated without it, silently (fairseq-generate's ``_main`` loads it, the
  others pass no ``lm_model`` to the search). ``FairseqTask.build_generator`` now loads it where
  the command did not (``language_model``: once per task and path, in the translation models'
  device and dtype), so both fuse as fairseq-generate does.
- The language model reads its dictionary from the translation data-bin: fairseq-generate points
  the language model's task at it, which loads ``DATA/dict.txt``, a file fairseq-preprocess does
  not write for a translation pair, so every data-bin of fairseq-preprocess failed ("dict.txt: No
  such file or directory") unless the user copied the target dictionary there. Where
  ``dict.txt`` is missing, the language model now takes the target side's ``dict.TGT.txt``,
  the dictionary its training data must be binarized with (``fairseq-preprocess --only-source
  --srcdict DATA/dict.TGT.txt``).
- A ``dict.txt`` that is not the target dictionary fused scores of other words (the same size)
  or died at the first step (another size); now one error line. ``--lm-path`` with fairseq's
  default ``--lm-weight 0`` ran the language model and added nothing, and with
  ``--score-reference`` (whose scorer has no language model) was ignored: one error line each.
"""

import contextvars
import logging
import os
from types import SimpleNamespace
from typing import List, Optional

import torch

from .errors import CheckpointError, ConfigError
from .patching import replaces
from .runtime import command_module

logger = logging.getLogger(__name__)

# the translation task's config (its data and target_lang) while a language model for fusion
# loads; None elsewhere (a language model trained on its own)
_TRANSLATION: contextvars.ContextVar = contextvars.ContextVar("s2s_fusion_task", default=None)


def target_dictionary_path(data: str, translation) -> Optional[str]:
    """DATA/dict.TGT.txt of the translation whose language model loads, where DATA has no
    dict.txt and that file exists; None otherwise (fairseq's dict.txt as before). TGT is the
    translation's target language, or where its config names none, the one its task takes from
    the data-bin's file names (fairseq's task sets up a copy of the config it is given)."""
    if translation is None or os.path.exists(os.path.join(data, "dict.txt")):
        return None
    target = getattr(translation, "target_lang", None)
    if target is None:  # fairseq-generate's own config: its task took the pair from the names
        from fairseq.data import data_utils

        target = data_utils.infer_language_pair(data)[1]
    path = os.path.join(data, f"dict.{target}.txt")
    return path if target and os.path.isfile(path) else None


def language_model_reads_the_target_dictionary() -> None:
    """``LanguageModelingTask.setup_dictionary`` loads DATA/dict.txt; for fusion with a translation
    whose data-bin has none, the target side's dictionary instead."""
    from fairseq import utils
    from fairseq.data import Dictionary, TruncatedDictionary
    from fairseq.tasks.language_modeling import LanguageModelingTask

    @replaces(LanguageModelingTask, "setup_dictionary")
    def setup_dictionary(original, args, **kwargs):
        data = utils.split_paths(args.data)[0] if getattr(args, "data", None) else None
        path = target_dictionary_path(data, _TRANSLATION.get()) if data else None
        if path is None:
            return original(args, **kwargs)
        dictionary = Dictionary.load(path)
        logger.info(f"language model: {path} ({len(dictionary)} types; {data} has no dict.txt)")
        size = getattr(args, "output_dictionary_size", -1)
        return dictionary, (TruncatedDictionary(dictionary, size) if size >= 0 else dictionary)


def generate_loads_for_its_translation() -> None:
    """fairseq-generate's ``_main`` loads its language model with ``_TRANSLATION`` set to its
    translation task's config (whose target_lang the task fills from the data-bin's names)."""
    module = command_module("generate")
    if module is None or not hasattr(module, "_main"):
        return

    @replaces(module, "_main")
    def _main(original, cfg, *args, **kwargs):
        token = _TRANSLATION.set(cfg.task)
        try:
            return original(cfg, *args, **kwargs)
        finally:
            _TRANSLATION.reset(token)


def check_weight(weight) -> None:
    """ConfigError for a fusion weight of 0 (fairseq's default), which adds nothing."""
    if not weight:
        raise ConfigError("--lm-path needs --lm-weight W (fairseq's default 0 adds nothing: the "
                          "language model would run for nothing); W scales its log-probabilities, "
                          "e.g. 0.1-0.3, tuned on the valid set")


def check_language_model(lm, target_dictionary, weight) -> None:
    """ConfigError unless lm predicts the target dictionary's words and weight counts."""
    check_weight(weight)
    lm_dict = getattr(getattr(lm, "decoder", None), "dictionary", None)
    if lm_dict is not None and lm_dict.symbols != target_dictionary.symbols:
        raise ConfigError(
            f"--lm-path: the language model's dictionary ({len(lm_dict)} types) is not the "
            f"target dictionary ({len(target_dictionary)} types); the language model reads "
            "DATA/dict.txt (else DATA/dict.TGT.txt) and must be trained on data binarized with "
            "fairseq-preprocess --only-source --srcdict DATA/dict.TGT.txt")


def _device_and_dtype(models: List[torch.nn.Module]):
    """Where the translation models run: the device of their parameters, and their dtype where
    all floating parameters share one (--fp16, --bf16), else fp32 (--cpu-bf16 keeps some weights
    in bf16 for its autocast, which covers the language model too)."""
    params = [p for m in models for p in m.parameters() if p.is_floating_point()]
    dtypes = {p.dtype for p in params}
    return params[0].device, (dtypes.pop() if len(dtypes) == 1 else torch.float32)


def language_model(task, path: str, models, generation):
    """The language model at path for task's translation models, loaded as fairseq-generate loads
    it (its task pointed at the translation's data), once per task, path, device and dtype."""
    device, dtype = _device_and_dtype(models)
    key = (os.path.abspath(path), device, dtype)
    cached = getattr(task, "_s2s_fusion_lm", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if not os.path.isfile(path):
        raise CheckpointError(f"--lm-path: no such file: {path}")
    from fairseq import checkpoint_utils

    token = _TRANSLATION.set(task.cfg)
    try:
        lms, _ = checkpoint_utils.load_model_ensemble([path], arg_overrides={"data": task.cfg.data},
                                                      task=None)
    finally:
        _TRANSLATION.reset(token)
    lm = lms[0].to(device=device, dtype=dtype)
    lm.prepare_for_inference_(SimpleNamespace(generation=generation))
    task._s2s_fusion_lm = (key, lm)
    return lm


def fusion_in_every_command() -> None:
    """``FairseqTask.build_generator`` loads the language model of ``--lm-path`` where the command
    passed none (fairseq-interactive, the hub) and checks it and its weight for every command."""
    from fairseq.tasks.fairseq_task import FairseqTask

    @replaces(FairseqTask, "build_generator")
    def build_generator(original, self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        **kwargs):
        extra = dict(extra_gen_cls_kwargs or {})
        path = getattr(args, "lm_path", None)
        if (path or extra.get("lm_model") is not None) and getattr(args, "score_reference", False):
            raise ConfigError("--lm-path with --score-reference: fairseq's scorer scores the "
                              "references with the translation models alone and would ignore "
                              "the language model; leave out one of the two")
        if path and extra.get("lm_model") is None:
            check_weight(getattr(args, "lm_weight", 0.0))  # before loading it
            extra.update(lm_model=language_model(self, path, models, args),
                         lm_weight=args.lm_weight)
        if extra.get("lm_model") is not None:
            check_language_model(extra["lm_model"], self.target_dictionary, extra.get("lm_weight"))
        return original(self, models, args, seq_gen_cls, extra or extra_gen_cls_kwargs, **kwargs)


def install() -> None:
    language_model_reads_the_target_dictionary()
    generate_loads_for_its_translation()
    fusion_in_every_command()
