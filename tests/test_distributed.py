"""Data-parallel training on CPU processes (gloo), as docs/distributed.md tells users to run it.

Two processes that each take every other batch make the same updates as one process that
accumulates two batches per update (--update-freq 2): the batches, their order and the gradient
normalisation are the same, so the parameters must agree. DistributedDataParallel runs with
find_unused_parameters=False (fairseq's default), so an architecture with a parameter that gets
no gradient would fail at its second update.
"""

import argparse
import sys
import types

import pytest
import torch

from clitools import BIN, REPO, run
from fairseq_s2s_attn.distributed import WorkerError, configure_cpu, refuse_late_load, worker_error
from fairseq_s2s_attn.errors import ConfigError, S2SError

ARCHS = ["rnn_vanilla_tiny", "rnn_bahdanau_tiny", "rnn_luong_tiny"]
USER_DIR = ("--user-dir", REPO / "fairseq_s2s_attn")
NO_DROPOUT = ("--encoder-dropout-in", 0, "--encoder-dropout-out", 0,
              "--decoder-dropout-in", 0, "--decoder-dropout-out", 0)


def train_args(data_bin, arch, save_dir):
    return [data_bin, *USER_DIR, "--arch", arch, *NO_DROPOUT, "--optimizer", "adam", "--lr", "0.005",
            "--max-tokens", 100, "--seed", 3, "--max-update", 6, "--disable-validation",
            "--no-progress-bar", "--cpu", "--num-workers", 0, "--save-dir", save_dir]


def params(save_dir):
    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == 6
    return state["model"]


@pytest.mark.slow
@pytest.mark.parametrize("arch, launcher", [
    ("rnn_vanilla_tiny", "torchrun"),
    ("rnn_bahdanau_tiny", "fairseq"),
    ("rnn_luong_tiny", "fairseq"),
])
def test_two_cpu_processes_equal_update_freq_2(small_data_bin, tmp_path, arch, launcher):
    one, two = tmp_path / "one", tmp_path / "two"
    run("fairseq-train", *train_args(small_data_bin, arch, one), "--update-freq", 2)
    if launcher == "fairseq":  # fairseq's own launcher spawns the processes
        proc = run("fairseq-train", *train_args(small_data_bin, arch, two),
                   "--distributed-world-size", 2, "--tensorboard-logdir", tmp_path / "tb")
        assert "data-parallel training on 2 CPU processes (gloo" in proc.stderr + proc.stdout
        # the spawned processes close their tensorboard writers: no "Exception in thread ...
        # OSError: handle is closed" tracebacks after the run, and the events are written
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert list((tmp_path / "tb" / "train").glob("events.out.tfevents.*"))
    else:
        proc = run("torchrun", "--standalone", "--nproc-per-node", 2, BIN / "fairseq-train",
                   *train_args(small_data_bin, arch, two))
    log = proc.stderr + proc.stdout
    assert "training on 2 devices" in log
    assert "distributed init (rank 1)" in log
    # each process closes its gloo group after training (left to the interpreter's shutdown, a
    # process could die with SIGABRT after a successful run, rarely: once in CI); fairseq logs
    # INFO lines on rank 0 only
    assert "distributed shutdown (rank 0): gloo process group closed" in log
    p1, p2 = params(one), params(two)
    assert p1.keys() == p2.keys()
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    # ours, raised in every spawned process when it builds the model
    (["--attention", "dot", "--decoder-hidden-size", 48], "--attention dot needs --decoder-hidden-size (48)"),
    # fairseq's own check, an assert in its Cython batching module
    # (on the validation set, which fairseq does not filter by --max-tokens)
    (["--max-tokens", 3], "Sentences lengths should not exceed max_tokens=3 (fairseq's check"),
])
def test_errors_of_spawned_processes_are_one_line(small_data_bin, tmp_path, args, message):
    """torch.multiprocessing re-raised a spawned process's error in the parent as a
    ProcessRaisedException: ~30 lines of two tracebacks, with our one line at their end."""
    cmd = [a for a in train_args(small_data_bin, "rnn_luong_tiny", tmp_path) if a != "--disable-validation"]
    cmd += [str(a) for a in args]
    proc = run("fairseq-train", *cmd, "--distributed-world-size", 2, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [f"fairseq-train: error: {errors[0].split('error: ', 1)[1]}"] and message in errors[0]
    one = run("fairseq-train", *cmd, check=False)  # the same line from one process
    assert one.returncode != 0 and errors[0] in one.stderr and "Traceback" not in one.stderr


@pytest.mark.slow
def test_two_cpu_processes_resume(small_data_bin, tmp_path):
    """Resuming: rank 0 loads checkpoint_last.pt and fairseq broadcasts the state to the other
    ranks as a pickle, which they read with torch.load(weights_only=True): every other rank died
    on the state's DictConfig ("Unsupported global: omegaconf.dictconfig.DictConfig"). The resumed
    run equals one that trained straight through."""
    def cmd(save_dir, updates):
        args = train_args(small_data_bin, "rnn_luong_tiny", save_dir)
        return [*args[:args.index("--max-update")], "--max-update", updates,
                *args[args.index("--max-update") + 2:], "--distributed-world-size", 2]

    run("fairseq-train", *cmd(tmp_path / "straight", 6))
    run("fairseq-train", *cmd(tmp_path / "resumed", 3))
    proc = run("fairseq-train", *cmd(tmp_path / "resumed", 6))
    assert "Loaded checkpoint" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    straight, resumed = params(tmp_path / "straight"), params(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)


def test_closing_the_gloo_group_lets_a_later_training_start_another(tmp_path):
    """After the group is closed, fairseq's cached global group must not outlive it: a second
    training in the same process (a hydra multirun) would take the destroyed group."""
    from fairseq.distributed import utils as distributed_utils

    from fairseq_s2s_attn.distributed import close_gloo_group

    for run_index in range(2):
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{run_index}'}",
                                             world_size=1, rank=0)
        total = torch.ones(2)
        torch.distributed.all_reduce(total, group=distributed_utils.get_global_group())
        assert total.tolist() == [1.0, 1.0]
        close_gloo_group()
        assert not torch.distributed.is_initialized()
        assert not hasattr(distributed_utils.get_global_group, "_global_group")


