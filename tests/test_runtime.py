"""Run-time fixes of fairseq behaviour (fairseq_s2s_attn/runtime.py) that the other test files do
not cover through the command line."""

import os
import subprocess
import sys
import textwrap

import pytest
from clitools import env

# A process that takes one batch from fairseq's BufferedIterator and exits, as fairseq-train does
# when --max-update stops it mid-epoch. The batches are slow to make (many small torch ops, each
# releasing the GIL), so the background thread is inside torch when the main thread ends; an
# object cleared during interpreter shutdown runs Python code, so that thread gets the GIL while
# the interpreter is finalizing, which is when Python ends it with pthread_exit.
EXIT_MID_EPOCH = textwrap.dedent('''
    import sys, time, torch
    if sys.argv[1] == "plugin":
        import fairseq_s2s_attn  # noqa: F401
    from fairseq.data import iterators

    class Batches:
        def __len__(self):
            return 10 ** 6

        def __iter__(self):
            a = torch.randn(32, 32)
            while True:
                for _ in range(5000):
                    a = torch.tanh(a @ a)
                yield a

    class SlowTeardown:
        def __del__(self):
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                pass

    it = iterators.BufferedIterator(2, Batches())
    next(it)
    slow = SlowTeardown()
    print("took one batch", flush=True)
''')


def _run(script, mode):
    return subprocess.run([sys.executable, str(script), mode], env=env(), capture_output=True,
                          text=True, timeout=120)


def test_exit_with_a_batch_thread_in_torch_does_not_abort(tmp_path):
    script = tmp_path / "exit_mid_epoch.py"
    script.write_text(EXIT_MID_EPOCH)
    # stock fairseq: the batch thread is killed inside torch's C++ code and the process aborts
    # after its work is done (what made fairseq-train exit -6 in CI)
    plain = _run(script, "plain")
    assert "took one batch" in plain.stdout
    assert plain.returncode != 0 and "terminate called" in plain.stderr, (plain.returncode, plain.stderr)
    # with the plugin loaded the thread is stopped before shutdown
    for _ in range(3):
        fixed = _run(script, "plugin")
        assert fixed.returncode == 0, fixed.stderr[-2000:]
        assert "took one batch" in fixed.stdout
        assert "terminate called" not in fixed.stderr


def test_primitive_cache_is_capped_in_training_unless_the_user_chose(monkeypatch):
    from fairseq_s2s_attn import runtime

    var = runtime.ONEDNN_CACHE_VAR
    monkeypatch.setenv(var, "1")  # recorded: the variable is removed again after the test
    monkeypatch.delenv(var)
    assert not runtime.limit_primitive_cache_in_training(training=False)  # generate, interactive
    assert var not in os.environ
    assert runtime.limit_primitive_cache_in_training(training=True)
    assert os.environ[var] == str(runtime.TRAINING_PRIMITIVE_CACHE)
    monkeypatch.setenv(var, "500")  # the user's number stays
    assert not runtime.limit_primitive_cache_in_training(training=True)
    assert os.environ[var] == "500"
    monkeypatch.delenv(var)
    monkeypatch.setitem(sys.modules, "fairseq_cli.train", sys.modules[__name__])  # as in fairseq-train
    assert runtime.limit_primitive_cache_in_training()


