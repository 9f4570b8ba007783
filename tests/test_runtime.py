"""Run-time fixes of fairseq behaviour (fairseq_s2s_attn/runtime.py) that the other test files do
not cover through the command line."""

import os
import subprocess
import sys
import textwrap

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
    monkeypatch.delenv(var, raising=False)
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


def test_fairseq_train_runs_with_the_capped_cache(small_data_bin, tmp_path, monkeypatch):
    from clitools import REPO, run

    from fairseq_s2s_attn import runtime
    monkeypatch.delenv(runtime.ONEDNN_CACHE_VAR, raising=False)

    proc = run("fairseq-train", small_data_bin, "--user-dir", REPO / "fairseq_s2s_attn",
               "--arch", "rnn_bahdanau_tiny", "--cpu-bf16", "--optimizer", "adam", "--lr", "0.005",
               "--max-tokens", 1000, "--max-update", 2, "--save-dir", tmp_path, "--no-progress-bar",
               "--cpu", "--disable-validation")
    assert "oneDNN keeps 16 compiled primitives" in proc.stderr + proc.stdout
