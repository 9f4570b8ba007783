"""Run-time defaults and fixes applied when fairseq loads the plugin.

- CPU threads: torch's default is one intra-op thread per core. Commands that run batches of
  many sentences (fairseq-train, -generate, -validate, -hydra-train) get one per core this
  process may use (its CPU affinity), shared among the processes of a data-parallel run on this
  machine, at most 4 (``default_threads``); everything else (fairseq-interactive, the hub, a
  script importing the plugin) gets one: one sentence at a time runs small products, where a
  second thread costs more than it gives (fairseq-interactive given batches, --buffer-size and
  --batch-size above 1, gets the batch commands' threads). Measured on a 2-core AMD EPYC (Zen
  4), fairseq-train, the demo recipe (rnn_bahdanau, --cpu-bf16), 200 updates: 6,306 / 6,726
  words/s with 2 threads against 4,998 / 5,148 with 1 (1.28x; fairseq's lstm at its own sizes
  1.6x, tiny models with 64-wide layers 1.3-1.4x); fairseq-generate of the demo checkpoint at
  beam 5: batch 32 1.23x, batch 1 0.83-0.95x (the same translations). Above 2 threads not
  measured; the cap of 4 is CTranslate2's default for its intra-op threads. (Until 2026-12-07
  the plugin set one thread everywhere, after "fairseq's lstm on 2 cores: 26k words/s with 1
  thread, 3.7k with 2", which no run on these machines showed again: other work on the machine
  makes it, see the next point.) OMP_NUM_THREADS or S2S_NUM_THREADS set by the user wins.
- Threads and other processes: a batch command's threads give way to other processes' work,
  checked every 2 s between batches (``threads_follow_other_work``, ``cpushare``): two runs
  each with a thread per core crawled side by side.
- oneDNN's primitive cache in training: torch compiles one oneDNN primitive per matrix-product
  shape (bf16 products, LSTM layers) and keeps up to 1,024 of them. Every batch of a new size
  adds primitives, so fairseq-train's resident memory grew with every update: rnn_bahdanau with
  --cpu-bf16 (sizes 256, --max-tokens 2000) from 795 MB after 50 updates to 1,312 MB after 150,
  still growing, against 717 MB for fairseq's lstm in fp32. In fairseq-train, unless the user
  set ONEDNN_PRIMITIVE_CACHE_CAPACITY, the cache keeps 128 primitives. It kept 16 until the
  products over all positions of a batch came in a few row counts (``precision.padded_rows``):
  then a batch's products had a new shape nearly every update and no cache size helped at a
  bearable memory cost. Now those shapes recur, and 128 holds them: 400 updates (1.2 epochs of
  the demo corpus, rnn_bahdanau, one core each, two processes side by side on an Intel Xeon
  with AMX) took 82.6 s against 97.4 s with each batch's own rows and 16 primitives, peak RSS
  1,166 against 1,087 MB; 256 primitives gave the same time as 128 (76.9 against 77.5 s) at
  1,186 against 1,116 MB, 1,024 1.04x as fast as 256 at 1,373 against 1,217 MB.
  Beam search is left alone: its shrinking batches make new shapes at every step, and 16
  primitives made beam 1 ~10% slower.
- Freed memory kept for reuse (glibc): glibc's malloc gives large blocks their own mappings (every
  block over 32 MB, its largest mmap threshold; smaller ones until its adaptive threshold has
  grown past them) and returns the heap's free top to the kernel beyond its trim threshold. A
  training update frees and remakes the same large tensors every time (the B*T x V logits,
  log-probabilities and their gradients: 48 MB each at --max-tokens 2000 and 6k types; the
  per-step activations), so each update took its memory from the kernel again, as fresh pages
  zeroed and faulted in 4 kB at a time: filling the 48 MB loss gradient took 24 ms, as long as the
  output layer's forward product; beam search remakes its B*beam x V scores at every step. In
  fairseq's commands (train, generate, interactive, validate), unless the user chose the
  allocator's settings (MALLOC_* variables, glibc.malloc tunables, a preloaded allocator), all
  blocks come from the heap and up to 1 GiB of freed memory stays there for reuse (mallopt
  M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB; the variables are set for processes started from it). On a
  2-core VM the demo recipe (rnn_bahdanau, --cpu-bf16) trained its first 150 updates in 78-79 s
  instead of 143-159 s and 400 updates, two runs side by side, in 228 s instead of 421 s;
  fairseq's lstm (fp32, sizes 256) in 93-103 s instead of 114-118 s; fairseq-generate of the demo
  checkpoint (1,000 sentences, beam 5, batch 32) ran at 79-87 instead of 68-69 sentences/s with
  the same translations and 1% more resident memory. The cost in training: freed memory is reused,
  not returned, and the heap fragments, so the peak resident memory is higher (1.46 instead of
  1.15 GB after 150 updates; after 450: 1.64 GB, flat from about 250 updates on, instead of 1.16
  GB). ``MALLOC_MMAP_MAX_=65536`` (glibc's default) keeps glibc's behaviour.
- fairseq's ``batch_by_size`` drops the last batch when its size is not a multiple of
  --required-batch-size-multiple (default 8), so fairseq-generate silently skips up to 7
  sentences of a test set and BLEU is computed on fewer sentences. We keep that batch.
- A training run resumed in epoch 2 or later made its batches with another seed than the run
  it continued and trained on other batches from then on (``resumed_epochs_keep_their_batches``).
- ``--print-alignment`` with a model that has no attention (rnn_vanilla) crashed deep in fairseq
  (it transposes an empty attention tensor). There is no alignment to print, so the command now
  translates as usual, warns once and prints empty ``A-`` lines rather than made-up ones; also
  with ``--score-reference``, and for an ensemble with such a model (beam search and scoring).
- Guided alignment (``--criterion label_smoothed_cross_entropy_with_alignment``) with a model that
  returns no attention in training (rnn_vanilla) stopped with an AttributeError: one error now.
- ``--eval-bleu`` logged no BLEU for a validation whose hypotheses were all empty (a model
  early in training), and ``--best-checkpoint-metric bleu`` then died with ``KeyError: 'bleu'``:
  such a validation scores BLEU 0; one where some batches are empty scores the BLEU of all.
- ``--num-batch-buckets N`` (pad each sentence to one of N lengths) died at the data's loading
  on numpy 2 (``percentile() got an unexpected keyword argument 'interpolation'``), for every
  model: fairseq's ``get_buckets`` calls it with numpy 1's keyword, which numpy 2 removed; and
  fairseq-train of a language model with ``--sample-break-mode eos`` (``np.compat.long``).
- ``--dataset-impl cached`` died before the first update (``KeyError`` in
  ``IndexedCachedDataset``): the trainer's dummy batch was read before anything was prefetched
  (``first_batch_of_a_prefetching_dataset``).
- Host synchronisation in beam search on a GPU: the source side stays one row per sentence
  (``RNNEncoder.reorder_encoder_out``), and for an arbitrary order the encoder must read the
  order's values to know whether rows stay with their sentences: two ``torch.equal`` per
  decoding step, each of which makes the host wait for the GPU (fairseq's lstm has none there;
  fairseq's search itself reads the device about 1.5 times a step). fairseq's
  SequenceGenerator keeps each sentence's hypotheses in consecutive runs and its sentences in
  order (its reorders are ``active_bbsz_idx``: candidates of the sentence's own beam, finished
  sentences left out), so its ``_generate`` now runs inside ``encoder.sentence_runs()``, where
  the encoder decides from the order's size alone. Other callers' orders are still checked.
- ``fairseq-train --arch rnn_bahdanau --help`` printed fairseq's general options only (its first
  parse handles --help before model options are added). When help is asked for with one of our
  architectures, the model options (every field of RNNS2SConfig, with its help) are added first.
- Our own errors (bad options, unsafe or corrupt checkpoints) end the command with one
  ``error: ...`` line instead of a traceback through fairseq; so do the checks fairseq makes
  itself with a message (``assert max_len >= min_len, "min_len cannot be larger than max_len"``,
  "--sampling requires --nbest to be equal to --beam", "Dataset not found"), unless
  ``S2S_TRACEBACK=1``.
- Importing fairseq set the root logger to DEBUG (``logging.basicConfig`` in one of its model
  modules), so programs that import the plugin before configuring logging (the hub, the
  scripts) printed every library's DEBUG lines; the plugin's first import of fairseq now keeps
  fairseq's modules from configuring logging. fairseq-generate, -interactive and -validate import
  fairseq before they configure logging, so that call won there: their logs came on stderr in
  Python's default format (no time), with hydra's DEBUG lines, where fairseq sends them to
  stdout (generate: its output file) in its own format at LOGLEVEL (default INFO). When the
  plugin is loaded there and finds the root logger as that call left it, it sets it up as the
  command would have (``commands_log_as_fairseq_meant``).
- hydra 1.3 (the hydra that runs on Python 3.11, scripts/setup_env.sh) warned about fairseq's use
  of its old API in every command (about twenty lines of UserWarnings before the first log line
  of fairseq-train); torch warned that fairseq's data loader asks to pin memory on a machine
  without a GPU. None of it is about what the user did: those warnings are not shown, unless the
  user chose how warnings are shown (-W, PYTHONWARNINGS).
- fairseq's ``BufferedIterator`` makes the next batches in a daemon thread. A run that ends
  before its epoch does (``--max-update``, ``--max-epoch`` reached mid-iteration, a generate
  over part of a set) exits while that thread is still inside torch. Python (< 3.14) ends such a
  thread with ``pthread_exit`` when it next takes the GIL during interpreter shutdown; that
  unwinds through torch's C++ frames and the process aborts (``terminate called without an
  active exception``, exit status -6 / 134) after a run that succeeded. At exit we now stop
  those threads (no new batch is started, the queue is drained, the thread joined) first.
"""