@pytest.mark.parametrize("launch", ["console", "module"])
def test_fairseq_commands_run_with_the_plugins_defaults(small_data_bin, tmp_path, monkeypatch, launch):
    """fairseq-train, or ``python -m fairseq_cli.train`` (the module is __main__ there, not
    fairseq_cli.train), caps oneDNN's primitive cache and keeps freed memory for reuse;
    fairseq-generate keeps freed memory and leaves the cache alone."""
    from clitools import BIN, REPO, run

    from fairseq_s2s_attn import runtime
    monkeypatch.delenv(runtime.ONEDNN_CACHE_VAR, raising=False)
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)

    args = [small_data_bin, "--user-dir", REPO / "fairseq_s2s_attn", "--arch", "rnn_bahdanau_tiny",
            "--cpu-bf16", "--optimizer", "adam", "--lr", "0.005", "--max-tokens", 1000,
            "--max-update", 2, "--save-dir", tmp_path, "--no-progress-bar", "--cpu",
            "--disable-validation"]
    if launch == "console":
        proc = run("fairseq-train", *args)
    else:
        proc = subprocess.run([str(BIN / "python"), "-m", "fairseq_cli.train"] + [str(a) for a in args],
                              cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr + proc.stdout
    assert f"oneDNN keeps {runtime.TRAINING_PRIMITIVE_CACHE} compiled primitives" in log
    assert "freed memory is kept for reuse" in log
    if launch == "console":
        gen = run("fairseq-generate", small_data_bin, "--user-dir", REPO / "fairseq_s2s_attn",
                  "--path", tmp_path / "checkpoint_last.pt", "--beam", 2, "--max-len-b", 5, "--cpu")
        log = gen.stderr + gen.stdout
        assert "freed memory is kept for reuse" in log
        assert "oneDNN keeps" not in log


# Where glibc's malloc put a 64 MB block (mallinfo2: bytes in blocks mapped on their own, and free
# bytes kept in the heap) while it is allocated and after it is freed; with "apply" the plugin's
# training setting first; with "child" the same measured in a process started afterwards.
HEAP_PROBE = textwrap.dedent('''
    import ctypes, subprocess, sys
    import torch
    from fairseq_s2s_attn import runtime

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                    "usmblks", "fsmblks", "uordblks", "fordblks",
                                                    "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "apply":
        assert runtime.keep_freed_memory(command=True)
    if sys.argv[1] == "child":
        assert runtime.keep_freed_memory(command=True)
        sys.exit(subprocess.call([sys.executable, __file__, "measure"]))
    block = torch.ones(64 << 20, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd
    del block
    print(mapped >> 20, libc.mallinfo2().fordblks >> 20)
''')


def test_training_keeps_large_blocks_on_the_heap(tmp_path):
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    script = tmp_path / "heap_probe.py"
    script.write_text(HEAP_PROBE)
    clean = {k: v for k, v in env().items() if not k.startswith("MALLOC_")}

    def probe(mode):
        proc = subprocess.run([sys.executable, str(script), mode], env=clean, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        mapped_mb, free_kept_mb = map(int, proc.stdout.split())
        return mapped_mb, free_kept_mb

    # glibc's default: the block gets its own mapping, unmapped again when freed (page faults and
    # zeroed pages at every update)
    mapped_mb, free_kept_mb = probe("measure")
    assert mapped_mb >= 64 and free_kept_mb < 64
    # the training setting: from the heap, and kept there for the next update
    for mode in ("apply", "child"):
        mapped_mb, free_kept_mb = probe(mode)
        assert mapped_mb < 64 and free_kept_mb >= 64, mode


def test_allocator_settings_of_the_user_are_left_alone(monkeypatch):
    from fairseq_s2s_attn import runtime

    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert not runtime.keep_freed_memory(command=False)
    for name in runtime.HEAP_COMMANDS:  # this process runs none of fairseq's commands
        monkeypatch.delitem(sys.modules, f"fairseq_cli.{name}", raising=False)
    assert not runtime.keep_freed_memory()  # a program that imports the plugin
    for var, value in (("MALLOC_ARENA_MAX", "2"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=9"),
                       ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")):
        monkeypatch.setenv(var, value)
        assert not runtime.keep_freed_memory(command=True), var
        assert "MALLOC_MMAP_MAX_" not in os.environ
        monkeypatch.delenv(var)


@pytest.mark.parametrize("arch", ["rnn_vanilla_tiny", "rnn_luong_tiny"])
def test_alignment_loss_needs_a_model_with_attention(arch):
    """Guided alignment read the attention of rnn_vanilla, which has none: "'NoneType' object has
    no attribute 'shape'". Now one ConfigError; with attention, fairseq's loss as before."""
    import torch
    from fairseq.criterions.label_smoothed_cross_entropy_with_alignment import (
        LabelSmoothedCrossEntropyCriterionWithAlignment,
    )

    from conftest import FakeTask, build_model, make_dict, random_tokens
    from fairseq_s2s_attn.errors import ConfigError
    d = make_dict()
    model = build_model(arch, task=FakeTask(d, d))
    src = random_tokens(d, [5, 3], left_pad=True, generator=torch.Generator().manual_seed(1))
    tgt = random_tokens(d, [4, 4], left_pad=False, generator=torch.Generator().manual_seed(2))
    prev = torch.cat([tgt.new_full((2, 1), d.eos()), tgt[:, :-1]], 1)
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1),
                            "prev_output_tokens": prev},
              "target": tgt, "ntokens": int(tgt.ne(d.pad()).sum()), "nsentences": 2,
              # links (row of the B*T target positions, source column), as fairseq's collater
              "alignments": torch.tensor([[4, 0], [3, 1], [2, 6]]),
              "align_weights": torch.ones(3)}
    criterion = LabelSmoothedCrossEntropyCriterionWithAlignment(
        FakeTask(d, d), sentence_avg=False, label_smoothing=0.1, alignment_lambda=0.05)
    if arch == "rnn_vanilla_tiny":
        with pytest.raises(ConfigError, match="puts a loss on the attention"):
            criterion(model, sample)
    else:
        loss, _, logging = criterion(model, sample)
        assert torch.isfinite(loss) and logging["alignment_loss"] > 0


def test_only_fairseqs_own_checks_become_one_line(tmp_path):
    """The one-line form is for an assert or raise statement with a message in fairseq's own
    files (also its "Please install ..." ImportError for an option's package); others (torch's,
    the plugin's, also where the plugin lies inside a fairseq folder, Python's own error inside
    fairseq such as a failed unpacking or import, a bare assert, a KeyError, an exception other
    than fairseq's checks, such as a RuntimeError for a lack of memory) keep their traceback."""
    import importlib.util

    from fairseq_s2s_attn.runtime import fairseq_check_message

    source = textwrap.dedent("""
        def check():
            assert (
                1 > 2
            ), "min_len  cannot\\nbe larger"
        def missing():
            raise FileNotFoundError("Dataset not found: valid")
        def bare():
            assert 1 > 2
        def key():
            return {}["steps"]
        def bug():
            a, b = [1]
        def value():
            raise ValueError("x")
        def oom():
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        def package():
            try:
                import no_such_package_s2s
            except ImportError:
                raise ImportError(
                    "Please install no_such_package_s2s with: pip install it"
                )
        def broken_import():
            import no_such_package_s2s
    """)

    def module(*parts):
        path = tmp_path.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("m_" + "_".join(parts).replace(".", "_"), path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    def raised(fn):
        try:
            fn()
        except BaseException as e:
            return e, e.__traceback__

    fs = module("site-packages", "fairseq", "sequence_generator.py")
    assert fairseq_check_message(*raised(fs.check)) == "min_len cannot be larger"
    assert fairseq_check_message(*raised(fs.missing)) == "Dataset not found: valid"
    assert fairseq_check_message(*raised(fs.value)) == "x"
    # an option's missing package (--tokenizer moses: "Please install ..."), not a broken import
    assert fairseq_check_message(*raised(fs.package)) == \
        "Please install no_such_package_s2s with: pip install it"
    for fn in (fs.bare, fs.key, fs.bug, fs.oom, fs.broken_import):  # no message, not a check, Python's own error,
        assert fairseq_check_message(*raised(fn)) is None  # not one of FAIRSEQ_CHECKS' types
    for other in (("torch", "nn", "module.py"), ("fairseq_s2s_attn", "model.py"), ("mine.py",),
                  ("fairseq", "fairseq_s2s_attn", "m.py")):  # the plugin in a fairseq checkout
        assert fairseq_check_message(*raised(module(*other).value)) is None


def test_a_refused_path_is_one_line(tmp_path):
    """The system's refusal of a path becomes "PATH: REASON" (Python's OSError after its
    "[Errno N]"); other OSErrors, without a path or number, keep their traceback."""
    from fairseq_s2s_attn.runtime import path_error_message

    afile = tmp_path / "afile"
    afile.write_text("")
    for act, path, reason in [
        (lambda: open(tmp_path / "none.txt"), tmp_path / "none.txt", "No such file or directory"),
        (lambda: os.makedirs(afile / "ck"), afile / "ck", "Not a directory"),
    ]:
        with pytest.raises(OSError) as caught:
            act()
        assert path_error_message(caught.value) == f"{path}: {reason}"
    assert path_error_message(OSError("no file named")) is None
    assert path_error_message(FileNotFoundError("Dataset not found: valid")) is None
    assert path_error_message(ValueError("x")) is None


def test_a_required_option_without_a_value_is_one_line():
    from omegaconf import OmegaConf

    from fairseq_s2s_attn.runtime import missing_value_message

    cfg = OmegaConf.create({"bpe": {"_name": "sentencepiece", "sentencepiece_model": "???"}})
    with pytest.raises(Exception) as caught:
        cfg.bpe.sentencepiece_model
    assert missing_value_message(caught.value) == (
        "--sentencepiece-model is required with these options and has no value "
        "(bpe.sentencepiece_model)")
    assert missing_value_message(ValueError("Missing mandatory value: x")) is None


def _bleu_log(hypothesis_tokens, validation=True):
    """One logging output of fairseq's translation task with --eval-bleu: hypotheses holding
    ``hypothesis_tokens`` tokens (all but one n-gram of each order matching), references 5
    tokens; without ``validation``, training's (no BLEU statistics)."""
    from fairseq.tasks.translation import EVAL_BLEU_ORDER

    log = {"loss": 2.0, "nll_loss": 2.0, "ntokens": 5, "nsentences": 1, "sample_size": 5,
           "_bleu_sys_len": hypothesis_tokens, "_bleu_ref_len": 5}
    for i in range(EVAL_BLEU_ORDER if validation else 0):
        n = max(hypothesis_tokens - i, 0)
        log.update({f"_bleu_counts_{i}": max(n - 1, 0), f"_bleu_totals_{i}": n})
    return log


def _validation_bleu(*batches):
    """The values logged for one validation whose batches hold these logging outputs: the
    trainer calls the task's reduce_metrics once per batch, in one aggregation."""
    import argparse

    from fairseq.criterions.cross_entropy import CrossEntropyCriterion
    from fairseq.logging import metrics
    from fairseq.tasks.translation import TranslationTask

    import fairseq_s2s_attn  # noqa: F401  (installs the replacement)

    task = object.__new__(TranslationTask)
    task.cfg = argparse.Namespace(eval_bleu=True)
    with metrics.aggregate(new_root=True) as agg:
        for logs in batches:
            task.reduce_metrics(logs, object.__new__(CrossEntropyCriterion))
        return agg.get_smoothed_values()


def test_validation_with_empty_hypotheses_scores_bleu():
    """fairseq logged no bleu when every hypothesis was empty (a model early in training), and
    fairseq-train --best-checkpoint-metric bleu died with KeyError: 'bleu'; now 0. Where only some
    validation batches are empty, bleu is fairseq's of all batches, as if they were one (the
    plugin's first version logged a bleu of its own there: 0 for the whole validation when the
    first batch was empty, an AttributeError on fairseq's meter when a later one was)."""
    empty, full = _bleu_log(0), _bleu_log(9)
    assert _validation_bleu([empty])["bleu"] == 0
    assert _validation_bleu([empty], [empty])["bleu"] == 0
    own = _validation_bleu([empty, full])["bleu"]  # one batch: fairseq's own BLEU
    assert 0 < own < _validation_bleu([full])["bleu"] < 100  # the empty side's brevity penalty
    assert _validation_bleu([empty], [full])["bleu"] == own
    assert _validation_bleu([full], [empty])["bleu"] == own
    assert _validation_bleu([full], [full])["bleu"] == _validation_bleu([full, full])["bleu"]
    assert "bleu" not in _validation_bleu([_bleu_log(0, validation=False)])  # training: no bleu


def test_importing_the_plugin_leaves_logging_alone():
    """Importing fairseq ran logging.basicConfig(level=DEBUG) (fairseq.models.wav2vec.
    wav2vec2_classification): a program using the plugin (the hub, scripts/compare.py) then printed
    every library's DEBUG lines. A program's own configuration, before or after, still applies."""
    code = textwrap.dedent("""
        import logging, sys
        if sys.argv[1] == "configured":
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        import fairseq_s2s_attn
        root = logging.getLogger()
        print(logging.getLevelName(root.level), len(root.handlers))
        logging.getLogger("some.library").debug("a debug line")
    """)
    for how, expected in (("plain", "WARNING 0"), ("configured", "INFO 1")):
        proc = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                              env=env())
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split("\n")[0] == expected and "a debug line" not in proc.stderr


# fairseq-generate as its console script starts it: fairseq_cli.generate (and fairseq) imported,
# then the plugin (--user-dir); prints the root logger's set-up, then warns four times
COMMAND_LOGGING = textwrap.dedent("""
    import logging, sys, warnings
    if sys.argv[1] == "configured":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    import fairseq_cli.generate
    import fairseq_s2s_attn
    root = logging.getLogger()
    handler = root.handlers[0]
    print(logging.getLevelName(root.level), len(root.handlers), handler.stream is sys.stdout,
          handler.formatter._fmt, sep="|")
    warnings.warn("hydra.experimental.compose() is no longer experimental. Use hydra.compose()")
    warnings.warn("`torch.cuda.amp.autocast(args...)` is deprecated. Please use "
                  "`torch.amp.autocast('cuda', args...)` instead.", FutureWarning)
    warnings.warn("a warning of the program's own")
    warnings.warn("a FutureWarning of the program's own", FutureWarning)
""")


@pytest.mark.parametrize("how", ["plain", "configured", "warnings chosen"])
def test_fairseq_commands_log_as_they_configure_it(how):
    """In fairseq's commands that configure logging after importing fairseq, fairseq's import had
    configured it first (DEBUG, Python's format, stderr): the plugin sets up what the command
    meant (fairseq's format, INFO, stdout); a configuration made before is left alone. hydra's
    warnings about fairseq's use of its API and torch's FutureWarning about fairseq's
    torch.cuda.amp.autocast (every fairseq-train log) are not shown unless the user chose the
    warning filters (-W); other warnings are."""
    flags = ["-W", "default"] if how == "warnings chosen" else []
    proc = subprocess.run([sys.executable, *flags, "-c", COMMAND_LOGGING, how.split()[0]],
                          capture_output=True, text=True, env=env(show_warnings=True))
    assert proc.returncode == 0, proc.stderr[-2000:]
    level, handlers, on_stdout, fmt = proc.stdout.splitlines()[-1].split("|", 3)
    assert (level, handlers) == ("INFO", "1")
    if how == "configured":
        assert on_stdout == "False" and fmt == "%(message)s"
    else:
        assert on_stdout == "True" and fmt == "%(asctime)s | %(levelname)s | %(name)s | %(message)s"
    assert ("no longer experimental" in proc.stderr) == (how == "warnings chosen")
    assert ("torch.cuda.amp.autocast(args...)" in proc.stderr) == (how == "warnings chosen")
    assert "a warning of the program's own" in proc.stderr
    assert "a FutureWarning of the program's own" in proc.stderr


def env_without_thread_settings():
    """The tests' environment less what chooses threads (the tests set OMP_NUM_THREADS=1), so
    that a process started with it takes the plugin's defaults."""
    return {k: v for k, v in env().items()
            if k not in ("OMP_NUM_THREADS", "S2S_NUM_THREADS", "LOCAL_WORLD_SIZE")}


THREADS_CODE = """
import logging, os, sys, torch
logging.basicConfig(level=logging.INFO)
for name in sys.argv[1:]:
    __import__(name)
import fairseq_s2s_attn
from fairseq_s2s_attn import runtime
print(runtime.available_cores(), torch.get_num_threads())
"""


@pytest.mark.parametrize("commands, local, batches", [
    ((), None, False),  # the hub, a script: one sentence at a time
    (("fairseq_cli.interactive",), None, False),  # imports fairseq_cli.generate as well
    (("fairseq_cli.train",), None, True),
    (("fairseq_cli.generate",), None, True),
    (("fairseq_cli.validate",), None, True),
    (("fairseq_cli.hydra_train",), None, True),  # fairseq-hydra-train loads the plugin late
    (("fairseq_cli.train",), "2", True),  # one of torchrun's 2 processes on this machine
])
def test_thread_defaults_of_each_command(commands, local, batches):
    """torch's default is one intra-op thread per core. Commands that run batches of many
    sentences get an equal share of this process's cores, at most 4 (fairseq-train at 2 threads
    on 2 cores: the demo recipe 1.28x, fairseq-generate at batch 32 1.23x); the others one
    thread (fairseq-generate at batch 1 ran 0.83-0.95x as fast with 2). The tests' own
    environment sets OMP_NUM_THREADS=1, so each case runs in a process started without it, with
    fairseq's command modules imported first as the console scripts do."""
    from fairseq_s2s_attn import runtime

    clean = env_without_thread_settings()
    if local is not None:
        clean["LOCAL_WORLD_SIZE"] = local
    proc = subprocess.run([sys.executable, "-c", THREADS_CODE, *commands], env=clean,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cores, threads = map(int, proc.stdout.split()[-2:])
    expected = runtime.default_threads(cores, int(local or 1)) if batches else 1
    assert threads == expected, (commands, local, cores, threads)
    assert ("intra-op thread(s) per process" in proc.stderr) == batches


def test_hydra_train_command_gets_the_training_threads():
    """``python -m fairseq_s2s_attn.hydra_train`` loads the plugin before fairseq's training
    modules, so the command sets the training default itself (fairseq's hydra main replaced by
    one that prints the threads it would run with)."""
    from fairseq_s2s_attn import runtime

    code = ("import torch, fairseq_s2s_attn\n"
            "from fairseq_s2s_attn import runtime\n"
            "before = torch.get_num_threads()\n"
            "import fairseq_cli.hydra_train as h\n"
            "h.cli_main = lambda: print(runtime.available_cores(), before,\n"
            "                           torch.get_num_threads())\n"
            "from fairseq_s2s_attn.hydra_train import cli_main\n"
            "cli_main()\n")
    clean = env_without_thread_settings()
    proc = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cores, before, threads = map(int, proc.stdout.split()[-3:])
    assert before == 1 and threads == runtime.default_threads(cores), (cores, before, threads)


INTERACTIVE_CODE = """
import sys, types, torch
import fairseq_cli.interactive as interactive
interactive.main = lambda cfg: print(torch.get_num_threads())  # fairseq's main, as a probe
import fairseq_s2s_attn
from fairseq_s2s_attn import runtime
print(runtime.available_cores())
def cfg(buffer, batch, tokens=None):
    return types.SimpleNamespace(interactive=types.SimpleNamespace(buffer_size=buffer),
                                 dataset=types.SimpleNamespace(batch_size=batch, max_tokens=tokens))
interactive.main(cfg(1, None))        # fairseq-interactive's defaults: one sentence at a time
interactive.main(cfg(1000, 32))       # batches of 32
"""


def test_interactive_given_batches_gets_the_batch_threads():
    """fairseq-interactive keeps one thread for one sentence at a time; given batches
    (--buffer-size 1000 --batch-size 32: 1.35-1.39x as fast with 2 threads on 2 cores) it takes
    the batch commands' default when its main starts (fairseq's main replaced by a probe before
    the plugin loads, in a process started without the thread variables)."""
    from fairseq_s2s_attn import runtime

    clean = env_without_thread_settings()
    proc = subprocess.run([sys.executable, "-c", INTERACTIVE_CODE], env=clean,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # fairseq-interactive logs to stdout: the probe's lines are those with a number alone
    cores, one, batches = [int(x) for x in proc.stdout.splitlines() if x.strip().isdigit()]
    assert (one, batches) == (1, runtime.default_threads(cores)), (cores, one, batches)


def test_interactive_batch_size_from_its_options():
    from argparse import Namespace
    from types import SimpleNamespace as NS

    from fairseq_s2s_attn.runtime import interactive_batch

    def cfg(buffer, batch, tokens=None):
        return NS(interactive=NS(buffer_size=buffer),
                  dataset=NS(batch_size=batch, max_tokens=tokens))

    assert interactive_batch(cfg(1, None)) == 1  # fairseq-interactive's defaults
    assert interactive_batch(cfg(0, None)) == 1  # fairseq reads a buffer below 1 as 1
    assert interactive_batch(cfg(1000, 32)) == 32
    assert interactive_batch(cfg(8, 32)) == 8  # no more than the buffer holds
    assert interactive_batch(cfg(50, 1)) == 1
    assert interactive_batch(cfg(50, None)) == 1  # fairseq then sets --batch-size 1
    assert interactive_batch(cfg(1000, None, tokens=4000)) == 1000  # --max-tokens alone
    assert interactive_batch(Namespace(buffer_size=100, batch_size=16, max_tokens=None)) == 16


def test_default_threads_share_the_cores_up_to_four():
    from fairseq_s2s_attn.runtime import default_threads

    assert [default_threads(c) for c in (1, 2, 3, 4, 8, 64)] == [1, 2, 3, 4, 4, 4]
    assert [default_threads(c, 2) for c in (1, 2, 3, 4, 8, 64)] == [1, 1, 1, 2, 4, 4]
    assert default_threads(8, 0) == 4 and default_threads(0) == 1


def test_thread_choice_of_the_user_wins(monkeypatch):
    """OMP_NUM_THREADS (as torch read it) and the plugin's S2S_NUM_THREADS (that many, at least
    one, over OMP_NUM_THREADS) win over the defaults; without either, a command's default."""
    import torch

    from fairseq_s2s_attn import runtime

    previous = torch.get_num_threads()
    try:
        monkeypatch.delenv("S2S_NUM_THREADS", raising=False)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stays
        torch.set_num_threads(2)
        assert runtime.set_thread_defaults(batches=False) == 2
        monkeypatch.setenv("S2S_NUM_THREADS", "3")  # the plugin's own variable, over OMP_NUM_THREADS
        assert runtime.set_thread_defaults(batches=True) == 3
        monkeypatch.setenv("S2S_NUM_THREADS", "0")  # at least one
        assert runtime.set_thread_defaults() == 1
        monkeypatch.delenv("S2S_NUM_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(runtime, "available_cores", lambda: 6)
        torch.set_num_threads(2)
        assert runtime.set_thread_defaults(batches=False) == 1
        assert runtime.set_thread_defaults(batches=True) == 4
        assert runtime.set_thread_defaults(processes=2, batches=True) == 3
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun's processes on this machine
        assert runtime.set_thread_defaults(batches=True) == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "x")  # not a number: as if alone
        assert runtime.set_thread_defaults(batches=True) == 4
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("argv", [
    ["data-bin", "--arch", "rnn_bahdanau", "--help"],
    ["data-bin", "--arch=rnn_bahdanau", "-h"],
    ["data-bin", "-a", "rnn_bahdanau", "--help"],
])
def test_help_with_any_spelling_of_arch_lists_the_model_options(argv, monkeypatch):
    """fairseq-train's --help printed fairseq's general options only; with one of our
    architectures the model options are added first, whichever way argparse accepts --arch
    (``--arch X``, ``--arch=X``, ``-a X``). The parser is fairseq-train's own."""
    import argparse

    from fairseq import options

    from fairseq_s2s_attn import runtime
    from fairseq_s2s_attn.model import RNNS2SModel

    assert runtime._arch_in_argv(argv) == "rnn_bahdanau"
    assert runtime._arch_in_argv(["data-bin", "--arch"]) is None  # no value: fairseq's error
    # the replacement is installed for this parse only (monkeypatch undoes it)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args",
                        argparse.ArgumentParser.parse_known_args)
    runtime.model_options_in_help(RNNS2SModel, argv)
    parser = options.get_training_parser()
    args, _ = parser.parse_known_args(["data-bin", "--arch", "rnn_bahdanau"])
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["decoder_hidden_size"].startswith("decoder RNN hidden size (rnn_bahdanau: ")
    assert "(rnn_bahdanau: true;" in helps["coverage"]  # the architecture's value, not the default


USERS_PROGRAM = textwrap.dedent('''
    import fairseq_s2s_attn  # noqa: F401
    from fairseq.utils import FileContentsAction

    FileContentsAction(["--text"], "text", nargs=2)  # fairseq: raise ValueError("nargs not allowed")
''')


def test_fairseqs_checks_are_one_line_in_fairseqs_commands_only(tmp_path, monkeypatch):
    """Only fairseq's commands print fairseq's own checks as one ``error:`` line: in a user's
    program that imports the plugin (the hub, a script of theirs) an uncaught exception from
    fairseq keeps Python's traceback, which says where in their program it came from."""
    from fairseq_s2s_attn import runtime

    script = tmp_path / "mine.py"
    script.write_text(USERS_PROGRAM)
    proc = subprocess.run([sys.executable, str(script)], env=dict(env(), S2S_TRACEBACK=""),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):"), proc.stderr[-2000:]
    assert 'mine.py", line 5' in proc.stderr and proc.stderr.rstrip().endswith(
        "ValueError: nargs not allowed")
    assert "error:" not in proc.stderr

    # the same exception in fairseq-train: one line (unless S2S_TRACEBACK asks for the traceback)
    monkeypatch.delenv("S2S_TRACEBACK", raising=False)
    from fairseq.utils import FileContentsAction
    try:
        FileContentsAction(["--text"], "text", nargs=2)
    except ValueError as e:
        exc = e
    for name in runtime.COMMANDS:
        monkeypatch.delitem(sys.modules, f"fairseq_cli.{name}", raising=False)
    assert runtime.one_line_error(exc, exc.__traceback__) is None
    monkeypatch.setitem(sys.modules, "fairseq_cli.train", sys.modules[__name__])
    assert runtime.one_line_error(exc, exc.__traceback__) == (
        "nargs not allowed (fairseq's check; S2S_TRACEBACK=1 shows where)")
    monkeypatch.setenv("S2S_TRACEBACK", "1")
    assert runtime.one_line_error(exc, exc.__traceback__) is None


def test_exit_stops_a_batch_thread_blocked_on_a_full_queue(monkeypatch):
    """fairseq's batch thread, ahead of the training loop, waits on its full queue (put) when the
    run ends; at exit the plugin drains the queue so the thread can see that it must stop, rather
    than waiting out the grace period with the thread still alive (exit 9.4 s, 39.3 s without the
    drain, in the audit's run). The stop handler is installed afresh to call it directly."""
    import atexit
    import time

    from fairseq.data import iterators

    from fairseq_s2s_attn import runtime

    stock = next(c for c in iterators.BackgroundConsumer.__mro__ if "_s2s" not in vars(c))
    monkeypatch.setattr(iterators, "BackgroundConsumer", stock)
    handlers = []
    monkeypatch.setattr(atexit, "register", handlers.append)
    runtime.stop_batch_threads_at_exit(grace_s=20.0)
    (stop_all,) = handlers

    class Endless:
        def __len__(self):
            return 10 ** 9

        def __iter__(self):
            return iter(range(10 ** 9))

    it = iterators.BufferedIterator(2, Endless())
    assert next(it) == 0
    thread = it._consumer
    for _ in range(1000):  # the thread fills the queue, then waits in put
        if it._queue.full():
            break
        time.sleep(0.01)
    assert it._queue.full() and thread.is_alive()
    stop_all()
    assert not thread.is_alive()  # it ended, not left blocked for the process's shutdown


def test_the_last_batch_is_kept_whatever_its_size():
    """fairseq's batch_by_size dropped the last batch when its size was not a multiple of
    --required-batch-size-multiple (default 8): fairseq-generate skipped up to 7 sentences of a
    test set without a word. The tail is now one last batch."""
    import numpy as np
    from fairseq.data import data_utils

    import fairseq_s2s_attn  # noqa: F401  (installs the replacement)

    indices = np.arange(13)
    for limit in (dict(max_sentences=8), dict(max_tokens=40)):  # 8 sentences of 5 tokens a batch
        batches = data_utils.batch_by_size(indices, lambda i: 5, required_batch_size_multiple=8,
                                           **limit)
        assert [list(b) for b in batches] == [list(range(8)), list(range(8, 13))], limit
    stock = data_utils.batch_by_size.__wrapped__  # fairseq's: the 5 last sentences dropped
    assert [list(b) for b in stock(indices, lambda i: 5, max_sentences=8,
                                   required_batch_size_multiple=8)] == [list(range(8))]


def test_sentence_samples_of_a_language_model_on_numpy_2():
    """fairseq-train --task language_modeling --sample-break-mode eos (one sentence a sample, as
    for the language model of --lm-path) died loading the data on numpy 2: TokenBlockDataset
    asked for np.compat.long. Now each sample is one sentence, as numpy 1 made them."""
    import torch
    from fairseq.data import TokenBlockDataset

    import fairseq_s2s_attn  # noqa: F401  (installs the rewritten lines)

    sentences = [torch.tensor([5, 6, 2]), torch.tensor([7, 2]), torch.tensor([8, 9, 10, 2])]
    data = TokenBlockDataset(sentences, [3, 2, 4], block_size=None, pad=1, eos=2,
                             break_mode="eos")
    assert len(data) == 3 and list(data.sizes) == [3, 2, 4]
    assert all(torch.equal(data[i], s) for i, s in enumerate(sentences))


def test_batch_buckets_on_numpy_2():
    """--num-batch-buckets died at the data's loading on numpy 2 (fairseq's get_buckets passed
    numpy 1's interpolation=, LanguagePairDataset asked for np.compat.long). Now each sentence is
    padded to the smallest bucket length (the lower percentiles of the lengths) that holds it,
    and a batch's lengths are still the sentences' own."""
    import numpy as np
    import torch
    from fairseq.data import LanguagePairDataset, data_utils

    import fairseq_s2s_attn  # noqa: F401  (installs the rewritten lines)
    from conftest import make_dict

    g = torch.Generator().manual_seed(3)
    d = make_dict(10)
    lengths = torch.randint(1, 20, (40,), generator=g).tolist()
    src = [torch.randint(d.nspecial, len(d), (n,), generator=g) for n in lengths]
    tgt = [torch.randint(d.nspecial, len(d), (n + 1,), generator=g) for n in lengths]
    ordered = sorted(lengths)
    want = sorted({ordered[int(p / 100 * (len(lengths) - 1))] for p in (25, 50, 75, 100)})
    assert list(data_utils.get_buckets(np.array(lengths), 4)) == want
    data = LanguagePairDataset(src, np.array(lengths), d, tgt, np.array(lengths) + 1, d,
                               num_buckets=4)
    assert set(data.src_sizes) <= set(want)
    for i, n in enumerate(lengths):
        assert data.src_sizes[i] == min(b for b in want if b >= n)
    batch = data.collater([data[i] for i in range(8)])
    assert batch["net_input"]["src_lengths"].tolist() == sorted(lengths[:8], reverse=True)
    assert batch["net_input"]["src_tokens"].size(1) in want
