#!/usr/bin/env python3
"""Every architecture through fairseq-train, fairseq-generate and fairseq-interactive on a GPU, in
each precision, with a table of what it measured.

    python3 scripts/gpu_check.py --data work/demo/data-bin --out work/gpu-check
    bash scripts/gpu_check.sh        # the whole GPU check: CUDA tests, this, the benchmark

For each architecture (--archs) and precision (--precisions: fp32, fp16 = --fp16, bf16 = --bf16,
amp = --amp) it runs, in this one Python process (fairseq's command-line entry points called
in turn, so the ~12 s start-up of each command is paid once):

  train     fairseq-train for --updates updates at --max-tokens (adam, inverse_sqrt, label
            smoothing 0.1, no validation); train tok/s = median of fairseq's own wps over the
            logged intervals after the first (start-up and the first batches excluded).
  generate  fairseq-generate --beam 5 on the test split at --gen-batch-size, once without
            --print-alignment (sentences/s, tokens/s: fairseq's own timer around inference;
            src+tgt tok/s counts source and hypothesis tokens, as NVIDIA's GNMT figures do), then
            once with it (every A- line is checked: one pair per hypothesis token, positions in
            range), and BLEU4 on the (untrained-length) output as fairseq prints it.
  interactive  fairseq-interactive on three lines, beam 5: one H- line each.
  cpu == gpu  (fp32 only) the checkpoint trained on the GPU, loaded once on the CPU and once on
            the GPU, beam 5 over the first --compare-sentences test sentences: the share of
            identical hypotheses and the largest score difference (TF32 off for this).

Sizes (--sizes): 512 = matched sizes (embeddings, hidden sizes, readout and attention 512, one
layer, unidirectional encoder; fairseq's lstm likewise); paper = the architectures' own defaults
(rnn_*_paper at the papers' sizes). Results go to OUT/gpu_check.json after every configuration
(a run cut short keeps what it finished) and a Markdown table to OUT/gpu_check.md and stdout.
--cpu runs the same on the CPU (a dry run of this script; fp16 and amp need CUDA).
"""

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "fairseq_s2s_attn")

# name -> (--arch, extra options)
ARCHS = {
    "lstm": ("lstm", []),
    "rnn_vanilla": ("rnn_vanilla", []),
    "rnn_bahdanau": ("rnn_bahdanau", []),
    "rnn_luong": ("rnn_luong", ["--input-feeding", "true"]),
    "rnn_luong_nofeed": ("rnn_luong", ["--input-feeding", "false"]),
    "rnn_bahdanau_paper": ("rnn_bahdanau_paper", []),
    "rnn_luong_paper": ("rnn_luong_paper", []),
    "rnn_luong_local_m": ("rnn_luong", ["--attention-mode", "local-m"]),
    "rnn_bahdanau_coverage": ("rnn_bahdanau", ["--coverage", "true"]),
    "rnn_bahdanau_maxout_lstm": ("rnn_bahdanau", ["--readout", "maxout", "--rnn-type", "lstm"]),
    "rnn_bahdanau_compiled": ("rnn_bahdanau", ["--compile-step", "true"]),
    "rnn_luong_compiled": ("rnn_luong", ["--input-feeding", "true", "--compile-step", "true"]),
}
PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"], "amp": ["--amp"]}
INTERACTIVE_LINES = ["▁Open ▁the ▁file", "▁Save ▁changes ?", "▁The ▁file ▁could ▁not ▁be ▁opened ."]


def size_options(name, sizes):
    arch = ARCHS[name][0]
    if sizes == "paper":
        return []
    n = str(sizes)
    dims = ["--encoder-embed-dim", n, "--decoder-embed-dim", n, "--encoder-hidden-size", n,
            "--decoder-hidden-size", n, "--decoder-out-embed-dim", n]
    if arch == "lstm":
        return dims
    if arch.endswith("_paper"):  # the papers' structure (layers, maxout, GRU), matched widths
        return dims + ["--attention-dim", n, "--maxout-dim", n]
    return dims + ["--attention-dim", n, "--encoder-bidirectional", "false"]


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        try:
            self.lines.append(f"| {record.name} | {record.getMessage()}")
        except Exception:  # noqa: BLE001
            pass

    def take(self):
        lines, self.lines = self.lines, []
        return lines