import argparse
import ast
import atexit
import contextlib
import ctypes
import linecache
import logging
import os
import platform
import queue
import sys
import threading
import time
import warnings
import weakref
from typing import Optional

import torch

from .patching import replaces

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def fairseq_leaves_logging_alone():
    """While the plugin imports fairseq for the first time, ``logging.basicConfig`` calls made by
    fairseq's own modules do nothing.

    fairseq configures the root logger as its modules are imported:
    ``fairseq.models.wav2vec.wav2vec2_classification`` calls ``logging.basicConfig(level=DEBUG)``.
    A program that imports fairseq (or this plugin) before configuring logging, such as a Python
    session using the hub or scripts/compare.py, then printed every library's DEBUG lines (226 of
    the 269 lines of a compare.py run were matplotlib's font manager). A program's own basicConfig
    still works. In fairseq's commands fairseq is imported before the plugin: fairseq-train
    configures logging before it imports fairseq; for the others see
    ``commands_log_as_fairseq_meant``.
    """
    if "fairseq" in sys.modules:  # imported already: too late to keep its settings out
        yield
        return
    original = logging.basicConfig

    def basic_config(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller == "fairseq" or caller.startswith("fairseq."):
            return None
        return original(*args, **kwargs)

    logging.basicConfig = basic_config
    try:
        yield
    finally:
        logging.basicConfig = original


FAIRSEQ_LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"  # fairseq_cli's
FAIRSEQ_LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"
# the commands that configure logging after importing fairseq (fairseq-train configures it first)
LATE_LOGGING_COMMANDS = ("generate", "interactive", "validate")


def command_module(name: str):
    """The module of fairseq's command ``name`` in this process (fairseq_cli.NAME, or __main__
    under ``python -m fairseq_cli.NAME``), or None."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == f"fairseq_cli.{name}":
        return main
    return sys.modules.get(f"fairseq_cli.{name}")


def _import_time_handler(root: logging.Logger) -> Optional[logging.Handler]:
    """The handler of fairseq's import-time ``logging.basicConfig(level=DEBUG)``
    (fairseq.models.wav2vec.wav2vec2_classification) if the root logger holds that and nothing
    else: level DEBUG, one StreamHandler on stderr in Python's default format. None otherwise
    (configured by the user, the command, or a test harness)."""
    if root.level != logging.DEBUG or len(root.handlers) != 1:
        return None
    handler = root.handlers[0]
    if (type(handler) is not logging.StreamHandler or handler.stream is not sys.stderr
            or handler.formatter is None or handler.formatter._fmt != logging.BASIC_FORMAT):
        return None
    return handler


def commands_log_as_fairseq_meant() -> bool:
    """In fairseq-generate, -interactive and -validate: logging as the command sets it up, where
    fairseq's import had set it up first (see the module's docstring). The root logger gets the
    command's own configuration: fairseq's format, LOGLEVEL (default INFO), stdout. fairseq-generate
    configures logging when its ``_main`` starts, with its output file (stdout, or the file of
    --results-path): there the configuration made here is removed first, so the command's own
    takes effect. Nothing changes where the root logger is configured otherwise. Returns whether
    it changed it."""
    root = logging.getLogger()
    handler = _import_time_handler(root)
    if not running_fairseq_command(*LATE_LOGGING_COMMANDS) or handler is None:
        return False
    root.removeHandler(handler)
    root.setLevel(logging.WARNING)  # the level of an unconfigured root logger
    logging.basicConfig(format=FAIRSEQ_LOG_FORMAT, datefmt=FAIRSEQ_LOG_DATEFMT,
                        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stdout)
    generate = command_module("generate")
    if generate is not None and hasattr(generate, "_main"):
        provisional = root.handlers[-1]

        @replaces(generate, "_main")
        def _main(original, cfg, output_file):
            if provisional in root.handlers:  # let the command's basicConfig take effect
                root.removeHandler(provisional)
                root.setLevel(logging.WARNING)
            return original(cfg, output_file)
    return True


# warnings that say nothing about what the user did (see the module's docstring)
QUIET_WARNINGS = (
    # hydra 1.3 on fairseq 0.12's use of hydra 1.0's API
    r"hydra\.experimental\.(initialize|compose)\(\) is no longer experimental",
    r"\s*The version_base parameter is not specified",
    r"In '[^']*': Usage of deprecated keyword in package header",
    r"\s*'[^']*' is validated against ConfigStore schema with the same name",
    r"\s*The strict flag in the compose API is deprecated",
    # torch, on fairseq's data loader's pin_memory=True on a machine without a GPU
    r"'pin_memory' argument is set as true but no accelerator is found",
)
# FutureWarnings of torch on fairseq's own calls: fairseq-train's train_step and valid_step
# enter torch.cuda.amp.autocast(enabled=...) at every update, deprecated since torch 2.4 (two
# warnings of four lines in every training log, on CPU and GPU alike)
QUIET_FUTURE_WARNINGS = (
    r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated",
)


def quiet_fairseq_warnings() -> bool:
    """Hides the warnings of ``QUIET_WARNINGS`` (UserWarnings, by the start of their message)
    and ``QUIET_FUTURE_WARNINGS`` (FutureWarnings), unless the user chose how warnings are shown
    (-W or PYTHONWARNINGS: ``sys.warnoptions``). Returns whether it did."""
    if sys.warnoptions:
        return False
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for pattern in QUIET_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    return True


# fairseq's commands that run batches of many sentences (fairseq-hydra-train imports
# fairseq_cli.train); fairseq_cli.interactive imports fairseq_cli.generate, so it is told apart
BATCH_COMMANDS = ("train", "generate", "validate")
MAX_DEFAULT_THREADS = 4


def affinity_cpus() -> list:
    """The cores this process may run on (its CPU affinity: taskset, cpusets), else all."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def available_cores() -> int:
    """How many cores this process may run on (``affinity_cpus``)."""
    return len(affinity_cpus())


