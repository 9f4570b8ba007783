#!/usr/bin/env python3
"""Average the weights of the last checkpoints of one training into one checkpoint.

    python scripts/average_checkpoints.py --inputs CKPT_DIR --num-epoch-checkpoints 5 --output avg.pt
    python scripts/average_checkpoints.py --inputs CKPT_DIR --num-update-checkpoints 4 --output avg.pt
    python scripts/average_checkpoints.py --inputs a.pt b.pt c.pt --output avg.pt
    fairseq-generate DATA --user-dir fairseq_s2s_attn --path avg.pt ...

Each parameter of the output is the mean of that parameter over the inputs (accumulated in
float64, stored in the inputs' dtype); everything else (options, training position, the data
records of ``fairseq_s2s_attn.checkpoint``) is the newest input's. The optimizer's state is left
out (averaged weights have none; fairseq-train --restore-file starts a fresh one), which makes
the output a third of a training checkpoint's size.

fairseq's own scripts/average_checkpoints.py is in its source tree, not in the installed
package, and checks only that the inputs' parameter names agree. This one loads them as the
plugin does (torch's safe mode kept, fairseq's plain types allowed, checksums checked) and
refuses, with one error line, what would average to nonsense: checkpoints of other
architectures, model settings, parameter shapes, language pairs or dictionaries. It cannot tell
two trainings of the same model apart: average checkpoints of one training only.

Checkpoint names, as fairseq-train writes them: checkpoint{EPOCH}.pt at the end of an epoch
(kept unless --no-epoch-checkpoints; --keep-last-epochs N keeps the last N),
checkpoint_{EPOCH}_{UPDATES}.pt every --save-interval-updates (--keep-interval-updates N).
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_args import at_least, folder_problem  # noqa: E402

EPOCH_FILE = re.compile(r"^checkpoint(\d+)\.pt$")
UPDATE_FILE = re.compile(r"^checkpoint_\d+_(\d+)\.pt$")

def neutral_model_settings():
    """Settings that may differ between checkpoints of one training without changing what the
    parameters mean: those ``--model-overrides`` may change (``checkpoint.NEUTRAL_OVERRIDES``:
    precision, limits, dropout, initialisation) and fairseq's own dropout, data path and name."""
    from fairseq_s2s_attn.checkpoint import NEUTRAL_OVERRIDES

    return NEUTRAL_OVERRIDES | {"dropout", "data", "_name"}


class AverageError(Exception):
    """Inputs that cannot be averaged; main() prints it as one error line."""


def last_checkpoints(folder: str, n: int, by_updates: bool, upper_bound=None):
    """The newest ``n`` checkpoints of a save dir, newest first: checkpoint{EPOCH}.pt by epoch,
    or checkpoint_{EPOCH}_{UPDATES}.pt by update number, those up to ``upper_bound`` only."""
    pattern, kind = (UPDATE_FILE, "update") if by_updates else (EPOCH_FILE, "epoch")
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise AverageError(f"{folder}: {e.strerror}") from None
    found = sorted(((int(m.group(1)), name) for name in names for m in [pattern.match(name)] if m),
                   reverse=True)
    if upper_bound is not None:
        found = [(k, name) for k, name in found if k <= upper_bound]
    if len(found) < n:
        hint = (" (fairseq-train writes them with --save-interval-updates)" if by_updates else
                " (fairseq-train does not write them with --no-epoch-checkpoints)")
        bound = f" up to {kind} {upper_bound}" if upper_bound is not None else ""
        raise AverageError(f"{folder}: {n} {kind} checkpoints asked for, {len(found)} found{bound}"
                           f"{hint if not found else ''}")
    return [os.path.join(folder, name) for _, name in found[:n]]


def _model_options(state) -> dict:
    """The model options of a checkpoint (its cfg.model, or a legacy checkpoint's args)."""
    cfg = state.get("cfg")
    model = cfg.get("model") if hasattr(cfg, "get") else None
    if model is None:
        model = vars(state["args"]) if isinstance(state.get("args"), argparse.Namespace) else {}
    return dict(model.items()) if hasattr(model, "items") else {}


def _arch(state):
    options = _model_options(state)
    return options.get("_name") or options.get("arch")


def _num_updates(state) -> int:
    history = state.get("optimizer_history") or [{}]
    return int(history[-1].get("num_updates", 0) or 0)


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_same_model(first_path, first, path, state) -> None:
    """Stops unless ``state`` is a checkpoint of the same model as ``first``: architecture and
    settings, parameter names, shapes and dtypes, language pair and dictionaries."""
    from fairseq_s2s_attn.checkpoint import trained_dictionaries, trained_pair

    def differ(what):
        raise AverageError(f"{path} and {first_path} cannot be averaged: {what}")

    neutral = neutral_model_settings()
    a, b = ({k: v for k, v in _model_options(s).items() if k not in neutral} for s in (first, state))
    if _arch(first) != _arch(state):
        differ(f"other architectures ({_arch(state)} and {_arch(first)})")
    for key in sorted(set(a) | set(b)):
        if str(a.get(key)) != str(b.get(key)):
            differ(f"other model settings ({key}: {_describe(b.get(key))} and {_describe(a.get(key))})")
    pa, pb = first["model"], state["model"]
    if set(pa) != set(pb):
        odd = sorted(set(pa) ^ set(pb))
        differ(f"other parameters ({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''})")
    for name in pa:
        if tuple(pa[name].shape) != tuple(pb[name].shape) or pa[name].dtype != pb[name].dtype:
            differ(f"{name} is {tuple(pb[name].shape)} {pb[name].dtype} in one, "
                   f"{tuple(pa[name].shape)} {pa[name].dtype} in the other")
    if trained_pair(first) and trained_pair(state) and trained_pair(first) != trained_pair(state):
        differ("other language pairs ({} and {})".format(*("->".join(trained_pair(s))
                                                           for s in (state, first))))
    da, db = trained_dictionaries(first), trained_dictionaries(state)
    for side in sorted(set(da) & set(db)):
        if da[side] != db[side]:
            differ(f"trained with other {side} dictionaries")