def median_wps(lines):
    wps = [float(m.group(1)) for line in lines if "| train_inner |" in line
           for m in [re.search(r"\bwps[= ]([\d.]+)", line)] if m]
    timed = wps[1:] if len(wps) > 1 else wps
    return (statistics.median(timed) if timed else None), len(wps)


def last_value(lines, tag, key):
    for line in reversed(lines):
        if line.startswith(f"| {tag} |"):
            m = re.search(rf"\b{key}[= ]([\d.]+)", line)
            if m:
                return float(m.group(1))
    return None


def run_cli(module, argv, stdin_text=None):
    """fairseq's console entry point ``module.cli_main`` with argv; returns its stdout."""
    saved_argv, saved_stdin = sys.argv, sys.stdin
    out = io.StringIO()
    sys.argv = [module.__name__] + [str(a) for a in argv]
    if stdin_text is not None:
        sys.stdin = io.StringIO(stdin_text)
    try:
        with contextlib.redirect_stdout(out):
            module.cli_main()
    finally:
        sys.argv, sys.stdin = saved_argv, saved_stdin
    return out.getvalue()


def reset_fairseq_globals():
    """State fairseq keeps across calls in one process (meant for one command per process)."""
    from fairseq import checkpoint_utils
    from fairseq_cli import train

    for fn in (checkpoint_utils.save_checkpoint, train.should_stop_early):
        if hasattr(fn, "best"):
            del fn.best
    if hasattr(train.should_stop_early, "num_runs"):
        train.should_stop_early.num_runs = 0


def check_alignments(text, empty=False):
    """Every H- line has an A- line with one pair per hypothesis token, positions in range
    (empty: every A- line is empty, as for rnn_vanilla, which has no attention)."""
    src, hyp, ali = {}, {}, {}
    for line in text.splitlines():
        head, _, rest = line.partition("\t")
        if head[:2] in ("S-", "H-", "A-") and head[2:].isdigit():
            sid = int(head[2:])
            if head[0] == "S":
                src[sid] = rest
            elif head[0] == "H":
                hyp[sid] = rest.partition("\t")[2]
            else:
                ali[sid] = rest
    bad = 0
    for sid, h in hyp.items():
        n_src, n_hyp = len(src[sid].split()) + 1, len(h.split())
        pairs = [tuple(map(int, p.split("-"))) for p in ali.get(sid, "").split()]
        if empty:
            bad += sid not in ali or bool(pairs)
        elif len(pairs) != n_hyp or not all(0 <= s < n_src and 0 <= t < n_hyp for s, t in pairs):
            bad += 1
    return len(hyp), bad


def parse_translated(lines):
    for line in lines:
        m = re.search(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in [\d.]+s "
                      r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", line)
        if m:  # fairseq rounds the seconds to 0.1: they come from sentences / (sentences/s)
            sents, toks = int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))
            return sents, toks, sents / float(m.group(3))
    return None


def source_tokens(text):
    return sum(len(line.partition("\t")[2].split()) + 1 for line in text.splitlines()
               if line.startswith("S-"))