def default_threads(cores: int, processes: int = 1) -> int:
    """Intra-op threads for one of ``processes`` processes sharing ``cores`` cores: an equal
    share, at least 1, at most MAX_DEFAULT_THREADS."""
    return max(1, min(cores // max(1, processes), MAX_DEFAULT_THREADS))


def _local_processes() -> int:
    """The processes of this run on this machine as torchrun says (LOCAL_WORLD_SIZE), else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


# seconds between two readings of the other processes' load (at a batch boundary)
FOLLOW_PERIOD_S = 2.0
_FOLLOW = {}  # "share": cpushare.CoreShare, "most": threads on an idle machine, "next": time


def set_thread_defaults(processes: Optional[int] = None, batches: Optional[bool] = None) -> int:
    """Sets torch's intra-op threads (see the module's docstring) and returns them: S2S_NUM_THREADS
    if the user set it (at least one), torch's reading of OMP_NUM_THREADS if that is set;
    otherwise ``default_threads`` over this process's cores for a command that runs batches of
    many sentences (``batches``; None: fairseq-train, -generate or -validate runs in this
    process, not fairseq-interactive) shared by ``processes`` processes (None: torchrun's
    LOCAL_WORLD_SIZE, else 1), and one thread for anything else; the batch commands' threads
    then give way to other processes' work (``threads_follow_other_work``)."""
    _FOLLOW.clear()  # the user's number, or the plugin's choice below
    threads = os.environ.get("S2S_NUM_THREADS")
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    elif "OMP_NUM_THREADS" not in os.environ:
        if batches is None:
            batches = running_fairseq_command(*BATCH_COMMANDS) and \
                not running_fairseq_command("interactive")
        if processes is None:
            processes = _local_processes()
        cores = available_cores()
        torch.set_num_threads(default_threads(cores, processes) if batches else 1)
        if batches:
            share = f", {processes} processes" if processes > 1 else ""
            logger.info(f"{torch.get_num_threads()} intra-op thread(s) per process ({cores} cores"
                        f"{share}; set OMP_NUM_THREADS or S2S_NUM_THREADS to choose)")
        threads_follow_other_work(torch.get_num_threads())
    return torch.get_num_threads()


def threads_follow_other_work(most: int) -> bool:
    """A batch command's default threads (``most``, chosen for an idle machine) give way to other
    processes: every ``FOLLOW_PERIOD_S`` seconds, at the next batch fairseq's iterators hand over
    (``CountingIterator.__next__``, in the main thread), the threads become the cores of this
    process's affinity the others left over the period (``cpushare.threads_left``), back up to
    ``most`` when they are gone. Each change is logged. Two runs side by side, each with all
    the cores' threads, crawled (see ``cpushare``). Only where the plugin chose the threads (not
    OMP_NUM_THREADS or S2S_NUM_THREADS); the thread count then depends on the machine's load, so
    set one of them for runs that must be bitwise reproducible. Returns whether it follows."""
    from .cpushare import CoreShare

    _FOLLOW.clear()
    if most <= 1:
        return False
    share = CoreShare(affinity_cpus())
    if share.last[1] is None:  # no /proc/stat to read
        return False
    _FOLLOW.update(share=share, most=most, next=time.monotonic() + FOLLOW_PERIOD_S)
    from fairseq.data import iterators

    @replaces(iterators.CountingIterator, "__next__")
    def __next__(original, self):
        if _FOLLOW and time.monotonic() >= _FOLLOW["next"] and \
                threading.current_thread() is threading.main_thread():
            follow_other_work()
        return original(self)
    return True


def follow_other_work() -> Optional[int]:
    """One reading (see ``threads_follow_other_work``): sets and returns the threads, or None."""
    from .cpushare import threads_left

    _FOLLOW["next"] = time.monotonic() + FOLLOW_PERIOD_S
    share = _FOLLOW["share"]
    others = share.others()
    if others is None:
        return None
    threads = threads_left(len(share.cpus), _FOLLOW["most"], others)
    if threads != torch.get_num_threads():
        logger.info(f"{threads} intra-op thread(s) from now on: other processes kept "
                    f"{others:.1f} of this process's {len(share.cpus)} cores busy "
                    f"(S2S_NUM_THREADS or OMP_NUM_THREADS fixes the number)")
        torch.set_num_threads(threads)
    return threads


def interactive_batch(cfg) -> int:
    """The most sentences fairseq-interactive puts in one batch for this configuration (an omegaconf
    config or fairseq's Namespace): --buffer-size sentences are read at a time (1 by default),
    then batched by --batch-size, or by --max-tokens alone (counted as the whole buffer); with
    neither, fairseq takes one sentence per batch."""
    buffer = max(1, getattr(getattr(cfg, "interactive", cfg), "buffer_size", 1) or 1)
    dataset = getattr(cfg, "dataset", cfg)
    batch = getattr(dataset, "batch_size", None)
    if batch is None:
        batch = buffer if getattr(dataset, "max_tokens", None) is not None else 1
    return min(buffer, batch)


def interactive_batches_get_batch_threads() -> bool:
    """fairseq-interactive translates one sentence at a time by default, where one thread is the
    faster (see the module's docstring). Given batches (``interactive_batch`` > 1: e.g.
    ``--buffer-size 1000 --batch-size 32``) it translates them as fairseq-generate does, and gets
    that command's threads: the demo checkpoint's 1,000 test sentences at beam 5 in batches of
    32, 6.21 / 6.33 s of translation with 1 thread, 4.61 / 4.57 s with 2 (2-core AMD EPYC), the
    same translations. Returns whether it installed this (only in fairseq-interactive)."""
    interactive = command_module("interactive")
    if interactive is None or not hasattr(interactive, "main"):
        return False

    @replaces(interactive, "main")
    def main(original, cfg):
        if interactive_batch(cfg) > 1:
            set_thread_defaults(batches=True)
        return original(cfg)
    return True


def running_fairseq_command(*names: str) -> bool:
    """Whether this process runs one of fairseq's commands (``train`` for fairseq-train), started
    as the console script (which imports fairseq_cli.train) or as ``python -m fairseq_cli.train``
    (where the module is ``__main__``)."""
    return any(command_module(n) is not None for n in names)


ONEDNN_CACHE_VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
TRAINING_PRIMITIVE_CACHE = 128


def limit_primitive_cache_in_training(training: Optional[bool] = None) -> bool:
    """Caps oneDNN's primitive cache (read when torch makes its first oneDNN primitive, so this
    runs when fairseq loads the plugin, before any model work) in training processes: those that
    run fairseq-train (``training`` None) or say so. The user's own setting wins. Returns whether
    it set the cap."""
    if training is None:
        training = running_fairseq_command("train")
    if not training or ONEDNN_CACHE_VAR in os.environ:
        return False
    os.environ[ONEDNN_CACHE_VAR] = str(TRAINING_PRIMITIVE_CACHE)
    logger.info(f"training: oneDNN keeps {TRAINING_PRIMITIVE_CACHE} compiled primitives "
                f"({ONEDNN_CACHE_VAR}; set it to choose another number)")
    return True


# glibc's mallopt parameters (malloc.h) and the environment variables that set them at start-up
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
HEAP_TRIM_THRESHOLD = 1 << 30
HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(HEAP_TRIM_THRESHOLD)}


