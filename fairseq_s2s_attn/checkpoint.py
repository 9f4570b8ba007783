"""Safe checkpoint loading for fairseq on torch >= 2.6, and clear errors for bad checkpoints.

torch.load now defaults to ``weights_only=True``: it unpickles only tensors, plain containers and
allow-listed classes, so a checkpoint cannot run code when it is loaded. fairseq checkpoints of
legacy (argparse) models keep their options as ``argparse.Namespace``, which stock fairseq then
cannot load ("Unsupported global: argparse.Namespace"). We allow-list exactly the plain-data
types fairseq checkpoints hold and keep the safe loader on: we never pass ``weights_only=False``.

A checkpoint that needs anything else is refused with a message naming the file and the type.
"""

import argparse
import collections
import contextlib
import contextvars
import hashlib
import inspect
import logging
import os
import pickle
import re
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .errors import CheckpointError
from .patching import replaces

logger = logging.getLogger(__name__)


# numpy's dtype classes whose arrays and scalars hold plain numbers: an object dtype (whose values
# would be arbitrary unpickled objects) stays refused, since its class is not on the list
NUMPY_DTYPES = ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
                "Float16", "Float32", "Float64")


def _numpy_safe_globals():
    """numpy scalars, arrays and their numeric dtypes, which fairseq stores for metrics: a numpy
    'best' score, and with --eval-bleu the BLEU n-gram counts (int64 arrays logged by fairseq's
    translation task, kept in every checkpoint's metrics state). Their reconstructors go under
    both of numpy's module names (``numpy._core`` since numpy 2, ``numpy.core`` before), since a
    pickle names the one of the numpy that wrote it."""
    found = [np.ndarray, np.dtype]
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    for name in ("scalar", "_reconstruct"):
        function = getattr(multiarray, name)
        found += [(function, f"{module}.multiarray.{name}") for module in ("numpy._core", "numpy.core")]
    for name in NUMPY_DTYPES:
        dtype_cls = getattr(getattr(np, "dtypes", None), name + "DType", None)
        if dtype_cls is not None:
            found.append(dtype_cls)
    return found


SAFE_GLOBALS = [argparse.Namespace, collections.OrderedDict, collections.defaultdict] + _numpy_safe_globals()


def allow_fairseq_checkpoints() -> None:
    """Adds the plain-data types of fairseq checkpoints to torch's safe-loading allow-list."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(SAFE_GLOBALS)


_UNSAFE = re.compile(r"unsupported global|global \S+ was not|call reduce|unsupported class|is blocked|"
                     r"can only (build|create)", re.I)


def _unsafe_detail(msg: str):
    """The line of torch's weights_only error that names a forbidden import, if that is the cause
    (rather than bytes that are no pickle at all, which torch reports the same way)."""
    for line in msg.splitlines():
        if _UNSAFE.search(line):
            name = re.search(r"GLOBAL (\S+)|got <class '([^']+)'>", line)
            return (name.group(1) or name.group(2)) if name else line.strip()[:200]
    return None


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    line = msg.splitlines()[0].strip() if msg else "no detail"
    if "WeightsUnpickler error" in msg:  # torch's message: the cause is on the lines that follow
        line = next((ln.strip() for ln in msg.split("WeightsUnpickler error:", 1)[1].splitlines()
                     if ln.strip()), line)
    return f"{type(e).__name__}: {line.split('. ')[0][:160]}"


def safe_load(path: str):
    """torch.load with the safe unpickler, turning failures into messages a user can act on."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            state = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_detail(str(e))
        if unsafe is None:
            raise CheckpointError(
                f"cannot read checkpoint {path}: the file is truncated or corrupt, or not a "
                f"checkpoint ({_first_line(e)})"
            ) from None
        raise CheckpointError(
            f"refusing to load {path}: it asks to import {unsafe}, which is not one of the plain "
            "data types of a fairseq checkpoint, and unpickling it could run code. Only load "
            "checkpoints you trust; this loader never disables torch's safe mode"
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # zip/IO/pickle-structure errors of a damaged file
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt, or not a "
            f"checkpoint ({_first_line(e)})"
        ) from None
    _check_crc(path)
    return state