# A process that trains through fairseq's distributed_main (one rank of a gloo group, here of
# one), then ends as the argument says; stdout tells which exit steps ran.
GLOO_RANK_PROGRAM = """
import atexit, gc, sys, weakref
import torch
from omegaconf import OmegaConf
from fairseq.dataclass.configs import FairseqConfig
from fairseq.distributed import utils as distributed_utils
import fairseq_s2s_attn  # the plugin's changes to fairseq

class Teardown:
    def __del__(self):
        print("teardown ran", flush=True)

KEEP = Teardown()  # finalized only by the interpreter's teardown

GROUP = []

def main(cfg):
    total = torch.ones(2)
    torch.distributed.all_reduce(total, group=distributed_utils.get_global_group())
    # the default group, and fairseq's (a new_group of all ranks, which DDP takes)
    GROUP.extend(weakref.ref(g) for g in (torch.distributed.group.WORLD,
                                          distributed_utils.get_global_group()))
    atexit.register(print, "exit handler from training ran")
    print("trained")  # not flushed: left in the pipe's buffer

cfg = OmegaConf.structured(FairseqConfig())
cfg.model = cfg.task = None
cfg.common.cpu = True
dt = cfg.distributed_training
dt.distributed_init_method, dt.distributed_backend = "file://" + sys.argv[1], "gloo"
dt.distributed_world_size, dt.distributed_rank = 1, 0
distributed_utils.distributed_main(0, main, cfg, {})
print("gloo closed:", not torch.distributed.is_initialized())
gc.collect()
print("group objects kept:", all(ref() is not None for ref in GROUP))
if sys.argv[2] == "raise":
    raise RuntimeError("failed after training")
"""


