"""Data-parallel training on CPU processes (gloo) with fairseq's own launcher or torchrun.

fairseq 0.12 assumes one process per GPU, so on a machine without GPUs:

- ``fairseq-train --cpu --distributed-world-size 2`` stops at "world size is 2 but have 0
  available devices" (and would spawn min(#GPUs, world size) = 0 processes);
- under ``torchrun`` it divides the rank by the GPU count (ZeroDivisionError), and without
  ``--distributed-world-size`` its default world size (#GPUs, so 1) makes it ignore torchrun's
  environment: every process then trains alone on all the data, silently;
- the default backend is nccl (CUDA only), and DistributedDataParallel is built with
  ``device_ids=[device_id]``, which torch refuses for a model on the CPU.

For a CPU run (``--cpu``, or no CUDA) with more than one process we therefore

- take rank, world size and LOCAL_RANK from torchrun's environment when it is there
  (``env://`` rendezvous, one process per torchrun worker);
- otherwise spawn ``--distributed-world-size`` processes on this machine with a free local
  port (``--distributed-port`` if given), as fairseq does for GPUs;
- with an explicit ``--distributed-init-method``, run one process per command
  (``--distributed-rank`` says which), i.e. as if ``--distributed-no-spawn`` were given;
- use the gloo backend unless another one than nccl was asked for;
- build DistributedDataParallel without device ids when the model is on the CPU;
- close the gloo process group when a process's training has ended (fairseq never does):
  left to the interpreter's shutdown, gloo's worker threads could still hold tensors whose
  release takes the GIL while the interpreter is being torn down, and the process died with
  SIGABRT ("terminate called without an active exception", pytorch/pytorch#190489) after a
  successful run; it happened to a 2-process torchrun test in CI;
- keep the closed group's object to the end of the process and end the process without the
  interpreter's teardown (``exit_without_teardown``): freeing the group joins gloo's worker
  threads while holding the GIL, and a worker still releasing the final barrier's work needs the
  GIL: a rank hung for good in a garbage collection after a successful run (its stacks read
  with gdb here; in CI the same test hung until its 10-minute timeout), or died with SIGABRT at
  exit: 2 of about 200 runs of a 2-process training on a 2-core machine.

GPU runs are left to fairseq unchanged. See docs/distributed.md for the commands.
"""

import atexit
import logging
import multiprocessing.util
import os
import socket
import sys
from typing import Optional

import torch

from .errors import ConfigError, S2SError
from .patching import replaces

logger = logging.getLogger(__name__)

TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def is_cpu_run(cfg) -> bool:
    return not cfg.common.tpu and (bool(cfg.common.cpu) or not torch.cuda.is_available())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def configure_cpu(dt, environ=None) -> bool:
    """Fills the distributed options of a CPU run in place; returns True when this process
    must spawn the workers itself (fairseq's single-node launcher)."""
    env = os.environ if environ is None else environ
    spawn = False
    if dt.distributed_init_method is None and all(k in env for k in TORCHRUN_ENV):
        world = int(env["WORLD_SIZE"])
        if dt.distributed_world_size not in (1, world):
            raise ConfigError(
                f"--distributed-world-size {dt.distributed_world_size} does not match the "
                f"{world} processes torchrun started (WORLD_SIZE); leave the option out or make "
                "it equal to nnodes x nproc-per-node"
            )
        if world > 1:
            dt.distributed_init_method = "env://"
            dt.distributed_world_size = world
            dt.distributed_rank = int(env["RANK"])
            dt.device_id = int(env.get("LOCAL_RANK", 0))
            dt.distributed_no_spawn = True
    elif dt.distributed_world_size > 1 and dt.distributed_init_method is None:
        if dt.distributed_no_spawn:
            raise ConfigError(
                "--distributed-no-spawn on CPU needs --distributed-init-method tcp://HOST:PORT and "
                "--distributed-rank for each process, or a launcher that sets them (torchrun)"
            )
        port = dt.distributed_port if dt.distributed_port > 0 else _free_port()
        dt.distributed_init_method = f"tcp://localhost:{port}"
        spawn = True
    elif dt.distributed_init_method is not None and dt.distributed_world_size > 1:
        dt.distributed_no_spawn = True  # one process per command, --distributed-rank says which
    if dt.distributed_world_size > 1 and dt.distributed_backend == "nccl":
        dt.distributed_backend = "gloo"
    return spawn


