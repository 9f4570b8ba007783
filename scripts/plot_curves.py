#!/usr/bin/env python3
"""Training curves from fairseq training logs: training and validation loss (and validation BLEU
where the run computed it, --eval-bleu) against updates and against wall-clock time.

    python scripts/plot_curves.py work/demo/results/rnn_bahdanau/train.log --out curves.png
    python scripts/plot_curves.py a/train.log b/train.log --labels A B --out-prefix OUT/curves

Reads what fairseq-train (and fairseq-hydra-train, hydra_train.log) prints with --log-format
simple or json: `train_inner` lines (every --log-interval updates), the end-of-epoch `train`
line and `valid` lines. --out FILE.png draws one figure (loss against updates and against time;
a BLEU row when there is BLEU) with every log in it (any format matplotlib writes: .png, .svg,
.pdf, ...; a name without extension gets .png, a folder gets curves.png inside it); --out-prefix P
draws one figure per x axis with every log overlaid: P_updates.png, P_time.png, and P_bleu.png
when a log has BLEU. The files written are printed.

Losses are fairseq's, in base 2 (with label smoothing, the smoothed loss). Wall-clock time is
fairseq's `wall` (whole seconds since training started; drawn in minutes beyond 10 minutes); a
validation point takes the time of the next training line, which fairseq prints right after
validating. A log appended to by a resumed run (`>> train.log`; hydra_train.log always appends)
restarts fairseq's `wall` at 0: each restart is counted from the previous run's last `wall`, so
time keeps going forward.
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_args import folder_problem  # noqa: E402

TAG = re.compile(r"(?:\| (train_inner|train|valid) \| |\]\[(train_inner|train|valid)\]\[\w+\] - )(.*)$")
PIPE_KV = re.compile(r"\| (\w+) (-?[\d.]+(?:e-?\d+)?|inf|nan)(?= \||$)")
EQ_KV = re.compile(r"(\w+)=(-?[\d.]+(?:e-?\d+)?|inf|nan)(?=,|$)")


def parse_line(line):
    """(tag, {key: float}) for a train_inner/train/valid line of a fairseq log, else None."""
    m = TAG.search(line.rstrip("\n"))
    if not m:
        return None
    tag, rest = m.group(1) or m.group(2), m.group(3)
    if rest.startswith("{"):  # --log-format json: train/valid keys carry the subset as prefix
        try:
            raw = json.loads(rest)
        except ValueError:
            return None
        stats = {}
        for k, v in raw.items():
            k = k[len(tag) + 1:] if tag != "train_inner" and k.startswith(tag + "_") else k
            try:
                stats[k] = float(v)
            except (TypeError, ValueError):
                pass
    else:  # simple: "| key value" fields (train, valid) or "key=value," (train_inner)
        stats = {k: float(v) for k, v in PIPE_KV.findall(" " + rest)}
        stats.update({k: float(v) for k, v in EQ_KV.findall(rest)})
    if "num_updates" not in stats or "loss" not in stats:
        return None
    return tag, stats


def read_log(path):
    """{'train_inner': [...], 'train': [...], 'valid': [...]}, each a list of dicts with
    updates, wall (seconds or None), loss and, for valid, bleu (or None)."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parsed = parse_line(line)
            if parsed:
                records.append(parsed)
    offset, last = 0.0, None
    for _tag, s in records:  # a resumed run appended to the log: its wall restarts from 0
        if "wall" in s:
            if last is not None and s["wall"] < last:
                offset += last
            last = s["wall"]
            s["wall"] += offset
    run = {"train_inner": [], "train": [], "valid": []}
    for i, (tag, s) in enumerate(records):
        wall = s.get("wall")
        if tag == "valid":  # no wall of its own: the next training line's (printed right after)
            later = [r[1]["wall"] for r in records[i + 1:] if r[0] != "valid" and "wall" in r[1]]
            earlier = [r[1]["wall"] for r in records[:i] if r[0] != "valid" and "wall" in r[1]]
            wall = later[0] if later else (earlier[-1] if earlier else None)
        run[tag].append({"updates": int(s["num_updates"]), "wall": wall, "loss": s["loss"],
                         "bleu": s.get("bleu")})
    return run


def train_points(run):
    """The training curve: train_inner lines, or the end-of-epoch lines when there are none."""
    return run["train_inner"] or run["train"]


def has_bleu(run):
    return any(p["bleu"] is not None for p in run["valid"])


def _xy(points, x, y):
    pts = [(p[x], p[y]) for p in points if p[x] is not None and p[y] is not None]
    return [a for a, _ in pts], [b for _, b in pts]