def _check_crc(path: str) -> None:
    """torch does not verify the CRC-32 its zip format stores per tensor, so damaged bytes inside
    a tensor would load as silently wrong weights. One extra read of the file catches that."""
    if not zipfile.is_zipfile(path):
        return  # the legacy (pre-1.6) format has no checksums
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        bad = f"({type(e).__name__}: {e})"
    if bad is not None:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is corrupt (checksum mismatch in {bad}; "
            "it was damaged after it was written)"
        )


def check_fairseq_checkpoint(state, path: str) -> None:
    """What fairseq's loaders read from a checkpoint: a dict with the weights and the options."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is not a fairseq checkpoint: it holds a {type(state).__name__}, not the "
            "dict fairseq-train saves"
        )
    missing = [k for k in ("model",) if k not in state]
    if state.get("cfg") is None and state.get("args") is None:
        missing.append("cfg")
    if missing:
        raise CheckpointError(
            f"{path} is not a fairseq checkpoint: it has no {' or '.join(repr(k) for k in missing)} "
            f"entry (keys: {', '.join(sorted(map(str, state))[:8]) or 'none'})"
        )


def _patched_torch_load(original):
    """Wraps the ``torch.load`` that fairseq's checkpoint_utils calls, keeping weights_only=True."""

    def load(f, *args, **kwargs):
        if kwargs.get("weights_only") is False:
            raise CheckpointError("fairseq_s2s_attn: refusing torch.load(weights_only=False)")
        path = getattr(f, "name", f)
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            if hasattr(f, "close"):
                f.close()
            state = safe_load(os.fspath(path))
            check_fairseq_checkpoint(state, os.fspath(path))
            return state
        kwargs["weights_only"] = True
        return original(f, *args, **kwargs)

    load.__wrapped__ = original
    return load


class _TorchProxy:
    """``torch`` as seen by fairseq.checkpoint_utils, with the safe ``load`` above."""

    def __init__(self, torch_module):
        self._torch = torch_module
        self.load = _patched_torch_load(torch_module.load)

    def __getattr__(self, name):
        return getattr(self._torch, name)