def average(paths):
    """The averaged checkpoint state of ``paths`` (loaded one at a time) and the newest one's path.
    Floating-point tensors are averaged in float64 and stored in their dtype; other tensors
    (step counters, masks) must be equal and are kept."""
    import torch

    from fairseq_s2s_attn.checkpoint import check_fairseq_checkpoint, safe_load

    first = first_path = None
    sums = {}
    newest = None
    for path in paths:
        state = safe_load(path)
        check_fairseq_checkpoint(state, path)
        state.pop("last_optimizer_state", None)  # twice the weights' size, and not averaged
        if first is None:
            first, first_path = state, path
        else:
            check_same_model(first_path, first, path, state)
        for name, tensor in state["model"].items():
            if tensor.is_floating_point():
                t = tensor.to(torch.float64)
                sums[name] = t if name not in sums else sums[name].add_(t)
            elif not torch.equal(tensor, first["model"][name]):
                raise AverageError(f"{path} and {first_path} cannot be averaged: {name} "
                                   f"({tensor.dtype}) differs and is not a number to average")
        if newest is None or _num_updates(state) >= _num_updates(newest[1]):
            newest = (path, {k: v for k, v in state.items() if k != "model"})
        if state is not first:
            del state
    out = newest[1]
    out["model"] = {name: (sums[name].div_(len(paths)).to(tensor.dtype) if name in sums else tensor)
                    for name, tensor in first["model"].items()}
    extra = out.get("extra_state")
    if isinstance(extra, dict):
        extra["averaged_from"] = [os.path.basename(p) for p in paths]
    return out, newest[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, metavar="PATH",
                   help="checkpoint files, or one folder (fairseq-train's --save-dir) with "
                        "--num-epoch-checkpoints or --num-update-checkpoints")
    p.add_argument("--output", required=True, metavar="FILE", help="the averaged checkpoint to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--num-epoch-checkpoints", type=at_least(1), default=None, metavar="N",
                       help="average the last N checkpoint{EPOCH}.pt of the folder")
    which.add_argument("--num-update-checkpoints", type=at_least(1), default=None, metavar="N",
                       help="average the last N checkpoint_{EPOCH}_{UPDATES}.pt of the folder")
    p.add_argument("--checkpoint-upper-bound", type=at_least(0), default=None, metavar="K",
                   help="only checkpoints of this epoch or update number and earlier")
    p.add_argument("--force", action="store_true", help="replace an existing --output file")
    args = p.parse_args(argv)

    count = args.num_epoch_checkpoints or args.num_update_checkpoints
    if count is not None:
        if len(args.inputs) != 1 or not os.path.isdir(args.inputs[0]):
            p.error(f"--num-{'epoch' if args.num_epoch_checkpoints else 'update'}-checkpoints takes "
                    f"one folder for --inputs, got {' '.join(args.inputs)}")
    elif args.checkpoint_upper_bound is not None:
        p.error("--checkpoint-upper-bound needs --num-epoch-checkpoints or --num-update-checkpoints")
    elif any(os.path.isdir(x) for x in args.inputs):
        p.error("--inputs holds a folder: give --num-epoch-checkpoints N or "
                "--num-update-checkpoints N to choose its checkpoints")
    out = os.path.abspath(args.output)
    if os.path.isdir(out):
        p.error(f"--output {args.output} is a folder; name the checkpoint file to write")
    problem = folder_problem(os.path.dirname(out))
    if problem:
        p.error(f"--output {args.output}: {os.path.dirname(out)} {problem}")
    try:
        paths = (last_checkpoints(args.inputs[0], count, bool(args.num_update_checkpoints),
                                  args.checkpoint_upper_bound) if count else list(args.inputs))
        if len(set(map(os.path.realpath, paths))) != len(paths):
            raise AverageError("a checkpoint is given twice: " + " ".join(paths))
        if os.path.realpath(out) in set(map(os.path.realpath, paths)):
            raise AverageError(f"--output {args.output} is one of the inputs; write elsewhere")
        if os.path.exists(out) and not args.force:
            raise AverageError(f"--output {args.output} exists; give --force to replace it")
        import torch

        from fairseq_s2s_attn.checkpoint import allow_fairseq_checkpoints
        from fairseq_s2s_attn.errors import CheckpointError

        allow_fairseq_checkpoints()
        try:
            state, newest = average(paths)
        except CheckpointError as e:
            raise AverageError(str(e)) from None
        tmp = out + ".tmp"
        try:
            torch.save(state, tmp)
            os.replace(tmp, out)  # a failed write leaves an existing --output as it was
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise AverageError(f"{args.output}: {e.strerror or e}") from None
    except AverageError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"averaged {len(paths)} checkpoints into {args.output} "
          f"({os.path.getsize(out) / 2**20:.1f} MiB; options and training position of {newest}):")
    for path in paths:
        print(f"  {path}")


if __name__ == "__main__":
    main()