@pytest.mark.parametrize("end", ["return", "raise"])
def test_a_trained_gloo_rank_exits_without_the_interpreters_teardown(tmp_path, end):
    """A rank whose training closed its gloo group keeps the group's object (freeing it joins
    gloo's threads under the GIL: a rank hung so after a successful run) and ends after Python's
    exit handlers (those of the training included, streams flushed) but before the interpreter's
    teardown, where the group made a successful run abort or hang now and then; an uncaught
    exception after training keeps its exit status and traceback."""
    import subprocess

    from clitools import env

    proc = subprocess.run([sys.executable, "-c", GLOO_RANK_PROGRAM, str(tmp_path / "store"), end],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    assert lines[:4] == ["trained", "gloo closed: True", "group objects kept: True",
                         "exit handler from training ran"], proc.stdout
    if end == "return":
        assert proc.returncode == 0, proc.stderr
        assert "teardown ran" not in lines
    else:
        assert proc.returncode == 1 and "RuntimeError: failed after training" in proc.stderr
        assert "teardown ran" in lines  # no os._exit over a failure


def test_worker_error_is_read_from_the_traceback_text():
    text = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call "
            "last):\n  File \"x.py\", line 1, in f\nfairseq_s2s_attn.distributed.WorkerError: "
            "--encoder-layers must be a positive integer, got 0\n")
    error = worker_error(text)
    assert isinstance(error, WorkerError) and isinstance(error, S2SError)
    assert str(error) == "--encoder-layers must be a positive integer, got 0"
    assert worker_error(text.replace("fairseq_s2s_attn.distributed.WorkerError", "KeyError")) is None
    assert worker_error("") is None


# ----------------------------------------------------------------- launcher logic (no processes)


def dt(**kw):
    values = dict(distributed_world_size=1, distributed_init_method=None, distributed_rank=0,
                  distributed_no_spawn=False, distributed_port=-1, distributed_backend="nccl",
                  device_id=0)
    values.update(kw)
    return argparse.Namespace(**values)


TORCHRUN = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "4", "RANK": "3",
            "LOCAL_RANK": "1"}


def test_torchrun_environment_is_used_on_cpu():
    cfg = dt()  # the default world size on CPU is 1: fairseq alone would ignore torchrun
    assert configure_cpu(cfg, TORCHRUN) is False
    assert (cfg.distributed_init_method, cfg.distributed_world_size, cfg.distributed_rank,
            cfg.device_id, cfg.distributed_no_spawn, cfg.distributed_backend) == (
        "env://", 4, 3, 1, True, "gloo")


def test_torchrun_with_other_world_size_is_an_error():
    with pytest.raises(ConfigError, match="does not match the 4 processes torchrun started"):
        configure_cpu(dt(distributed_world_size=2), TORCHRUN)


def test_single_node_spawn_on_cpu():
    cfg = dt(distributed_world_size=3)
    assert configure_cpu(cfg, {}) is True
    assert cfg.distributed_init_method.startswith("tcp://localhost:")
    assert cfg.distributed_backend == "gloo"
    cfg = dt(distributed_world_size=2, distributed_port=12345, distributed_backend="mpi")
    configure_cpu(cfg, {})
    assert (cfg.distributed_init_method, cfg.distributed_backend) == ("tcp://localhost:12345", "mpi")


def test_explicit_init_method_runs_one_process_per_command():
    cfg = dt(distributed_world_size=4, distributed_init_method="tcp://node0:23456", distributed_rank=2)
    assert configure_cpu(cfg, {}) is False
    assert cfg.distributed_no_spawn and cfg.distributed_rank == 2 and cfg.distributed_backend == "gloo"


def test_one_process_is_left_alone():
    cfg = dt()
    assert configure_cpu(cfg, {}) is False
    assert cfg == dt()


def test_no_spawn_without_init_method_is_an_error():
    with pytest.raises(ConfigError, match="--distributed-init-method"):
        configure_cpu(dt(distributed_world_size=2, distributed_no_spawn=True), {})


def test_late_load_under_torchrun_is_refused(monkeypatch):
    """A torchrun process of fairseq-hydra-train imports the plugin inside training, with no
    process group: it would train alone. Not refused: another command, one process, a group."""
    monkeypatch.delitem(sys.modules, "fairseq_cli.hydra_train", raising=False)
    refuse_late_load(TORCHRUN)  # fairseq-train: the plugin came with the options
    monkeypatch.setitem(sys.modules, "fairseq_cli.hydra_train", types.ModuleType("hydra_train"))
    refuse_late_load({})
    refuse_late_load(dict(TORCHRUN, WORLD_SIZE="1"))
    with pytest.raises(ConfigError, match=r"torchrun started 4 processes.*-m fairseq_s2s_attn\.hydra_train"):
        refuse_late_load(TORCHRUN)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    refuse_late_load(TORCHRUN)