def _allocator_chosen_by_user() -> bool:
    env = os.environ
    return (any(k.startswith("MALLOC_") for k in env) or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
            or any(name in env.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")))


HEAP_COMMANDS = ("train", "generate", "interactive", "validate")


def keep_freed_memory(command: Optional[bool] = None) -> bool:
    """Large blocks from glibc's heap, kept there when freed, in processes that run fairseq's
    commands (see the module's docstring): fairseq-train, -generate, -interactive, -validate
    (``command`` None), or that say so; not in a program that merely imports the plugin. Nothing
    changes where the user chose the allocator's settings or the C library is not glibc. Returns
    whether it changed the settings."""
    if command is None:
        command = running_fairseq_command(*HEAP_COMMANDS)
    if not command or _allocator_chosen_by_user() or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError, TypeError):
        return False
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)):
        return False
    os.environ.update(HEAP_ENV)  # processes started from this one (spawned workers) do the same
    logger.info("large blocks come from the heap and freed memory is kept for reuse "
                "(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=1 GiB; set MALLOC_* variables to "
                "choose otherwise)")
    return True


def keep_remainder_batches() -> None:
    """fairseq's ``data_utils.batch_by_size`` drops the last batch when its size is not a multiple
    of --required-batch-size-multiple (default 8), so fairseq-generate silently skipped up to 7
    sentences of a test set and computed BLEU on fewer. The dropped indices (the tail: batches
    are consecutive runs of the indices) are kept as one last batch. Batches of fixed shapes
    (``fixed_shapes``) are fairseq's."""
    from fairseq.data import data_utils

    @replaces(data_utils, "batch_by_size")
    def batch_by_size(original, indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None,
                      max_sentences=None, required_batch_size_multiple=1, fixed_shapes=None):
        batches = original(indices, num_tokens_fn, num_tokens_vec=num_tokens_vec,
                           max_tokens=max_tokens, max_sentences=max_sentences,
                           required_batch_size_multiple=required_batch_size_multiple,
                           fixed_shapes=fixed_shapes)
        if fixed_shapes is not None:
            return batches
        kept = sum(len(b) for b in batches)
        if kept < len(indices):  # batches are consecutive runs of indices: the tail was dropped
            batches = list(batches) + [list(indices[kept:])]
        return batches


