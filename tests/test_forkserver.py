"""tests/forkserver.py: a fairseq command run by the fork server gives what a plain subprocess gives
(exit code, stdout, stderr, files), times out like one, and leaves other environments alone."""

import os
import re
import subprocess

import pytest

import clitools
from clitools import REPO, run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("S2S_TEST_FORKSERVER", "1") == "0",
                                 reason="S2S_TEST_FORKSERVER=0: every command a plain subprocess")]

PLUGIN = str(REPO / "fairseq_s2s_attn")


def plain(tool, *args, **kwargs):
    """The same command as a plain subprocess (S2S_TEST_FORKSERVER=0)."""
    os.environ["S2S_TEST_FORKSERVER"] = "0"
    try:
        return run(tool, *args, **kwargs)
    finally:
        del os.environ["S2S_TEST_FORKSERVER"]


def server():
    """This test process's fork server (started if need be)."""
    started = clitools._fork_server(clitools.env())
    assert started is not None
    return started


def same_output(forked, fresh):
    clock = re.compile(r"\d\d:\d\d:\d\d(,\d+)?|\d+\.\d+(\s+seconds|s\b)|time: \d+\.\d+")  # times
    assert forked.returncode == fresh.returncode
    assert clock.sub("", forked.stdout) == clock.sub("", fresh.stdout)
    assert clock.sub("", forked.stderr) == clock.sub("", fresh.stderr)


@pytest.mark.parametrize("tool,args", [
    # logging configured by fairseq-train before it imports fairseq: fairseq's format, stdout
    ("fairseq-train", ["/nonexistent", "--user-dir", PLUGIN, "--arch", "rnn_bahdanau"]),
    # configured by fairseq's own import (DEBUG, stderr), replaced by the plugin's set-up of the
    # command's own (runtime.commands_log_as_fairseq_meant), then an error from the plugin
    ("fairseq-generate", ["/nonexistent", "--user-dir", PLUGIN, "--path", "/nonexistent.pt"]),
])
def test_forked_command_prints_what_a_fresh_process_prints(tool, args):
    before = server().commands
    forked = run(tool, *args, check=False)
    assert server().commands == before + 1  # run by the server
    assert forked.returncode != 0 and (forked.stdout or forked.stderr)
    same_output(forked, plain(tool, *args, check=False))


