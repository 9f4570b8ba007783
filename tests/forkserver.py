"""A fork server for the tests' fairseq commands: pays Python's, torch's and fairseq's imports once.

Every fairseq command starts by importing torch and fairseq, ~4 s of a 5-7 s test command on a
2-core VM (fairseq alone imports every task, model and criterion it has, scikit-learn with them),
paid by each of the ~140 commands the suite runs. This process imports them once, then forks a
child per command: the child puts the command's files on its stdin, stdout and stderr, enters its
working directory and environment and runs the tool's own console script (``bin/fairseq-train``,
...) as ``__main__``, so the plugin is imported by ``--user-dir`` after fairseq, as in a shell, and
the child ends as a fresh interpreter would (exit code, traceback, atexit). fairseq's import-time
logging set-up is replayed where the command imports fairseq (``replay_at_first_import``). The
server reports the child's pid and then its exit status.

Only what ``import torch, fairseq`` sets up is shared, under the same environment: clitools.run
sends a command here only when its environment equals the one this server started with, apart
from variables read after the fork (``ForkServer.LATE_READ``: the plugin's S2S_* ones, pytest's,
inductor's); warnings shown or other thread counts run as a plain subprocess.
``S2S_TEST_FORKSERVER=0`` runs every command as a plain subprocess.

Protocol (one JSON object a line): request {argv, cwd, env, stdin, stdout, stderr} on the request
pipe; replies {"pid": n} when the child starts, then {"returncode": n} (-signal if killed).
"""

import builtins
import json
import logging
import os
import runpy
import sys


def import_fairseq() -> list:
    """Imports fairseq (and torch) with ``logging.basicConfig`` held back; returns the calls made.

    fairseq's modules configure the root logger as they are imported (wav2vec2_classification:
    level DEBUG; text_to_speech: fairseq's format), so a command's logging depends on whether it
    configures logging before importing fairseq (fairseq-train: its format, on stdout) or after
    (fairseq-preprocess, -generate, -interactive, -validate: fairseq's import wins; where the
    plugin is loaded, ``runtime.commands_log_as_fairseq_meant`` then replaces what that import set
    up, which it recognises). ``replay_at_first_import`` makes these calls in the child where the
    command's own import of fairseq would have."""
    calls = []
    original = logging.basicConfig
    logging.basicConfig = lambda *args, **kwargs: calls.append((args, kwargs))
    try:
        import fairseq  # noqa: F401
    finally:
        logging.basicConfig = original
    return calls


def replay_at_first_import(calls: list) -> None:
    """In the child: the held-back basicConfig calls, made when the command first imports fairseq
    (``import fairseq...`` / ``from fairseq... import``), as in a fresh interpreter."""
    real_import = builtins.__import__

    def first_fairseq_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == "fairseq" or name.startswith("fairseq.")):
            builtins.__import__ = real_import
            for args, kwargs in calls:
                logging.basicConfig(*args, **kwargs)
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = first_fairseq_import


def serve(requests, replies) -> dict:
    """Forks a child per request; returns the request in the child, exits the server at EOF."""
    calls = import_fairseq()

    def reply(obj):
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    reply({"ready": True})
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            replay_at_first_import(calls)
            return request
        reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        reply({"returncode": os.waitstatus_to_exitcode(status)})
    sys.exit(0)


def become(request: dict) -> None:
    """In the child: the command's standard streams, directory, environment and argv."""
    for fd, path, flags in ((0, request["stdin"], os.O_RDONLY),
                            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python script` sets it


if __name__ == "__main__":
    child_request = serve(os.fdopen(int(sys.argv[1]), "r"), os.fdopen(int(sys.argv[2]), "w"))
    become(child_request)
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except Exception as exc:  # as the interpreter reports it, without this file's and runpy's frames
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__,
                                                                    "<frozen runpy>"):
            tb = tb.tb_next
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)  # the hook prints __traceback__
        sys.exit(1)