def _draw(ax, runs, x, y, with_train=True):
    """Every run on one axis: train dashed, valid solid with markers, one colour per run."""
    walls = [p["wall"] or 0 for _, r in runs for k in ("train_inner", "train", "valid") for p in r[k]]
    minutes = x == "wall" and max(walls, default=0) > 600
    for i, (label, run) in enumerate(runs):
        color = f"C{i % 10}"
        prefix = f"{label} " if len(runs) > 1 else ""
        if with_train:
            xs, ys = _xy(train_points(run), x, y)
            xs = [v / 60 for v in xs] if minutes else xs
            if xs:
                ax.plot(xs, ys, "--", color=color, alpha=0.8, lw=1.2, label=f"{prefix}train")
        xs, ys = _xy(run["valid"], x, y)
        xs = [v / 60 for v in xs] if minutes else xs
        if xs:
            ax.plot(xs, ys, "-o", color=color, ms=3.5, lw=1.6, label=f"{prefix}valid")
    ax.set_xlabel("updates" if x == "updates" else f"wall-clock time ({'min' if minutes else 's'})")
    ax.set_ylabel({"loss": "loss (base 2)", "bleu": "validation BLEU"}[y])
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_figure(runs, path, title=None):
    """One figure: loss against updates and against time; a BLEU row when a run has BLEU."""
    plt = _pyplot()
    rows = 2 if any(has_bleu(r) for _, r in runs) else 1
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False)
    for col, x in enumerate(("updates", "wall")):
        _draw(axes[0][col], runs, x, "loss")
        if rows == 2:
            _draw(axes[1][col], runs, x, "bleu", with_train=False)
    fig.suptitle(title or "training and validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_overlay(runs, prefix, title=None):
    """prefix_updates.png and prefix_time.png (loss), prefix_bleu.png when a run has BLEU."""
    plt = _pyplot()
    written = []
    for name, x in (("updates", "updates"), ("time", "wall")):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        _draw(ax, runs, x, "loss")
        ax.set_title(f"{title + ': ' if title else ''}loss against "
                     f"{'updates' if x == 'updates' else 'wall-clock time'}")
        fig.tight_layout()
        fig.savefig(f"{prefix}_{name}.png", dpi=100)
        plt.close(fig)
        written.append(f"{prefix}_{name}.png")
    if any(has_bleu(r) for _, r in runs):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
        for col, x in enumerate(("updates", "wall")):
            _draw(axes[0][col], runs, x, "bleu", with_train=False)
        fig.suptitle(f"{title + ': ' if title else ''}validation BLEU")
        fig.tight_layout()
        fig.savefig(f"{prefix}_bleu.png", dpi=100)
        plt.close(fig)
        written.append(f"{prefix}_bleu.png")
    return written


def default_labels(logs):
    """The logs' folder names; folder/file stem where two logs share a folder name, else the path."""
    folders = [os.path.basename(os.path.dirname(os.path.abspath(p))) or str(p) for p in logs]
    labels = [f"{d}/{os.path.splitext(os.path.basename(p))[0]}" if folders.count(d) > 1 else d
              for d, p in zip(folders, logs)]
    return [label if labels.count(label) == 1 else str(p) for label, p in zip(labels, logs)]


def load_runs(logs, labels=None):
    labels = labels or default_labels(logs)
    if len(labels) != len(logs):
        raise SystemExit(f"error: {len(logs)} logs but {len(labels)} labels")
    for path in logs:  # every log checked before any is read
        if not os.path.isfile(path):
            what = "a folder, not a training log" if os.path.isdir(path) else "no such file"
            raise SystemExit(f"error: {path}: {what}")
    runs = []
    for label, path in zip(labels, logs):
        try:
            run = read_log(path)
        except OSError as e:
            raise SystemExit(f"error: {path}: cannot read ({e.strerror or e})") from None
        if not train_points(run) and not run["valid"]:
            raise SystemExit(f"error: {path}: no train_inner/train/valid lines with loss and "
                             "num_updates (fairseq-train --log-format simple or json)")
        runs.append((label, run))
    return runs


def out_file(path):
    """The file --out writes: curves.png inside a folder (one that exists, or a path ending in
    /), PATH.png for a name without extension (as matplotlib saves it), else PATH."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return os.path.join(path, "curves.png")
    return path if os.path.splitext(path)[1] else path + ".png"


def out_problem(path):
    """Why the figure `path` could not be written (checked before any log is read), or None."""
    ext = os.path.splitext(path)[1][1:].lower()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        known = ", ".join("." + f for f in sorted(formats))
        return f"matplotlib cannot write .{ext} files (it writes {known})"
    folder = os.path.dirname(path)
    problem = folder and folder_problem(folder)
    return f"its folder {folder} {problem}" if problem else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="fairseq training logs")
    p.add_argument("--labels", nargs="+", help="one name per log (default: the log's folder; "
                   "folder/file stem for logs in the same folder)")
    p.add_argument("--out", help="one figure with every log: FILE.png (or .svg, .pdf, ...; no extension: "
                   "FILE.png; a folder: FOLDER/curves.png)")
    p.add_argument("--out-prefix", help="one figure per x axis, every log overlaid: PREFIX_*.png")
    p.add_argument("--title")
    args = p.parse_args(argv)
    if not args.out and not args.out_prefix:
        p.error("give --out FILE.png and/or --out-prefix PREFIX")
    out = args.out and out_file(args.out)
    prefix = args.out_prefix and args.out_prefix + "_updates.png"
    for option, given, path in (("--out", args.out, out), ("--out-prefix", args.out_prefix, prefix)):
        problem = path and out_problem(path)
        if problem:
            p.error(f"{option} {given}: {problem}")
    runs = load_runs(args.logs, args.labels)
    written = []
    try:
        for path in [out, args.out_prefix]:
            if path and os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
        if out:
            written += plot_figure(runs, out, args.title)
        if args.out_prefix:
            written += plot_overlay(runs, args.out_prefix, args.title)
    except OSError as e:
        p.error(f"cannot write {e.filename or out or args.out_prefix} ({e.strerror or e})")
    for label, run in runs:
        tr, va = train_points(run), run["valid"]
        last = f", last valid loss {va[-1]['loss']:.3f} at {va[-1]['updates']} updates" if va else ""
        print(f"{label}: {len(tr)} training and {len(va)} validation points{last}")
    print("wrote " + " ".join(written))


if __name__ == "__main__":
    sys.exit(main())