def test_forked_preprocess_writes_the_same_files_and_log(tmp_path):
    raw = tmp_path / "raw"
    run("make_synthetic.py", "--task", "reverse", "--out", raw, "--train", 50, "--valid", 10,
        "--test", 10, "--max-len", 6, "--vocab", 8, "--seed", 3)
    before = server().commands
    outs = {}
    for name, runner in (("forked", run), ("fresh", plain)):
        dest = tmp_path / name
        outs[name] = runner("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
                            "--trainpref", raw / "train", "--validpref", raw / "valid",
                            "--destdir", dest, "--workers", 1)
        outs[name].stdout = outs[name].stdout.replace(str(dest), "DEST")
        outs[name].stderr = outs[name].stderr.replace(str(dest), "DEST")
    assert server().commands == before + 1
    same_output(outs["forked"], outs["fresh"])
    forked_files = sorted(p.name for p in (tmp_path / "forked").iterdir())
    assert forked_files == sorted(p.name for p in (tmp_path / "fresh").iterdir())
    for name in forked_files:
        if name != "preprocess.log":
            assert (tmp_path / "forked" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()


def test_forked_interactive_reads_its_input_and_translates_as_a_fresh_process(small_data_bin,
                                                                              tmp_path):
    """Standard input, a checkpoint trained by a forked fairseq-train, fairseq-interactive's
    logging (configured by fairseq's import) and its translations."""
    run("fairseq-train", small_data_bin, "--user-dir", PLUGIN, "--arch", "rnn_bahdanau_tiny",
        "--optimizer", "adam", "--lr", "0.005", "--max-tokens", 400, "--max-update", 4,
        "--save-dir", tmp_path, "--num-workers", 0, "--cpu", "--seed", 3)
    args = [small_data_bin, "--user-dir", PLUGIN, "--path", tmp_path / "checkpoint_last.pt",
            "--source-lang", "src", "--target-lang", "tgt", "--beam", 3, "--cpu",
            "--print-alignment"]
    text = "w1 w2 w3\nw4 w5\nw6\n"
    before = server().commands
    forked = run("fairseq-interactive", *args, input=text)
    assert server().commands == before + 1
    assert len([ln for ln in forked.stdout.splitlines() if ln.startswith("H-")]) == 3
    same_output(forked, plain("fairseq-interactive", *args, input=text))


def test_replies_that_arrive_together_are_each_taken():
    """A quick command's two replies (its pid, its exit code) can reach the pipe before the first
    is read: the second must not wait for a timeout (a buffered reader hid it from select)."""
    reader = clitools.ForkServer.__new__(clitools.ForkServer)  # only the reply pipe
    reader.rep_r, write_end = os.pipe()
    reader.pending = b""
    try:
        os.write(write_end, b'{"pid": 7}\n{"returncode": 2}\n')
        assert reader._reply(5) == {"pid": 7}
        assert reader._reply(0.01) == {"returncode": 2}
        assert reader._reply(0.01) is None  # nothing more yet
        os.close(write_end)
        assert reader._reply(5) is None  # the server's end
    finally:
        os.close(reader.rep_r)


def test_forked_command_times_out_and_the_server_goes_on(small_data_bin, tmp_path):
    args = [small_data_bin, "--user-dir", PLUGIN, "--arch", "rnn_bahdanau", "--cpu",
            "--max-tokens", 400, "--optimizer", "adam", "--save-dir", tmp_path, "--max-update", 100000, "--no-save", "--num-workers", 0]
    started = server()
    before = started.commands
    with pytest.raises(subprocess.TimeoutExpired):
        run("fairseq-train", *args, timeout=8)
    assert started.proc.poll() is None  # the child was killed, not the server
    assert run("fairseq-train", "--help").returncode == 0
    assert server() is started and started.commands == before + 2


def test_other_environments_run_as_plain_subprocesses_or_in_a_new_server(monkeypatch):
    started = server()
    threads = clitools.env()["OMP_NUM_THREADS"]
    assert started.serves(clitools.env())
    # warnings shown: the interpreter reads PYTHONWARNINGS at start; a plain subprocess
    assert not started.serves(clitools.env(show_warnings=True))
    before = started.commands
    assert "--user-dir" in run("fairseq-train", "--help", show_warnings=True).stdout
    assert started.commands == before and server() is started
    # variables read after the fork: the same server
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "another test")  # pytest's own
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/elsewhere")  # set by inductor's first compile
    assert started.serves(clitools.env()) and server() is started
    # the process's own environment changed where torch reads it: a server started under it
    monkeypatch.setenv("OMP_NUM_THREADS", str(int(threads) + 1))
    assert not started.serves(clitools.env())
    assert "--user-dir" in run("fairseq-train", "--help").stdout
    assert started.proc.poll() is not None  # ended
    assert server() is not started and server().commands == 1
    assert server().env["OMP_NUM_THREADS"] == str(int(threads) + 1)


def test_the_plugins_variables_reach_the_forked_command(monkeypatch, small_data_bin, tmp_path):
    """S2S_* variables are read by the plugin, which the child imports: it runs under them."""
    monkeypatch.setenv("S2S_TRACEBACK", "1")  # fairseq's own checks then show their traceback
    before = server().commands
    args = [small_data_bin, "--user-dir", PLUGIN, "--arch", "rnn_bahdanau", "--max-tokens", 400,
            "--save-dir", tmp_path, "--num-workers", 0]  # no --optimizer: fairseq's check
    forked = run("fairseq-train", *args, check=False)
    assert server().commands == before + 1
    assert "Traceback" in forked.stderr
    same_output(forked, plain("fairseq-train", *args, check=False))