# fairseq's lines that numpy 2 refuses (--num-batch-buckets, language models' sentence samples):
# the same with what numpy has since 1.22 (``method=``; ``np.compat.long`` was Python's int)
NUMPY_2_LINES = {
    ("data_utils", "get_buckets"): {'interpolation="lower",': 'method="lower",'},
    ("LanguagePairDataset", "__init__"): {
        "num_tokens = np.vectorize(self.num_tokens, otypes=[np.compat.long])":
            "num_tokens = np.vectorize(self.num_tokens, otypes=[int])",
    },
    ("TokenBlockDataset", "_build_slice_indices"): {
        "len(sizes), dtype=np.compat.long": "len(sizes), dtype=int",
    },
}


def numpy_2_names() -> bool:
    """Three lines of fairseq that use numpy 1's names, which numpy 2 has not:

    - ``--num-batch-buckets``: ``data_utils.get_buckets`` (bucket lengths as the lower
      percentiles of the sentence lengths) passes ``interpolation=``, and
      ``LanguagePairDataset`` asks for ``np.compat.long``: the data's loading died;
    - ``--task language_modeling --sample-break-mode eos`` (one sentence a sample, the language
      model of ``--lm-path``): ``TokenBlockDataset`` asks for ``np.compat.long`` too, and
      fairseq-train died loading the data.

    The lines are rewritten in fairseq's functions with numpy 2's names for the same values
    (``method=``; ``int``, which ``np.compat.long`` was); the function objects stay
    (``BucketPadLengthDataset`` imported ``get_buckets`` by name). Where numpy has no ``method``
    or a line is not found, fairseq's function stays; returns whether all were rewritten."""
    import inspect

    import numpy as np
    from fairseq.data import data_utils
    from fairseq.data.language_pair_dataset import LanguagePairDataset
    from fairseq.data.token_block_dataset import TokenBlockDataset

    from .patching import rewrite_lines

    if "method" not in inspect.signature(np.percentile).parameters:
        return False
    owners = {"data_utils": data_utils, "LanguagePairDataset": LanguagePairDataset,
              "TokenBlockDataset": TokenBlockDataset}
    return all([rewrite_lines(getattr(owners[owner], name), lines)
                for (owner, name), lines in NUMPY_2_LINES.items()])


def first_batch_of_a_prefetching_dataset() -> None:
    """``--dataset-impl cached`` (fairseq-preprocess's format that the dataset serves from memory,
    after prefetching the sentences an epoch reads): fairseq-train died before its first update
    with ``KeyError: 35`` in ``IndexedCachedDataset.__getitem__``, for every model. The trainer
    reads each iterator's first batch (its dummy batch, ``EpochBatchIterator.first_batch``)
    straight from the dataset, before the epoch has prefetched anything. The first batch's
    sentences are now prefetched first; each epoch then prefetches its own, as before."""
    from fairseq.data.iterators import EpochBatchIterator

    from .patching import replaces_property

    @replaces_property(EpochBatchIterator, "first_batch")
    def first_batch(original, self):
        if getattr(self.dataset, "supports_prefetch", False) and len(self.frozen_batches) > 0:
            self.dataset.prefetch(self.frozen_batches[0])
        return original(self)


