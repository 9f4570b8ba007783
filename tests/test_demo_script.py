"""scripts/demo.sh's reuse of earlier steps, with its data step stubbed (no gettext corpus, no
training): a finished training is reused only on the data-bin it was trained on."""

import os
import subprocess
import sys

from clitools import REPO, SCRIPTS


def run_demo(tmp_path, work):
    """demo.sh with a python whose prepare_data.py call does nothing (the data-bin is given)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\n[ "$(basename "$1")" = prepare_data.py ] && exit 0\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = dict(os.environ, VENV=str(venv), DEMO_WORK=str(work), DEMO_ARCH="rnn_bahdanau_tiny")
    return subprocess.run(["bash", str(SCRIPTS / "demo.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_finished_training_is_reused_only_on_its_data_bin(tmp_path):
    """A second `make demo` with another DEMO_VOCAB rebuilt the data-bin, said "reusing the finished
    training", printed the old scores (hyp.txt was newer than the checkpoint) and died in the plots
    on the dictionary sizes."""
    work = tmp_path / "work"
    (work / "data-bin").mkdir(parents=True)
    stamp = work / "data-bin" / ".stamp.json"
    stamp.write_text('{"inputs": {"train.en": "1111"}}\n')
    ckpt = work / "checkpoints" / "rnn_bahdanau_tiny"
    ckpt.mkdir(parents=True)
    trained_on = subprocess.run(["sha1sum"], input=stamp.read_bytes(), capture_output=True).stdout.split()[0]
    (ckpt / ".done").write_bytes(trained_on + b"\n")
    proc = run_demo(tmp_path, work)
    assert "reusing the finished training" in proc.stdout  # the same data-bin (later steps fail here)

    stamp.write_text('{"inputs": {"train.en": "2222"}}\n')  # rebuilt from other pieces
    proc = run_demo(tmp_path, work)
    assert proc.returncode == 1 and "reusing" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {ckpt} was trained on another "
        f"data-bin than {work}/data-bin (DEMO_VOCAB or the data changed since): move or delete "
        f"{ckpt} to train on this one")
    assert not (work / "results" / "rnn_bahdanau_tiny" / "train.log").exists()

    (ckpt / ".done").write_text("")  # written by an earlier version: the data is unknown, reused
    assert "reusing the finished training" in run_demo(tmp_path, work).stdout