def test_no_cuda_is_a_cpu_run_without_cpu(monkeypatch):
    """On a machine without CUDA, ``fairseq-train --distributed-world-size 2`` without ``--cpu``
    is a CPU run too: fairseq stopped at "world size is 2 but have 0 available devices"; the
    plugin spawns 2 CPU processes (torch.multiprocessing.spawn recorded here, not run). With CUDA
    and without --cpu, or on a TPU, fairseq's own launcher decides."""
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.distributed import utils as distributed_utils
    from omegaconf import OmegaConf

    from fairseq_s2s_attn import distributed

    def cfg(**common):  # fairseq's config, as fairseq-train makes it
        config = OmegaConf.structured(FairseqConfig)
        config.distributed_training.distributed_world_size = 2
        for key, value in common.items():
            config.common[key] = value
        return config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    spawned = []
    monkeypatch.setattr(torch.multiprocessing, "spawn", lambda **kw: spawned.append(kw))
    run_cfg = cfg()
    distributed_utils.call_main(run_cfg, main=print)
    (kw,) = spawned
    assert kw["fn"] is distributed._cpu_worker and kw["nprocs"] == 2
    assert run_cfg.distributed_training.distributed_backend == "gloo"
    assert distributed.is_cpu_run(cfg()) and distributed.is_cpu_run(cfg(cpu=True))
    assert not distributed.is_cpu_run(cfg(tpu=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not distributed.is_cpu_run(cfg()) and distributed.is_cpu_run(cfg(cpu=True))


def test_cpu_workers_fork_their_data_loader_workers(monkeypatch):
    """A process spawned by torch.multiprocessing inherits the 'spawn' start method, so each of
    its data-loader workers (--num-workers) started a fresh interpreter and imported fairseq again
    (seconds before the first update on a small machine); the plugin's CPU worker forks them, as
    a torchrun process does. Speed only: the start method seen by training is checked."""
    import multiprocessing

    from fairseq.distributed import utils as distributed_utils

    from fairseq_s2s_attn import distributed

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    seen = []
    monkeypatch.setattr(distributed_utils, "distributed_main",
                        lambda i, main, cfg, kwargs: seen.append(multiprocessing.get_start_method()))
    previous = multiprocessing.get_start_method(allow_none=True)
    try:
        multiprocessing.set_start_method("spawn", force=True)  # as in a spawned process
        distributed._cpu_worker(0, print, _world(2), {})
    finally:
        multiprocessing.set_start_method(previous, force=True)
    assert seen == ["fork"]


def _world(size):
    """A config with what ``_cpu_worker`` reads: the world size."""
    return types.SimpleNamespace(
        distributed_training=types.SimpleNamespace(distributed_world_size=size))


@pytest.mark.parametrize("cores, world, user, expected", [
    (4, 2, None, 2), (2, 2, None, 1), (16, 2, None, 4), (4, 2, "3", 3)])
def test_cpu_workers_share_the_cores(monkeypatch, cores, world, user, expected):
    """The --distributed-world-size processes spawned on this machine share its cores: each gets
    an equal share of intra-op threads (at most runtime.MAX_DEFAULT_THREADS), where each would
    otherwise take the parent command's count (all cores, up to the cap) and oversubscribe them;
    the user's S2S_NUM_THREADS wins."""
    from fairseq.distributed import utils as distributed_utils

    from fairseq_s2s_attn import distributed, runtime

    seen = []
    monkeypatch.setattr(distributed_utils, "distributed_main",
                        lambda i, main, cfg, kwargs: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(runtime, "available_cores", lambda: cores)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("S2S_NUM_THREADS", raising=False)
    if user is not None:
        monkeypatch.setenv("S2S_NUM_THREADS", user)
    import multiprocessing

    previous, method = torch.get_num_threads(), multiprocessing.get_start_method(allow_none=True)
    try:
        torch.set_num_threads(cores)
        distributed._cpu_worker(0, print, _world(world), {})
    finally:
        torch.set_num_threads(previous)
        multiprocessing.set_start_method(method, force=True)
    assert seen == [expected]