def resumed_epochs_keep_their_batches() -> None:
    """fairseq makes the training batches once and reuses them in every epoch (shuffled by epoch),
    from the sentences sorted by length with ties in a random order drawn with the seed plus the
    epoch the batches are made in (``FairseqTask.get_batch_iterator``). An uninterrupted run makes
    them in epoch 1; a run resumed from a checkpoint of epoch k made them in epoch k, so from
    epoch 2 on a resumed run trained on other batches than the run it continued (losses 0.03-0.1
    apart ten updates after a resume in epoch 2, fairseq's lstm as ours). Where the batches are
    reused across epochs (not ``--rebuild-batches``, a dataset that allows it, the iterator
    cache on), they are now made as in epoch 1, and the iterator and the dataset are then set to
    the epoch asked for; a resumed run trains on the same batches as the run it continues."""
    import inspect

    from fairseq.tasks.fairseq_task import FairseqTask

    signature = inspect.signature(FairseqTask.get_batch_iterator)

    @replaces(FairseqTask, "get_batch_iterator")
    def get_batch_iterator(original, self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # not a call of this signature: fairseq's own answer
            return original(self, *args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        epoch, dataset = given.get("epoch", 1), given["dataset"]
        reused = (not given.get("disable_iterator_cache") and not given.get("update_epoch_batch_itr")
                  and self.can_reuse_epoch_itr(dataset)
                  and not getattr(self.cfg, "rebuild_batches", False))
        if not reused or epoch <= 1 or dataset in getattr(self, "dataset_to_epoch_iter", {}):
            return original(self, *args, **kwargs)
        given["epoch"] = 1
        iterator = original(*bound.args, **bound.kwargs)
        dataset.set_epoch(epoch)
        iterator.epoch = epoch
        return iterator


def has_attention(model) -> bool:
    decoder = getattr(model, "decoder", None)
    return getattr(decoder, "attention", True) is not None


def _warn_no_alignment(owner) -> None:
    if not getattr(owner, "_s2s_warned", False):
        logger.warning("--print-alignment: a model without attention (rnn_vanilla) has no "
                       "alignment; A- lines will be empty")
        owner._s2s_warned = True


def empty_alignments_without_attention() -> None:
    from fairseq.sequence_generator import SequenceGenerator, SequenceGeneratorWithAlignment
    from fairseq.sequence_scorer import SequenceScorer

    @replaces(SequenceGeneratorWithAlignment, "generate")
    def generate(original, self, models, sample, **kwargs):
        if all(has_attention(m) for m in self.model.models):
            return original(self, models, sample, **kwargs)
        _warn_no_alignment(self)
        with torch.no_grad():  # as fairseq's generate
            finalized = SequenceGenerator._generate(self, sample, **kwargs)
        for hypos in finalized:
            for hypo in hypos:
                hypo["alignment"] = []
        return finalized

    @replaces(SequenceScorer, "generate")
    def score(original, self, models, sample, **kwargs):
        """--score-reference: the same rule. fairseq's scorer averaged the attention of the models
        that return some and added None for the others (a traceback, or with the model without
        attention first, half weights), and a vanilla model alone gave alignment None, which
        fairseq-generate cannot print. The scores are fairseq's."""
        if all(has_attention(m) for m in models):
            return original(self, models, sample, **kwargs)
        if self.compute_alignment:
            _warn_no_alignment(self)
        decoders = [m.decoder for m in models if hasattr(getattr(m, "decoder", None), "need_attn")]
        asked = [d.need_attn for d in decoders]
        for d in decoders:  # no model returns attention, so none is averaged
            d.need_attn = False
        try:
            hypos = original(self, models, sample, **kwargs)
        finally:
            for d, need in zip(decoders, asked):
                d.need_attn = need
        for hypo in (h for hs in hypos for h in hs):
            hypo["attention"] = None
            hypo["alignment"] = [] if self.compute_alignment else None
        return hypos


def alignment_loss_needs_attention() -> None:
    """--criterion label_smoothed_cross_entropy_with_alignment (guided alignment: a loss on the
    attention weights at given alignment links, with --load-alignments) read the attention of a
    model that returns none in training: rnn_vanilla stopped with "'NoneType' object has no
    attribute 'shape'" (fairseq's lstm with "'NoneType' object is not subscriptable"). Now one
    error; models with attention are unchanged (their attention is in the coordinates of the
    padded source, as fairseq's alignments are)."""
    from fairseq.criterions.label_smoothed_cross_entropy_with_alignment import (
        LabelSmoothedCrossEntropyCriterionWithAlignment as Criterion,
    )

    from .errors import ConfigError

    @replaces(Criterion, "compute_alignment_loss")
    def compute_alignment_loss(original, self, sample, net_output):
        attn = net_output[1].get("attn") if isinstance(net_output[1], dict) else None
        if (attn[0] if isinstance(attn, list) and attn else attn) is None:
            raise ConfigError("--criterion label_smoothed_cross_entropy_with_alignment puts a loss "
                              "on the attention, and this model returns none in training "
                              "(rnn_vanilla has no attention): use label_smoothed_cross_entropy")
        return original(self, sample, net_output)


def bleu_of_empty_hypotheses() -> None:
    """--eval-bleu: fairseq's translation task logs BLEU statistics, and BLEU derived from their
    sums, only for a validation batch whose hypotheses hold at least one token (``max(totals) >
    0``); its reduce_metrics runs once per validation batch. A model early in training ends many
    hypotheses at once (rnn_luong_tiny after 20 updates). Where every batch was empty, the valid
    line lacked bleu and with --best-checkpoint-metric bleu fairseq-train died with ``KeyError:
    'bleu'``. An empty batch now adds its statistics too (no matches, its references' length),
    and bleu is derived from the sums of the whole validation: 0 where no hypothesis holds a
    token (as sacrebleu scores empty hypotheses), else fairseq's BLEU of all batches (the empty
    ones' references count in the brevity penalty, as in one batch)."""
    import numpy as np
    from fairseq.logging import metrics
    from fairseq.tasks.translation import EVAL_BLEU_ORDER, TranslationTask

    @replaces(TranslationTask, "reduce_metrics")
    def reduce_metrics(original, self, logging_outputs, criterion):
        original(self, logging_outputs, criterion)
        # training's logging outputs go through here too, without BLEU statistics: left alone
        if not getattr(self.cfg, "eval_bleu", False) or not any(
                "_bleu_totals_0" in log for log in logging_outputs):
            return
        totals = [sum(log.get(f"_bleu_totals_{i}", 0) for log in logging_outputs)
                  for i in range(EVAL_BLEU_ORDER)]
        if max(float(t) for t in totals) > 0:
            return  # fairseq logged the batch's statistics and derives bleu from their sums
        metrics.log_scalar("_bleu_counts", np.zeros(EVAL_BLEU_ORDER, dtype=np.int64))
        metrics.log_scalar("_bleu_totals", np.zeros(EVAL_BLEU_ORDER, dtype=np.int64))
        for key in ("_bleu_sys_len", "_bleu_ref_len"):
            metrics.log_scalar(key, sum(float(log.get(key, 0)) for log in logging_outputs))
        metrics.log_derived("bleu", bleu_of_sums)  # where fairseq's is not there already


def bleu_of_sums(meters) -> float:
    """BLEU of the validation's summed statistics, as fairseq's translation task computes it
    (sacrebleu, exponential smoothing, two decimals); 0 where no hypothesis holds a token."""
    from sacrebleu.metrics import BLEU

    if not max(float(t) for t in meters["_bleu_totals"].sum) > 0:
        return 0.0
    bleu = BLEU.compute_bleu(correct=meters["_bleu_counts"].sum, total=meters["_bleu_totals"].sum,
                             sys_len=int(meters["_bleu_sys_len"].sum),
                             ref_len=int(meters["_bleu_ref_len"].sum), smooth_method="exp")
    return round(bleu.score, 2)


def beam_search_keeps_sentence_runs() -> None:
    """fairseq's SequenceGenerator runs inside ``encoder.sentence_runs()`` (see the module
    docstring): our encoders then reorder without reading the order on the host."""
    from fairseq.sequence_generator import SequenceGenerator

    from . import encoder

    @replaces(SequenceGenerator, "_generate")
    def _generate(original, self, *args, **kwargs):
        with encoder.sentence_runs():
            return original(self, *args, **kwargs)


def _arch_in_argv(argv):
    """The architecture named on the command line, as argparse accepts it: ``--arch X``,
    ``--arch=X`` or ``-a X``; None without one."""
    for i, arg in enumerate(argv):
        if arg in ("--arch", "-a") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--arch="):
            return arg.split("=", 1)[1]
    return None


def model_options_in_help(model_cls, argv=None) -> None:
    """``fairseq-train --arch rnn_bahdanau --help`` printed fairseq's general options only: its
    first parse handles --help before the model's options are added. When help is asked for
    with one of our architectures (``argv``, the command line by default), the parser that has
    --arch gets the model options first (every field of RNNS2SConfig, with its help and the
    architecture's value); without --help, or with another architecture, nothing changes."""
    argv = sys.argv[1:] if argv is None else argv
    if not {"-h", "--help"} & set(argv):
        return
    from fairseq.models import ARCH_MODEL_REGISTRY

    if ARCH_MODEL_REGISTRY.get(_arch_in_argv(argv)) is not model_cls:
        return
    @replaces(argparse.ArgumentParser, "parse_known_args")
    def parse_known_args(original, self, args=None, namespace=None):
        if not getattr(self, "_s2s_help", False) and any(a.dest == "arch" for a in self._actions):
            self._s2s_help = True
            group = self.add_argument_group("Model-specific configuration (fairseq_s2s_attn)",
                                            argument_default=argparse.SUPPRESS)
            model_cls.add_args(group)
            _show_arch_values(group, _arch_in_argv(argv))
        return original(self, args, namespace)


def _show_arch_values(group, arch: str) -> None:
    """Each option's help ends with the value the architecture gives it ("(rnn_bahdanau: true)"),
    where it said the dataclass default ("(default: false)" for --coverage, which rnn_bahdanau
    turns on) or nothing."""
    import re

    from fairseq.models import ARCH_CONFIG_REGISTRY

    values = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](values)
    for action in group._group_actions:
        if action.help in (None, argparse.SUPPRESS) or not hasattr(values, action.dest):
            continue
        value = getattr(values, action.dest)
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        shown = shown.replace("%", "%%")
        if "(default: " in action.help:
            action.help = re.sub(r"\(default: [^;)]*", f"({arch}: {shown}", action.help, count=1)
        else:
            action.help = f"{action.help} ({arch}: {shown})"


def _our_error(exc, kind):
    """exc if it is one of our errors, or ours if fairseq caught it and raised its own instead
    (the trainer turns any failure of load_state_dict into "Cannot load model parameters from
    checkpoint X; please ensure that the architectures match")."""
    if isinstance(exc, kind):
        return exc
    inner = exc.__cause__ or exc.__context__
    return inner if type(exc) is Exception and isinstance(inner, kind) else None


# exceptions fairseq raises itself to refuse options or input (``assert cond, "message"``,
# ``raise ValueError(...)``, "Dataset not found"), when raised in fairseq's own code; and its
# ``raise ImportError("Please install sacremoses ...")`` for an option's missing package
# (--tokenizer moses, --bpe subword_nmt, --scoring wer), not a failing import statement
FAIRSEQ_CHECKS = (AssertionError, ValueError, FileNotFoundError, ImportError)
# fairseq's command-line tools (a program that imports the plugin, such as the hub, is left alone)
COMMANDS = ("train", "generate", "interactive", "validate", "hydra_train", "preprocess", "score",
            "eval_lm")
_FAIRSEQ_DIRS = tuple(os.sep + d + os.sep for d in ("fairseq", "fairseq_cli"))


def fairseq_check_message(exc, tb) -> Optional[str]:
    """The message of a check fairseq made itself (an ``assert`` or ``raise`` statement in
    fairseq's own code, with a message), or None for anything else: raised in torch, numpy or the
    plugin, by Python inside fairseq (an unpacking error, a bug), or without a message; those
    keep their traceback."""
    message = " ".join(str(exc).split())
    if not isinstance(exc, FAIRSEQ_CHECKS) or not message or tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename
    if where.startswith("fairseq" + os.sep) and where.endswith(".pyx"):
        # fairseq's Cython modules (batching: "Sentences lengths should not exceed max_tokens=N"),
        # named by a relative path, without source: an AssertionError there is an assert
        return message if isinstance(exc, AssertionError) else None
    if not any(d in where for d in _FAIRSEQ_DIRS) or "fairseq_s2s_attn" in where:
        return None
    if not isinstance(_statement_at(where, tb.tb_lineno), (ast.Assert, ast.Raise)):
        return None
    return message


def missing_task_message(exc, tb) -> Optional[str]:
    """fairseq-validate has no default --task (fairseq-train and -generate default to
    translation): without one, fairseq's ``parse_args_and_arch`` looked up ``TASK_REGISTRY[None]``
    and the command died with ``KeyError: None`` under a traceback. The message for that error,
    raised in fairseq/options.py; None for anything else."""
    if not isinstance(exc, KeyError) or exc.args != (None,) or tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    if not tb.tb_frame.f_code.co_filename.endswith(os.path.join("fairseq", "options.py")):
        return None
    return "no --task given, and this command has no default task (for these models: --task translation)"


def missing_value_message(exc) -> Optional[str]:
    """An option that fairseq's configuration requires with the ones given and that has no value
    (``--bpe sentencepiece`` without ``--sentencepiece-model``): omegaconf raised
    MissingMandatoryValue under a traceback of ~20 lines through fairseq and omegaconf. The
    option to give, or None for any other exception."""
    try:
        from omegaconf.errors import MissingMandatoryValue
    except ImportError:
        return None
    key = getattr(exc, "key", None) if isinstance(exc, MissingMandatoryValue) else None
    if not isinstance(key, str) or not key:
        return None
    full = getattr(exc, "full_key", None) or key
    return f"--{key.replace('_', '-')} is required with these options and has no value ({full})"


def path_error_message(exc) -> Optional[str]:
    """The system's refusal of a path (an ``--input`` that does not exist, a ``--save-dir`` or
    ``--results-path`` under a file, a folder without write permission): "PATH: REASON", as
    Python's own OSError says it after "[Errno N]", or None for any other exception. fairseq's
    commands let these end in a traceback through fairseq or the standard library (os.makedirs,
    fileinput)."""
    if isinstance(exc, OSError) and exc.errno and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return None


def _statement_at(filename: str, lineno: int):
    """The innermost statement of the file that spans line lineno (an assert over several lines
    reports the line of its failing condition), or None."""
    try:
        tree = ast.parse("".join(linecache.getlines(filename)))
    except SyntaxError:
        return None
    found = None
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and node.lineno <= lineno <= (node.end_lineno or node.lineno):
            if found is None or node.lineno >= found.lineno and node.end_lineno <= found.end_lineno:
                found = node
    return found


def one_line_error(exc, tb) -> Optional[str]:
    """What an uncaught exception prints after "PROG: error: ", or None where it keeps its
    traceback: our errors (S2SError), and in fairseq's commands, unless S2S_TRACEBACK is set,
    fairseq's own checks, an option required without a value, and the system's refusal of a
    path."""
    from .errors import S2SError

    ours = _our_error(exc, S2SError)
    if ours is None:
        # fairseq refuses options with assert statements and plain exceptions: the message
        # came at the end of a traceback of 10-30 lines through fairseq
        if os.environ.get("S2S_TRACEBACK") or not running_fairseq_command(*COMMANDS):
            return None
        missing = missing_task_message(exc, tb)
        if missing is not None:
            return missing
        check = fairseq_check_message(exc, tb)
        if check is None:
            return missing_value_message(exc) or path_error_message(exc)
        return f"{check} (fairseq's check; S2S_TRACEBACK=1 shows where)"
    message = str(ours)
    if ours is not exc:  # keep the part of fairseq's message that names the file
        message = f"{message} ({str(exc).split(';')[0].strip()})"
    return message


def clean_error_exit() -> None:
    """An uncaught exception ended fairseq's commands with a traceback through fairseq, the
    message on its last line. ``sys.excepthook`` now prints "PROG: error: MESSAGE" for what
    ``one_line_error`` accepts (our errors; in fairseq's commands, unless S2S_TRACEBACK is set,
    fairseq's own checks, a required option without a value and the system's refusal of a path);
    anything else goes to the previous hook, with its traceback."""
    @replaces(sys, "excepthook")
    def hook(previous, exc_type, exc, tb):
        line = one_line_error(exc, tb)
        if line is None:
            return previous(exc_type, exc, tb)
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq"
        print(f"{prog}: error: {line}", file=sys.stderr)


def stop_batch_threads_at_exit(grace_s: float = 30.0) -> None:
    """Stops fairseq's background batch threads before the interpreter shuts down (see above).

    Each thread stops before making its next batch; one in the middle of a batch finishes it
    (the queue is drained so it is never blocked on a full one), for at most ``grace_s``."""
    from fairseq.data import iterators

    if getattr(iterators.BackgroundConsumer, "_s2s", False):
        return
    stopping = threading.Event()
    threads = weakref.WeakSet()

    def until_exit(source):
        items = iter(source)
        while not stopping.is_set():  # checked before each batch is made
            try:
                item = next(items)
            except StopIteration:
                return
            yield item

    class BackgroundConsumer(iterators.BackgroundConsumer):
        _s2s = True

        def __init__(self, queue_, source, max_len, cuda_device):
            super().__init__(queue_, until_exit(source), max_len, cuda_device)
            threads.add(self)

    def stop_all():
        stopping.set()
        deadline = time.monotonic() + grace_s
        for thread in list(threads):
            while thread.is_alive() and time.monotonic() < deadline:
                try:
                    while True:
                        thread._queue.get_nowait()
                except queue.Empty:
                    pass
                thread.join(0.01)

    iterators.BackgroundConsumer = BackgroundConsumer
    atexit.register(stop_all)


def install(model_cls) -> None:
    clean_error_exit()
    commands_log_as_fairseq_meant()
    quiet_fairseq_warnings()
    model_options_in_help(model_cls)
    set_thread_defaults()
    interactive_batches_get_batch_threads()
    limit_primitive_cache_in_training()
    keep_freed_memory()
    keep_remainder_batches()
    numpy_2_names()
    first_batch_of_a_prefetching_dataset()
    resumed_epochs_keep_their_batches()
    empty_alignments_without_attention()
    alignment_loss_needs_attention()
    bleu_of_empty_hypotheses()
    beam_search_keeps_sentence_runs()
    stop_batch_threads_at_exit()
