"""Helpers for tests that run fairseq's command-line tools as a user would."""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

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


class ForkServer:
    """tests/forkserver.py, started on first use by this test process: runs fairseq's commands
    with torch and fairseq already imported (see there). One command at a time."""

    SCRIPT = Path(__file__).with_name("forkserver.py")
    # variables that `import torch, fairseq` does not read: they may differ from the server's
    # (the child runs under the command's own environment): pytest's per-test variable, those
    # inductor sets when it first compiles in a test process, and the plugin's own (imported in
    # the child)
    LATE_READ = ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_", "_TORCHINDUCTOR_", "S2S_")

    def __init__(self):
        self.env = env()
        self.lock = threading.Lock()
        self.commands = 0  # run by this server
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, str(self.SCRIPT), str(req_r), str(rep_w)], env=self.env,
            pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.close(req_r)
        os.close(rep_w)
        self.requests = os.fdopen(self.req_w, "w")
        self.pending = b""  # read from the reply pipe, not yet taken
        if self._reply(600) != {"ready": True}:
            raise RuntimeError("tests/forkserver.py did not start")

    def serves(self, environ: Dict[str, str]) -> bool:
        strip = lambda e: {k: v for k, v in e.items() if not k.startswith(self.LATE_READ)}  # noqa: E731
        return self.proc.poll() is None and strip(environ) == strip(self.env)

    def close(self) -> None:
        """Ends the server (it exits when its request pipe closes)."""
        self.requests.close()
        os.close(self.rep_r)
        self.proc.wait()

    def _reply(self, timeout: float) -> Optional[dict]:
        """The server's next reply, None after timeout seconds or at its end. Read from the pipe's
        file descriptor into ``pending``: both replies of a quick command can arrive in one read,
        and a buffered file object would keep the second where select() cannot see it."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.rep_r], [], [], left)[0]:
                return None
            chunk = os.read(self.rep_r, 65536)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, cmd: List[str], cwd, environ: Dict[str, str], input: Optional[str],
            timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="forked-") as tmp:
            files = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")}
            Path(files["stdin"]).write_text(input or "")
            self.requests.write(json.dumps(dict(files, argv=cmd, cwd=str(cwd), env=environ)) + "\n")
            self.requests.flush()
            self.commands += 1
            started = self._reply(60)
            if started is None:
                raise RuntimeError(f"tests/forkserver.py ended (exit code {self.proc.poll()})")
            pid = started["pid"]
            done = self._reply(timeout)
            if done is None:
                os.kill(pid, signal.SIGKILL)
                self._reply(60)
            out, err = (Path(files[name]).read_text(errors="replace") for name in ("stdout", "stderr"))
            if done is None:
                raise subprocess.TimeoutExpired(cmd, timeout, out, err)
            return subprocess.CompletedProcess(cmd, done["returncode"], out, err)


_FORK_SERVER: List[ForkServer] = []


def _fork_server(environ: Dict[str, str]) -> Optional[ForkServer]:
    """This process's fork server if it can run a command under environ now, else None. A server
    started under another default environment (a test changed os.environ) is replaced."""
    if os.environ.get("S2S_TEST_FORKSERVER", "1") == "0":
        return None
    if (not _FORK_SERVER or _FORK_SERVER[0].proc.poll() is not None
            or environ == env() and not _FORK_SERVER[0].serves(environ)):
        if _FORK_SERVER:
            _FORK_SERVER[0].close()
        _FORK_SERVER[:] = [ForkServer()]
    server = _FORK_SERVER[0]
    return server if server.serves(environ) else None


def run(tool: str, *args, check: bool = True, cwd=None, input: str = None, timeout: int = 600,
        show_warnings: bool = False):
    """Runs a fairseq CLI tool (fairseq-train, ...) or a script from scripts/; returns the process.
    Warnings are silenced unless show_warnings (for tests of what a user sees on stderr).
    fairseq's tools run in a child of this process's fork server when the environment allows
    (tests/forkserver.py), else, like scripts, as a plain subprocess."""
    if tool.endswith(".py"):
        cmd = [sys.executable, str(SCRIPTS / tool)]
    else:
        cmd = [str(BIN / tool)]
    cmd += [str(a) for a in args]
    environ = env(show_warnings)
    server = _fork_server(environ) if tool.startswith("fairseq-") else None
    if server is not None and server.lock.acquire(blocking=False):
        try:
            proc = server.run(cmd, cwd or REPO, environ, input, timeout)
        finally:
            server.lock.release()
    else:
        proc = subprocess.run(cmd, cwd=cwd or REPO, env=environ, capture_output=True, text=True,
                              input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
            f"--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc


def one_error_line(proc, *needles) -> str:
    """The command failed with a single 'error:' line (containing needles) and no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert str(needle) in errors[0], errors[0]
    return errors[0]


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