def checked_ensemble_loader() -> None:
    """fairseq raises a bare IOError (a traceback) for a --path that does not exist, and an
    IsADirectoryError for a folder: one ``error: checkpoint not found: PATH`` line instead, or
    one naming the folder's checkpoint files. Models built here take the checkpoint's weights, so
    they do not read pretrained embedding files (``model.BUILDING_FOR_CHECKPOINT``)."""
    from fairseq import checkpoint_utils
    from fairseq.checkpoint_utils import get_maybe_sharded_checkpoint_filename
    from fairseq.file_io import PathManager

    @replaces(checkpoint_utils, "load_model_ensemble_and_task")
    def load_model_ensemble_and_task(original, *args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if not a["suffix"] and a["num_shards"] == 1 and a["state"] is None:
            for name in a["filenames"]:
                path = get_maybe_sharded_checkpoint_filename(name, "", 0, 1)
                if not PathManager.exists(path):
                    raise CheckpointError(f"checkpoint not found: {name}")
                if os.path.isdir(path):
                    found = sorted(f for f in os.listdir(path) if f.endswith(".pt"))[:4]
                    raise CheckpointError(
                        f"--path {name} is a folder, not a checkpoint file: give a file in it"
                        + (f" ({', '.join(found)})" if found else " (it holds no .pt file)"))
        # the checkpoint's weights replace the new model's: fairseq's lstm read its pretrained
        # embedding files (--encoder-embed-path) again here, and failed where they were gone
        from .model import BUILDING_FOR_CHECKPOINT
        token = BUILDING_FOR_CHECKPOINT.set(True)
        try:
            return original(*args, **kwargs)
        finally:
            BUILDING_FOR_CHECKPOINT.reset(token)


# model settings that --model-overrides may change without changing what the trained model
# computes (precision, speed, limits, training-only settings)
NEUTRAL_OVERRIDES = {
    "cpu_bf16", "cpu_int8", "compile_step", "init_range", "max_source_positions", "max_target_positions",
    "encoder_dropout_in", "encoder_dropout_out", "decoder_dropout_in", "decoder_dropout_out",
    "encoder_embed_path", "decoder_embed_path", "encoder_freeze_embed", "decoder_freeze_embed",
}


def _same_setting(a, b) -> bool:
    """Equal model settings: numbers and bools of the same type ('False' or 0 for a bool are not
    False: the model takes 'False' for true), other values (choice enums, strings) by name."""
    if isinstance(a, (bool, int, float)) or isinstance(b, (bool, int, float)):
        return type(a) is type(b) and a == b
    return str(a) == str(b)


def warn_changed_model_settings() -> None:
    """fairseq-generate's ``--model-overrides`` (and the hub's keyword arguments) replace model
    settings saved in the checkpoint. One that changes the parameters stops with one error (the
    checkpoint does not fit the model); one that changes only the computation
    (``reverse_source``, ``attention_mode``, ``readout_state``, ...) was taken silently, and
    fairseq-generate translated with a model that was never trained. Now a warning names each
    such setting of our models with its trained value.

    fairseq also overrides only the settings the checkpoint's config holds, and dropped the
    others without a word: a setting added to our models after a checkpoint was trained
    (``cpu_int8``) could not be switched on for it, and a misspelt name did nothing. Now a
    setting of our models that the checkpoint lacks is added with the given value, and a name
    that is no setting anywhere in the checkpoint's config is named in a warning (every model)."""
    from fairseq import checkpoint_utils
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY
    from fairseq.utils import safe_getattr
    from omegaconf import DictConfig, open_dict

    from .config import RNNS2SConfig

    def keys(node) -> set:
        found = set()
        for k in node.keys():
            found.add(k)
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                found |= keys(child)
        return found

    @replaces(checkpoint_utils, "overwrite_args_by_name")
    def overwrite_args_by_name(original, cfg, overrides):
        model = cfg.get("model") if hasattr(cfg, "get") else None
        arch = safe_getattr(model, "arch", None) or safe_getattr(model, "_name", None)
        ours = ARCH_MODEL_NAME_REGISTRY.get(arch) == "rnn_s2s"
        watched = [k for k in overrides if k in RNNS2SConfig.__dataclass_fields__
                   and k not in NEUTRAL_OVERRIDES] if ours else []
        trained = {k: safe_getattr(model, k, None) for k in watched}
        result = original(cfg, overrides)
        if isinstance(cfg, DictConfig) and isinstance(model, DictConfig):
            held = keys(cfg)
            added = [k for k in overrides if k not in held and ours and k in RNNS2SConfig.__dataclass_fields__]
            with open_dict(model):
                for k in added:
                    model[k] = overrides[k]
            unknown = [k for k in overrides if k not in held and k not in added]
            if unknown:
                logger.warning(f"--model-overrides: {', '.join(map(repr, unknown))} "
                               f"{'is' if len(unknown) == 1 else 'are'} no setting of this "
                               f"model or its task; ignored")
        for k in watched:
            now = safe_getattr(model, k, None)
            if trained[k] is not None and not _same_setting(now, trained[k]):
                logger.warning(f"--model-overrides sets {k} to {now!r}; the model was trained with "
                               f"{trained[k]!r}, so it now computes what it was not trained for")
        return result


def missing_restore_file_is_an_error() -> None:
    """``fairseq-train --restore-file X`` with no file X trained from scratch, with one INFO line
    ("No existing checkpoint found X") for a warning: a typo in the path threw away the model the
    user meant to continue. The default (checkpoint_last.pt in --save-dir, absent on a first
    run) keeps fairseq's behaviour."""
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    @replaces(checkpoint_utils, "load_checkpoint")
    def load_checkpoint(original, cfg, trainer, **kwargs):
        last = os.path.normpath(os.path.join(cfg.save_dir, "checkpoint_last.pt"))
        if cfg.restore_file != "checkpoint_last.pt" and os.path.normpath(cfg.restore_file) != last:
            suffix = trainer.checkpoint_suffix
            path = cfg.restore_file.replace(".pt", suffix + ".pt") if suffix else cfg.restore_file
            if not PathManager.isfile(path):
                in_save_dir = os.path.join(cfg.save_dir, path)
                hint = (f"; did you mean {in_save_dir}? (the path is not relative to --save-dir)"
                        if not os.path.isabs(path) and PathManager.isfile(in_save_dir) else "")
                raise CheckpointError(f"--restore-file {path}: no such file (fairseq would train "
                                      f"from scratch){hint}")
        return original(cfg, trainer, **kwargs)


_CONFIG_KEY = "_s2s_omegaconf"
_CONTAINERS = (dict, collections.OrderedDict)  # the mappings of a checkpoint's state


def _as_plain(obj):
    """obj with every omegaconf DictConfig replaced by {_CONFIG_KEY: its plain container, ...}."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(obj, DictConfig):
        return {_CONFIG_KEY: OmegaConf.to_container(obj, resolve=False),
                "struct": bool(OmegaConf.is_struct(obj))}
    if type(obj) in _CONTAINERS:
        return type(obj)((k, _as_plain(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_as_plain(v) for v in obj)
    return obj


def _from_plain(obj):
    """The inverse of _as_plain, as fairseq's load_checkpoint_to_cpu makes a checkpoint's cfg
    (objects allowed, so argparse.Namespace values stay), with the sender's struct flag."""
    from omegaconf import OmegaConf

    if isinstance(obj, dict) and _CONFIG_KEY in obj:
        cfg = OmegaConf.create(obj[_CONFIG_KEY], flags={"allow_objects": True})
        OmegaConf.set_struct(cfg, obj["struct"])
        return cfg
    if type(obj) in _CONTAINERS:
        return type(obj)((k, _from_plain(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_from_plain(v) for v in obj)
    return obj


def safe_broadcast_of_checkpoints() -> None:
    """Resuming data-parallel training: rank 0 loads the checkpoint and fairseq's trainer sends it
    to the other ranks (``distributed_utils.broadcast_object``) as a pickle of the state with its
    tensors replaced by placeholders, which the others read with ``torch.load``: with torch >= 2.6
    safe loading, every other rank died on the state's omegaconf DictConfig ("Unsupported global:
    omegaconf.dictconfig.DictConfig"), and next on fairseq's ``_TensorPlaceholder``, so no
    multi-process run could resume (CPU processes and GPUs alike). The state now travels as plain
    data (the config as its plain container, rebuilt on arrival as fairseq builds it from a
    file) and the placeholder class is allowed for that load only; the loads stay weights_only."""
    from fairseq.distributed import utils as distributed_utils

    @replaces(distributed_utils, "broadcast_object")
    def broadcast_object(original, obj, src_rank, group, dist_device=None):
        source = distributed_utils.get_rank(group) == src_rank
        allowed = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with allowed([distributed_utils._TensorPlaceholder]) if allowed else contextlib.nullcontext():
            got = original(_as_plain(obj) if source else obj, src_rank, group, dist_device)
        return obj if source else _from_plain(got)


# what the plugin records of a model's training data in a checkpoint's extra state
PAIR_KEY = "language_pair"  # [source, target]
DICTIONARIES_KEY = "dictionaries"  # {"source": fingerprint, "target": fingerprint}


def _pair(source, target) -> Optional[Tuple[str, str]]:
    return (source, target) if isinstance(source, str) and isinstance(target, str) else None


def task_pair(task) -> Optional[Tuple[str, str]]:
    """(source, target) language of a translation task as set up (given, or inferred from the
    data-bin's file names), else None."""
    cfg = getattr(task, "cfg", None) or getattr(task, "args", None)
    return _pair(getattr(cfg, "source_lang", None), getattr(cfg, "target_lang", None))


def fingerprint(dictionary) -> Optional[str]:
    """A short hash of a fairseq dictionary's types in their order (what the embeddings' rows
    stand for), or None for something else."""
    symbols = getattr(dictionary, "symbols", None)
    if not isinstance(symbols, list):
        return None
    return hashlib.sha256("\n".join(symbols).encode("utf-8")).hexdigest()[:16]


def task_dictionaries(task) -> Dict[str, str]:
    """{"source": fingerprint, "target": fingerprint} of a task's dictionaries (those it has)."""
    found = {}
    for side in ("source", "target"):
        try:
            value = fingerprint(getattr(task, f"{side}_dictionary", None))
        except Exception:  # a task without that side (NotImplementedError): saving goes on
            value = None
        if value is not None:
            found[side] = value
    return found


def _extra(state) -> dict:
    extra = state.get("extra_state") if isinstance(state, dict) else None
    return extra if isinstance(extra, dict) else {}


def trained_pair(state) -> Optional[Tuple[str, str]]:
    """(source, target) of a loaded checkpoint: its task's --source-lang/--target-lang where both
    were given, else the pair the plugin recorded (``checkpoints_record_their_data``), else None
    (other checkpoints of a pair inferred from file names)."""
    if not isinstance(state, dict):
        return None
    cfg = state.get("cfg")
    options = cfg.get("task") if hasattr(cfg, "get") else state.get("args")  # args: legacy
    get = options.get if hasattr(options, "get") else lambda key: getattr(options, key, None)
    recorded = _extra(state).get(PAIR_KEY)
    if not (isinstance(recorded, (list, tuple)) and len(recorded) == 2):
        recorded = (None, None)
    return _pair(get("source_lang"), get("target_lang")) or _pair(*recorded)


def trained_dictionaries(state) -> Dict[str, str]:
    """The fingerprints of the dictionaries a checkpoint was trained with, as the plugin
    recorded them ({} for other checkpoints)."""
    recorded = _extra(state).get(DICTIONARIES_KEY)
    if not isinstance(recorded, dict):
        return {}
    return {side: value for side, value in recorded.items() if isinstance(value, str)}


def checkpoints_record_their_data() -> None:
    """fairseq saves the task's options as given, so a language pair that fairseq-train inferred
    from the data-bin's file names (neither --source-lang nor --target-lang, the usual case) is
    not in the checkpoint, and nothing says which dictionaries the embeddings' rows stand for
    beyond their number. The trainer's state now records the task's pair and a fingerprint of
    each dictionary in its extra state (``extra_state["language_pair"]``, a list of two strings;
    ``extra_state["dictionaries"]``, ``fingerprint`` of each side), which only the checks below
    read; the task's options stay as given, so a checkpoint still loads with another data-bin's
    names."""
    from fairseq.trainer import Trainer

    @replaces(Trainer, "state_dict")
    def state_dict(original, self):
        state = original(self)
        task = getattr(self, "task", None)
        if isinstance(state.get("extra_state"), dict):
            pair, dictionaries = task_pair(task), task_dictionaries(task)
            if pair is not None:
                state["extra_state"][PAIR_KEY] = list(pair)
            if dictionaries:
                state["extra_state"][DICTIONARIES_KEY] = dictionaries
        return state


# what each checkpoint read by a load_model_ensemble_and_task in progress was trained with:
# (path, language pair, dictionaries' fingerprints)
_LOADED: contextvars.ContextVar = contextvars.ContextVar("s2s_loaded_data", default=None)


def other_data_is_an_error() -> None:
    """Two ways fairseq-generate and -interactive translated with the wrong data, silently:

    - A model run in the reverse of its direction: one trained de->en, given a data-bin holding
      train.en-de.* without --source-lang de --target-lang en (fairseq infers the pair from the
      file names), read the English side with the German side's embeddings; with a joined
      dictionary (prepare_data's default) nothing failed, the output was nonsense.
    - Another data-bin whose dictionaries have the same number of types: prepare_data's
      dictionaries of other corpora with the same --vocab-size often do (fairseq pads them to a
      multiple of 8), and the embeddings' rows then stood for other words. A size that differs
      was an error already (``model.check_state_dict_fits``).

    Now one error line for either, for models of ours, where the checkpoint says what it was
    trained with (the pair as given, or recorded by ``checkpoints_record_their_data``). The
    dictionaries are checked for every model the plugin recorded them for (fairseq's lstm or a
    language model for ``--lm-path`` trained with ``--user-dir fairseq_s2s_attn``), and a
    dictionary of another size, which torch refused with a traceback listing the mismatched
    weights for fairseq's models (ours said it in one line already), is one line for them too
    (``dictionary_size_error``)."""
    from fairseq import checkpoint_utils

    @replaces(checkpoint_utils, "load_checkpoint_to_cpu")
    def load_checkpoint_to_cpu(original, path, *args, **kwargs):
        state = original(path, *args, **kwargs)
        loaded = _LOADED.get()
        if loaded is not None:
            loaded.append((path, trained_pair(state), trained_dictionaries(state)))
        return state

    @replaces(checkpoint_utils, "load_model_ensemble_and_task")
    def load_model_ensemble_and_task(original, *args, **kwargs):
        token = _LOADED.set([])
        try:
            try:
                result = original(*args, **kwargs)
            except RuntimeError as e:
                loaded = _LOADED.get()
                error = dictionary_size_error(str(e), loaded[-1][0] if loaded else "the checkpoint")
                if error is None:
                    raise
                raise error from e
            check_trained_data(result[0], result[2], _LOADED.get())
        finally:
            _LOADED.reset(token)
        return result


# torch's load_state_dict: "size mismatch for NAME: copying a param with shape torch.Size([A, ..])
# from checkpoint, the shape in current model is torch.Size([B, ..])."
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(\d+)"
                            r"[^)]*\) from checkpoint, the shape in current model is torch\.Size"
                            r"\(\[(\d+)")
# weights with one row per type of a dictionary, in fairseq's models
_DICTIONARY_ROWS = re.compile(r"(^|\.)(embed_tokens|output_projection|fc_out)\.weight$")


def dictionary_size_error(message: str, path: str) -> Optional[CheckpointError]:
    """The CheckpointError for torch's state-dict error message where a weight with one row per
    dictionary type has another number of rows in the checkpoint than in the model built from the
    dictionaries loaded now; None for other errors."""
    for name, trained, now in _SIZE_MISMATCH.findall(message):
        if trained != now and _DICTIONARY_ROWS.search(name):
            return CheckpointError(
                f"{path} was trained with a dictionary of {trained} types ({name}), but the "
                f"dictionary loaded now has {now} types: use the data directory (dict.*.txt) the "
                "model was trained with")
    return None


def check_trained_data(models, task, loaded) -> None:
    """CheckpointError where a model of ours was trained on the task's language pair reversed,
    or any model with other dictionaries than the task's (as recorded in its checkpoint)."""
    from .model import RNNS2SModel

    if not models:
        return
    ours = all(isinstance(m, RNNS2SModel) for m in models)
    now, dictionaries = task_pair(task), task_dictionaries(task)
    for path, pair, trained in loaded:
        if ours and now is not None and now[0] != now[1] and pair == (now[1], now[0]):
            raise CheckpointError(
                f"{path} translates {pair[0]}->{pair[1]}, but this command reads {now[0]}->{now[1]} "
                f"(its --source-lang/--target-lang, or the data-bin's file names when not given): "
                f"give --source-lang {pair[0]} --target-lang {pair[1]}")
        for side, value in trained.items():
            if side in dictionaries and dictionaries[side] != value:
                which = f"{side} " if now is not None else ""  # a language model: one side
                raise CheckpointError(
                    f"{path} was trained with another {which}dictionary than the data-bin's "
                    "(the same number of types, other words or another order), so its embeddings "
                    "would stand for other words: use the data-bin (dict.*.txt) the model was "
                    "trained with")


def install() -> None:
    allow_fairseq_checkpoints()
    from fairseq import checkpoint_utils

    if not isinstance(checkpoint_utils.torch, _TorchProxy):
        checkpoint_utils.torch = _TorchProxy(checkpoint_utils.torch)
    checked_ensemble_loader()
    warn_changed_model_settings()
    missing_restore_file_is_an_error()
    safe_broadcast_of_checkpoints()
    checkpoints_record_their_data()
    other_data_is_an_error()