def compare_cpu_gpu(ckpt, data, n):
    """Beam 5 over the first n test sentences with the same checkpoint on the CPU and the GPU."""
    import torch
    from fairseq import checkpoint_utils, utils

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        results = {}
        for device in ("cpu", "cuda"):
            models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
                [ckpt], arg_overrides={"data": data})
            model = models[0].eval().to(device)
            task.load_dataset("test")
            ds = task.dataset("test")
            gen = task.build_generator([model], argparse.Namespace(beam=5))
            hyps = []
            for start in range(0, min(n, len(ds)), 32):
                sample = ds.collater([ds[i] for i in range(start, min(n, len(ds), start + 32))])
                sample = utils.move_to_cuda(sample) if device == "cuda" else sample
                with torch.no_grad():
                    out = gen.generate([model], sample)
                for sid, h in zip(sample["id"].tolist(), out):
                    hyps.append((sid, h[0]["tokens"].tolist(), float(h[0]["score"])))
            results[device] = sorted(hyps)
        same = sum(a[1] == b[1] for a, b in zip(results["cpu"], results["cuda"]))
        diff = max((abs(a[2] - b[2]) for a, b in zip(results["cpu"], results["cuda"]) if a[1] == b[1]),
                   default=float("nan"))
        return same / max(1, len(results["cpu"])), diff
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run_one(name, precision, args, capture):
    from fairseq_cli import generate, interactive, train

    arch, extra = ARCHS[name]
    device = ["--cpu"] if args.cpu else []
    flags = PRECISION_FLAGS[precision]
    save = os.path.join(args.out, "checkpoints", f"{name}-{precision}")
    res = {"name": name, "precision": precision}
    shutil.rmtree(save, ignore_errors=True)  # a fresh run, not a resumed one
    reset_fairseq_globals()
    capture.take()
    t0 = time.time()
    run_cli(train, [args.data, "--user-dir", USER_DIR, "--arch", arch, *size_options(name, args.sizes),
                    *extra, "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.002",
                    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100", "--clip-norm", "1",
                    "--criterion", args.criterion, "--label-smoothing", "0.1",
                    "--max-tokens", args.max_tokens, "--max-update", args.updates,
                    "--disable-validation", "--save-dir", save, "--no-epoch-checkpoints",
                    "--log-format", "simple", "--log-interval", args.log_interval,
                    "--num-workers", "0", "--seed", "1", *device, *flags])
    lines = capture.take()
    res["train_seconds"] = round(time.time() - t0, 1)
    res["train_wps"], res["train_intervals"] = median_wps(lines)
    res["train_loss"] = last_value(lines, "train", "loss")
    res["updates"] = last_value(lines, "train", "num_updates")
    ckpt = os.path.join(save, "checkpoint_last.pt")

    gen_args = [args.data, "--user-dir", USER_DIR, "--path", ckpt, "--beam", "5",
                "--batch-size", args.gen_batch_size, "--gen-subset", "test", "--num-workers", "0",
                *device, *[f for f in flags if f != "--amp"]]
    text = run_cli(generate, gen_args)
    lines = capture.take()
    translated = parse_translated(lines)
    if translated:
        sents, toks, secs = translated
        res.update(gen_sentences=sents, gen_sent_s=round(sents / secs, 1), gen_tok_s=round(toks / secs),
                   gen_src_tgt_tok_s=round((toks + source_tokens(text)) / secs))
    m = re.search(r"BLEU4 = ([\d.]+)", text)
    res["bleu4"] = float(m.group(1)) if m else None
    if args.alignment and arch != "lstm":
        text = run_cli(generate, gen_args + ["--print-alignment"])
        capture.take()
        res["aligned"], res["alignment_errors"] = check_alignments(text, empty=arch == "rnn_vanilla")
        # forced decoding of the references (SequenceScorer: the decoder over whole sequences,
        # as Translator.score and scripts/score_pairs.py run it)
        text = run_cli(generate, gen_args + ["--score-reference", "--print-alignment"])
        capture.take()
        res["forced_aligned"], res["forced_alignment_errors"] = check_alignments(
            text, empty=arch == "rnn_vanilla")
    if args.interactive:
        text = run_cli(interactive, [args.data, "--user-dir", USER_DIR, "--path", ckpt, "--beam", "5",
                                     *device, *[f for f in flags if f != "--amp"]],
                       stdin_text="\n".join(INTERACTIVE_LINES) + "\n")
        capture.take()
        res["interactive_ok"] = sum(line.startswith("H-") for line in text.splitlines()) == len(INTERACTIVE_LINES)
    if precision == "fp32" and not args.cpu and args.compare_sentences:
        res["cpu_gpu_same"], res["cpu_gpu_score_diff"] = compare_cpu_gpu(ckpt, args.data, args.compare_sentences)
    if not args.cpu:
        import torch

        res["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        torch.cuda.reset_peak_memory_stats()
    return res


def fmt(x, digits=0):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "ok" if x else "FAIL"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def table(results, header):
    base = {r["precision"]: r for r in results if r["name"] == "lstm" and r.get("train_wps")}
    rows = [header, "",
            "| model | precision | train tok/s | x lstm | train loss | beam-5 sent/s | beam-5 tok/s "
            "| x lstm | src+tgt tok/s | BLEU4 | A- lines | interactive | cpu = gpu | peak MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | {r['precision']} | FAILED: {r['error']} |" + " |" * 11)
            continue
        b = base.get(r["precision"], {})
        x_train = r["train_wps"] / b["train_wps"] if b.get("train_wps") and r.get("train_wps") else None
        x_gen = r["gen_tok_s"] / b["gen_tok_s"] if b.get("gen_tok_s") and r.get("gen_tok_s") else None
        ali = ("-" if "aligned" not in r else
               f"{r['aligned'] - r['alignment_errors']}/{r['aligned']} ok")
        if "forced_aligned" in r:
            ali += (f"; references {r['forced_aligned'] - r['forced_alignment_errors']}/"
                    f"{r['forced_aligned']} ok")
        same = ("-" if "cpu_gpu_same" not in r else
                f"{100 * r['cpu_gpu_same']:.0f}% same, max d={r['cpu_gpu_score_diff']:.1e}")
        rows.append(f"| {r['name']} | {r['precision']} | {fmt(r.get('train_wps'))} | {fmt(x_train, 2)} "
                    f"| {fmt(r.get('train_loss'), 2)} | {fmt(r.get('gen_sent_s'), 1)} | {fmt(r.get('gen_tok_s'))} "
                    f"| {fmt(x_gen, 2)} | {fmt(r.get('gen_src_tgt_tok_s'))} | {fmt(r.get('bleu4'), 2)} | {ali} "
                    f"| {fmt(r.get('interactive_ok'))} | {same} | {fmt(r.get('gpu_peak_mb'))} |")
    return "\n".join(rows)


def machine(cpu):
    import torch

    if cpu:
        return f"CPU dry run, torch {torch.__version__}"
    p = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="fairseq data-bin (the demo's: work/demo/data-bin)")
    p.add_argument("--out", default="work/gpu-check", help="checkpoints, gpu_check.json, gpu_check.md")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "bf16", "amp"],
                   choices=list(PRECISION_FLAGS))
    p.add_argument("--configs", nargs="+", metavar="ARCH:PRECISION",
                   help="run these pairs (e.g. rnn_bahdanau:fp16 lstm:bf16) instead of every "
                        "--archs x --precisions; lstm's rows are the 'x lstm' baseline")
    p.add_argument("--sizes", default="512", help="512 (matched sizes, any number) or paper")
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--criterion", default="fused_label_smoothed_cross_entropy",
                   choices=("fused_label_smoothed_cross_entropy", "label_smoothed_cross_entropy"),
                   help="training loss (default %(default)s, the plugin's fused output layer and "
                        "loss; label_smoothed_cross_entropy: fairseq's, the same loss)")
    p.add_argument("--max-tokens", type=int, default=8000)
    p.add_argument("--log-interval", type=int, default=25)
    p.add_argument("--gen-batch-size", type=int, default=128)
    p.add_argument("--compare-sentences", type=int, default=64,
                   help="fp32: sentences decoded on CPU and GPU from the same checkpoint (0: skip)")
    p.add_argument("--no-alignment", dest="alignment", action="store_false")
    p.add_argument("--no-interactive", dest="interactive", action="store_false")
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU")
    args = p.parse_args(argv)
    if args.configs:
        plan = []
        for item in args.configs:
            name, _, precision = item.partition(":")
            if name not in ARCHS or precision not in PRECISION_FLAGS:
                p.error(f"--configs {item}: expected ARCH:PRECISION with ARCH in {', '.join(ARCHS)} "
                        f"and PRECISION in {', '.join(PRECISION_FLAGS)}")
            plan.append((name, precision))
    else:
        names = sorted(args.archs, key=lambda n: n != "lstm")  # the baseline first
        plan = [(name, precision) for precision in args.precisions for name in names]
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    # fairseq's own logging.basicConfig does nothing once the root logger has a handler: set it up
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO, stream=sys.stderr)
    capture = LogCapture()
    logging.getLogger().addHandler(capture)
    import fairseq_s2s_attn  # noqa: F401  (the plugin, as --user-dir would load it)

    header = f"GPU check, {time.strftime('%Y-%m-%d %H:%M')}: {machine(args.cpu)}; sizes {args.sizes}, " \
             f"{args.updates} updates at --max-tokens {args.max_tokens}, beam 5 at batch {args.gen_batch_size}"
    print(header, flush=True)
    results = []
    for name, precision in plan:
        t0 = time.time()
        try:
            res = run_one(name, precision, args, capture)
        except BaseException as exc:  # noqa: BLE001  (one failure must not end the check)
            if isinstance(exc, KeyboardInterrupt):
                raise
            traceback.print_exc()
            res = {"name": name, "precision": precision,
                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"}
        res["seconds"] = round(time.time() - t0, 1)
        results.append(res)
        print(f"[gpu-check] {json.dumps(res)}", flush=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump({"header": header, "results": results}, f, indent=1)
    md = table(results, header)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