def cpu_launcher() -> None:
    """fairseq's ``distributed_utils.call_main`` assumes one process per GPU: on CPU
    ``--distributed-world-size 2`` stopped at "world size is 2 but have 0 available devices",
    and under torchrun the rank was divided by the GPU count or torchrun's environment ignored
    (see the module's docstring). For a CPU run (``is_cpu_run``: --cpu, or no CUDA; not a TPU)
    the distributed options are filled by ``configure_cpu`` (torchrun's environment, a free local
    port, gloo), and where this process must start the others, --distributed-world-size
    processes are spawned (``_cpu_worker``), their errors re-raised as one line. GPU runs, one
    process and one rank of a launcher go to fairseq's call_main."""
    from fairseq.distributed import utils as distributed_utils

    @replaces(distributed_utils, "call_main")
    def call_main(original, cfg, main, **kwargs):
        if not is_cpu_run(cfg):
            return original(cfg, main, **kwargs)
        dt = cfg.distributed_training
        if not configure_cpu(dt):
            return original(cfg, main, **kwargs)  # one process, or one rank of a launcher
        logger.info(f"data-parallel training on {dt.distributed_world_size} CPU processes "
                    f"({dt.distributed_backend}, {dt.distributed_init_method})")
        kwargs["start_rank"] = dt.distributed_rank
        dt.distributed_rank = None  # distributed_main assigns start_rank + process index
        try:
            torch.multiprocessing.spawn(
                fn=_cpu_worker,
                args=(main, cfg, kwargs),
                nprocs=dt.distributed_world_size,
                join=True,
            )
        except torch.multiprocessing.ProcessRaisedException as e:
            error = worker_error(str(e))
            if error is None:
                raise
            raise error from None


class WorkerError(S2SError):
    """A spawned process's error that prints as one line (see runtime.one_line_error).

    torch.multiprocessing hands the parent only the text of the child's traceback, which it
    printed inside a ProcessRaisedException traceback of its own (~30 lines for a bad option);
    the child raises this with the one line, and the parent raises it again from that text."""


def worker_error(text: str) -> Optional[WorkerError]:
    """The WorkerError whose traceback ends ``text`` (a ProcessRaisedException's message)."""
    prefix = f"{WorkerError.__module__}.{WorkerError.__qualname__}: "
    last = text.rstrip().splitlines()[-1] if text.strip() else ""
    return WorkerError(last[len(prefix):]) if last.startswith(prefix) else None


def _cpu_worker(index, main, cfg, kwargs):
    """One spawned training process. Spawned processes inherit the 'spawn' start method, so each
    data-loader worker would start a fresh interpreter and import fairseq again (seconds on a
    small machine, before the first update); fork them instead, as a torchrun process does.
    The --distributed-world-size processes share this machine's cores (``set_thread_defaults``:
    an equal share of intra-op threads each, unless the user set them)."""
    import multiprocessing

    from fairseq.distributed import utils as distributed_utils

    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)
    from .runtime import one_line_error, set_thread_defaults

    set_thread_defaults(processes=cfg.distributed_training.distributed_world_size, batches=True)

    try:
        distributed_utils.distributed_main(index, main, cfg, kwargs)
    except Exception as e:
        line = one_line_error(e, e.__traceback__)
        if line is None or "\n" in line:
            raise
        raise WorkerError(line) from None
    finally:
        close_tensorboard_writers()


def gloo_closed_after_training() -> None:
    """fairseq's ``distributed_main`` ends with a barrier and leaves the process group to the
    interpreter's shutdown; for gloo (CPU processes) it is now destroyed there, after that
    barrier, while the interpreter is whole (see the module's docstring). Only when training
    returned: destroying a group while other ranks may still be in a collective can hang."""
    from fairseq.distributed import utils as distributed_utils

    @replaces(distributed_utils, "distributed_main")
    def distributed_main(original, i, main, cfg, kwargs):
        exit_without_teardown.register()  # before training: its handler then runs last
        exit_without_teardown.trained = False  # a later training in this process starts over
        result = original(i, main, cfg, kwargs)
        exit_without_teardown.trained = close_gloo_group()
        return result


# gloo groups closed by close_gloo_group, kept alive to the end of the process (see there)
_CLOSED_GROUPS = []


def close_gloo_group() -> bool:
    """Destroys this process's gloo process group, if it has one, and fairseq's cached handle of
    it (``get_global_group._global_group``), which a later training in the same process (a hydra
    multirun) would otherwise take for its new group. Returns whether there was one.

    The group object itself is kept (``_CLOSED_GROUPS``) until the process ends: freeing it
    joins gloo's worker threads while holding the GIL, and a worker that is still releasing the
    last collective's work (the final barrier, which holds DistributedDataParallel's last
    all-reduce and its tensors) needs the GIL to free those tensors. Seen here: a rank hung for
    good after a successful run, its main thread joining the worker inside a garbage collection
    (the trainer's DistributedDataParallel freed, its reducer holding the group's last
    reference), the worker waiting for the GIL in ~AsyncBarrierWork; the process then ends
    through ``exit_without_teardown``, which never frees it."""
    from fairseq.distributed import utils as distributed_utils

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"):
        return False
    rank = dist.get_rank()
    # the default group and fairseq's global group (a new_group of all ranks, the one
    # DistributedDataParallel takes)
    _CLOSED_GROUPS.append(dist.group.WORLD)
    _CLOSED_GROUPS.append(vars(distributed_utils.get_global_group).pop("_global_group", None))
    dist.destroy_process_group()
    logger.info(f"distributed shutdown (rank {rank}): gloo process group closed")
    return True


