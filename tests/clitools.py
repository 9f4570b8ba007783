"""Helpers for tests that run fairseq's command-line tools as a user would."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = REPO / "scripts"


def env(show_warnings: bool = False) -> Dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    if show_warnings:  # as a user's shell has it: Python's default warning filters
        e.pop("PYTHONWARNINGS", None)
    else:
        e["PYTHONWARNINGS"] = "ignore"
    return e


def run(tool: str, *args, check: bool = True, cwd=None, input: str = None, timeout: int = 600,
        show_warnings: bool = False):
    """Runs a fairseq CLI tool (fairseq-train, ...) or a script from scripts/; returns the process.
    Warnings are silenced unless show_warnings (for tests of what a user sees on stderr)."""
    if tool.endswith(".py"):
        cmd = [sys.executable, str(SCRIPTS / tool)]
    else:
        cmd = [str(BIN / tool)]
    cmd += [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=env(show_warnings), capture_output=True,
                          text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
            f"--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc


def make_reverse_data(root: Path, train: int, max_len: int, vocab: int, seed: int = 1,
                      valid: int = 100, test: int = 100) -> Path:
    """Synthetic reversal corpus, binarised with fairseq-preprocess; returns the data-bin."""
    raw, bin_dir = root / "raw", root / "data-bin"
    run("make_synthetic.py", "--task", "reverse", "--out", raw, "--train", train, "--valid", valid,
        "--test", test, "--max-len", max_len, "--vocab", vocab, "--seed", seed)
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
        "--destdir", bin_dir, "--workers", 1)
    return bin_dir


def parse_generate(stdout: str) -> Dict[str, Dict[int, str]]:
    """fairseq-generate output lines (S-, T-, H-, D-, P-, A-) by kind and sentence id."""
    out: Dict[str, Dict[int, str]] = {k: {} for k in "STHDPA"}
    for line in stdout.splitlines():
        if len(line) > 2 and line[0] in out and line[1] == "-":
            head, _, rest = line.partition("\t")
            kind, sid = head.split("-", 1)
            if not sid.isdigit():
                continue
            if kind in "HD":  # score \t text
                rest = rest.partition("\t")[2]
            out[kind][int(sid)] = rest
    return out


def read_lines(path: Path) -> List[str]:
    return path.read_text(encoding="utf-8").splitlines()


def make_spm_model(path: Path) -> Path:
    """A small sentencepiece model (path, ending in .model) of Russian text: a model of another
    corpus and language for the tests' data (only its digits are shared)."""
    import sentencepiece

    text = path.with_suffix(".txt")
    text.write_text("".join(f"Другое предложение номер {i} со словами.\n" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(path.with_suffix("")), vocab_size=60, minloglevel=2,
        hard_vocab_limit=False)
    return path