class exit_without_teardown:
    """Ends a process whose training in a gloo group succeeded with ``os._exit(0)`` once
    Python's exit handlers have run, skipping the interpreter's teardown (garbage collection of
    what is left, modules, C++ static objects).

    fairseq behaviour it fixes: a CPU rank (spawned by our launcher, or one of torchrun's) exits
    through the interpreter's full teardown with its gloo group still alive, even after
    ``close_gloo_group`` (which keeps it on purpose; before, DistributedDataParallel's reducer
    kept it): freed during the teardown, with gloo's worker threads and connections, it made a
    successful run's process die with SIGABRT ("terminate called without an active exception"),
    or hang (see the module's docstring and ``close_gloo_group``). What runs before: threads
    joined, the exit handlers registered after training started (fairseq's tensorboard writers,
    wandb), multiprocessing's (children, finalizers), logging's (handlers flushed and closed),
    the standard streams flushed.

    The handler is registered when a distributed training starts (so that it runs after the
    handlers registered during training) and acts only when the last training in the process
    closed a gloo group and no uncaught exception followed (``sys.last_value``: the exit status
    is then 1 and stays so). GPU (nccl) runs and single-process training are unchanged."""

    registered = False
    trained = False

    @classmethod
    def register(cls) -> None:
        if not cls.registered:
            atexit.register(cls.handler)
            cls.registered = True

    @classmethod
    def handler(cls) -> None:
        if not cls.trained or getattr(sys, "last_value", None) is not None:
            return
        multiprocessing.util._exit_function()  # its atexit handler, registered before ours
        logging.shutdown()  # likewise
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(0)


def close_tensorboard_writers() -> None:
    """Closes fairseq's tensorboard writers (``--tensorboard-logdir``) at the end of a spawned
    process. fairseq closes them in an atexit handler, but a process started by
    multiprocessing first runs multiprocessing's own finalizers, which close the queue each
    writer's background thread reads: every process then printed "Exception in thread ...
    OSError: handle is closed" tracebacks after a successful run."""
    from fairseq.logging import progress_bar

    close = getattr(progress_bar, "_close_writers", None)
    if close is not None:
        close()
        progress_bar._tensorboard_writers.clear()


def cpu_ddp() -> None:
    """fairseq builds DistributedDataParallel with ``device_ids=[device_id]``, which torch
    refuses for a model on the CPU; for a model whose parameters are all on the CPU it is built
    without device ids (nor output device). GPU models are unchanged."""
    from fairseq.models import distributed_fairseq_model as dfm

    @replaces(dfm, "DistributedDataParallel")
    def DistributedDataParallel(original, module, device_ids=None, output_device=None, **kwargs):
        if all(p.device.type == "cpu" for p in module.parameters()):
            device_ids = output_device = None  # torch: device ids are for GPU modules only
        return original(module, device_ids=device_ids, output_device=output_device, **kwargs)


def refuse_late_load(environ=None) -> None:
    """Stops a torchrun process that fairseq-hydra-train did not join to the others.

    fairseq-hydra-train loads the plugin (``common.user_dir``) only inside training, after
    fairseq has chosen how to start processes; on CPU fairseq then ignores torchrun's
    environment (see the module's docstring) and each process would train alone on all the data,
    silently, all writing the same checkpoints. Called when the plugin is imported: in such a
    process (fairseq's hydra_train loaded, torchrun's variables set for several processes, no
    process group) this raises with the command that works. fairseq-train loads the plugin while
    parsing its options, and ``python -m fairseq_s2s_attn.hydra_train`` before hydra's, so
    neither gets here with a missing process group."""
    env = os.environ if environ is None else environ
    if ("fairseq_cli.hydra_train" not in sys.modules or not all(k in env for k in TORCHRUN_ENV)
            or int(env["WORLD_SIZE"]) <= 1):
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    raise ConfigError(
        f"torchrun started {env['WORLD_SIZE']} processes, but fairseq-hydra-train loads the "
        "plugin (common.user_dir) only after choosing how to start them, so this one would train "
        "alone on all the data: run `torchrun ... -m fairseq_s2s_attn.hydra_train` with the same "
        "arguments, which loads the plugin first"
    )


def install() -> None:
    refuse_late_load()
    cpu_launcher()
    cpu_ddp()
    gloo_closed_after_training()
