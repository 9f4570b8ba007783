"""Training speed of the CPU fast paths, each switched off and on in turns in one process.

    python scripts/train_ab.py --data work/demo/data-bin --archs rnn_bahdanau rnn_luong \
        --levers dropout adam context --rounds 2

On a shared VM the time of a training update drifts by 30-40% within minutes, more than any one
fast path changes it, so separate runs (scripts/benchmark.py's rows, one process each) cannot
measure a lever of a few percent. Here one model per configuration (the benchmark's matched
sizes and options, ``benchmark.model_options``) trains on the benchmark's batches (--max-tokens,
shuffled, the same order); for every batch of every round, one update runs with the lever off
and one with it on, in alternating order, and the report gives the median of the per-pair
ratios (off time / on time: above 1, the fast path is faster) with their quartiles. The model
keeps training through both updates (fairseq's Adam as fairseq-train runs it, one thread).

Levers (the plugin's CPU fast paths; each one's "off" is the plain path it replaced):
  dropout   16-bit dropout masks (fairseq_s2s_attn/dropout.py) against torch's dropout
  adam      fairseq's Adam in torch's fused kernel (fairseq_s2s_attn/optim.py) against
            fairseq's Python loop
  context   the attention context's per-step products in fp32 in --cpu-bf16 training
            (fairseq_s2s_attn/attention.py) against autocast's bf16
  rows      --cpu-bf16 products over all positions padded to a few row counts
            (fairseq_s2s_attn/precision.py) with fairseq-train's oneDNN cache of compiled kernels
            (runtime.TRAINING_PRIMITIVE_CACHE), against each batch's own rows with the cache of
            16 that fairseq-train had before
  loss      the fused criterion's gradient written by its forward while each chunk of rows
            is in the cache (fairseq_s2s_attn/criterion.py) against torch's log_softmax row
            kernel forward and softmax backward
  inplace   fp32 logits worked on in place by the fused loss, a chunk of rows at a time
            (fairseq_s2s_attn/criterion.py) against a copy into an fp32 buffer and back
  bias      --cpu-bf16's output layer with its bias added by oneDNN's product
            (fairseq_s2s_attn/criterion.py) against torch's addmm, which writes the bias over
            the N x V logits first
  stepgrad  the step loop's weight gradients in one product per weight and batch
            (fairseq_s2s_attn/stepgrad.py) against autograd's per-step products and sums
  sources   the attention's source side (the dot and general scores' keys, the context's
            values) with its gradient in one batched product per batch (stepgrad.bmm) against
            autograd's per-step outer products and sums
  score     the additive score's backward from sigmoid(2 (q + k)) (attention.AdditiveScore)
            against the tanh remade in full
  fused     the additive score's forward and backward each in one loop compiled by inductor
            (fairseq_s2s_attn/fused.py) against torch's eager element-wise operations (where
            the C loops are built the scoreloop lever's loops run first: measure it with
            S2S_NATIVE=0)
  cells     the LSTM/GRU cell's element-wise half in one C loop each way
            (fairseq_s2s_attn/native.py) against torch's eager element-wise operations
  lossrows  the fused loss's rows (lse, row sums, gradient) in one C loop
            (native.loss_rows) against the eager passes over a chunk of rows
  dropmask  dropout's masks made and applied in one C loop each way, from a counter-based
            generator seeded once per call (native.dropout) against torch's random_ draws, a
            comparison and two products each way (the 16-bit masks of the dropout lever)
  scoreloop the additive score's forward and backward each in one C loop with an inline exp
            (native.additive_score) against inductor's compiled loops (the fused lever)
  accuracy  --report-accuracy's hits from the count of each row's maxima
            (criterion._argmax_hits) against torch's argmax of every row; needs
            --report-accuracy

The rows lever gains across batches (a kernel compiled for one batch serves later ones), so
switching it per batch would measure nothing: it runs side by side instead, two processes at
once, each pinned to its own core with the lever fixed (off, on) for --warmup + --updates
batches, the cores swapped in every other round; the report gives both processes' total time
and peak resident memory (VmHWM) and the ratio of the totals (off / on) per round. On one core
the two run one after the other.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402
from cli_args import at_least  # noqa: E402


def levers():
    """name -> (switch on, switch off): module state the fast path reads at every call."""
    from fairseq.modules import FairseqDropout

    from fairseq_s2s_attn import (attention, criterion, dropout, fused, native, optim, precision,
                                  stepgrad)

    fast_dropout, fused_adam = dropout.Dropout.forward, optim.FUSED_ADAMW

    def setter(obj, name, value):
        return lambda: setattr(obj, name, value)

    return {
        "dropout": (setter(dropout.Dropout, "forward", fast_dropout),
                    setter(dropout.Dropout, "forward", FairseqDropout.forward)),
        "adam": (setter(optim, "FUSED_ADAMW", fused_adam), setter(optim, "FUSED_ADAMW", None)),
        "context": (setter(attention, "FP32_CONTEXT", True), setter(attention, "FP32_CONTEXT", False)),
        "rows": (setter(precision, "PAD_ROWS", True), setter(precision, "PAD_ROWS", False)),
        "loss": (setter(criterion, "FORWARD_GRADIENT", True),
                 setter(criterion, "FORWARD_GRADIENT", False)),
        "inplace": (setter(criterion, "IN_PLACE_CHUNKS", True),
                    setter(criterion, "IN_PLACE_CHUNKS", False)),
        "bias": (setter(criterion, "BIAS_IN_PRODUCT", True),
                 setter(criterion, "BIAS_IN_PRODUCT", False)),
        "stepgrad": (setter(stepgrad, "DEFER", True), setter(stepgrad, "DEFER", False)),
        "sources": (setter(stepgrad, "DEFER_SOURCES", True),
                    setter(stepgrad, "DEFER_SOURCES", False)),
        "score": (setter(attention, "SIGMOID_BACKWARD", True),
                  setter(attention, "SIGMOID_BACKWARD", False)),
        "fused": (setter(fused, "ENABLED", True), setter(fused, "ENABLED", False)),
        "cells": (setter(native, "CELLS", True), setter(native, "CELLS", False)),
        "lossrows": (setter(native, "LOSS_ROWS", True), setter(native, "LOSS_ROWS", False)),
        "dropmask": (setter(native, "DROPOUT", True), setter(native, "DROPOUT", False)),
        "scoreloop": (setter(native, "SCORE", True), setter(native, "SCORE", False)),
        "accuracy": (setter(criterion, "ARGMAX_BY_COUNT", True),
                     setter(criterion, "ARGMAX_BY_COUNT", False)),
    }


LEVERS = ("dropout", "adam", "context", "rows", "loss", "inplace", "bias", "stepgrad", "sources",
          "score", "fused", "cells", "lossrows", "dropmask",
          "scoreloop", "accuracy")
SIDE_BY_SIDE = ("rows",)
OLD_TRAINING_PRIMITIVE_CACHE = 16  # fairseq-train's cap before the rows lever


def rows_worker(spec):
    """One process of the side-by-side measure: trains spec's model on its batches with the rows
    lever fixed; returns the per-update times (the timed ones) and the peak RSS in MB."""
    import torch
    from fairseq_s2s_attn import precision
    from fairseq_s2s_attn.runtime import keep_freed_memory

    os.sched_setaffinity(0, {spec["core"]})
    torch.set_num_threads(1)
    keep_freed_memory(command=True)
    precision.PAD_ROWS = spec["on"]
    cfg, task = benchmark.build(spec)
    torch.set_num_threads(1)
    batches = benchmark.train_batches(task, spec)
    torch.manual_seed(spec["seed"])
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    model.train()
    optimizer = benchmark.cpu_adam(model.parameters(), 0.001)
    times = []
    for sample in batches:
        t0 = time.perf_counter()
        loss, _, _ = criterion(model, sample)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return {"times": times[spec["warmup"]:], "peak_mb": hwm / 1024}


def side_by_side(spec, rounds):
    """[(off result, on result) per round] from pairs of rows_worker processes run at once."""
    import json
    import subprocess

    from fairseq_s2s_attn import runtime

    cores = sorted(os.sched_getaffinity(0))
    results = []
    for r in range(rounds):
        procs, outputs = {}, {}
        for k, on in enumerate((False, True)):
            core = cores[(k + r) % len(cores)]
            env = dict(os.environ, **{runtime.ONEDNN_CACHE_VAR: str(
                runtime.TRAINING_PRIMITIVE_CACHE if on else OLD_TRAINING_PRIMITIVE_CACHE)})
            cmd = [sys.executable, os.path.abspath(__file__), "--worker",
                   json.dumps(dict(spec, on=on, core=core))]
            procs[on] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
            if len(cores) < 2:  # one core: one after the other (read it whole: a wait() on a
                outputs[on] = procs[on].communicate()[0]  # full pipe would never return)
        out = {}
        for on, proc in procs.items():
            stdout = outputs[on] if on in outputs else proc.communicate()[0]
            if proc.returncode != 0:
                raise SystemExit(f"error: the side-by-side worker (rows {'on' if on else 'off'}) "
                                 f"failed with exit status {proc.returncode}")
            out[on] = json.loads(stdout.strip().splitlines()[-1])
        results.append((out[False], out[True]))
    return results


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--worker"]:
        import json
        print(json.dumps(rows_worker(json.loads(sys.argv[2]))))
        return
    p = benchmark.training_parser(__doc__, benchmark.ALL_CONFIGS)
    p.add_argument("--levers", nargs="+", choices=LEVERS,
                   help="default: all (accuracy only with --report-accuracy)")
    p.add_argument("--updates", type=at_least(1), default=24, help="batches per round (pairs of updates)")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed updates first (fast paths on)")
    p.add_argument("--rounds", type=at_least(1), default=2)
    p.add_argument("--threads", type=at_least(1), default=1)
    p.add_argument("--report-accuracy", action="store_true",
                   help="train with fused_label_smoothed_cross_entropy --label-smoothing 0.1 "
                        "--report-accuracy (the demo's criterion, counting correct predictions) "
                        "instead of fused_cross_entropy; the accuracy lever needs it")
    args = p.parse_args(argv)
    if args.levers is None:
        args.levers = [v for v in LEVERS if v != "accuracy" or args.report_accuracy]
    if "accuracy" in args.levers and not args.report_accuracy:
        p.error("--levers accuracy measures --report-accuracy's count: add --report-accuracy")
    benchmark.check_data(args.data, "train", synthetic=False)

    import torch
    torch.set_num_threads(args.threads)
    from fairseq_s2s_attn.runtime import keep_freed_memory, limit_primitive_cache_in_training
    limit_primitive_cache_in_training(training=True)  # as in fairseq-train with the plugin
    keep_freed_memory(command=True)
    switches = levers()

    criterion_name, criterion_options = benchmark.DEFAULT_CRITERION, []
    if args.report_accuracy:
        criterion_name = "fused_label_smoothed_cross_entropy"
        criterion_options = ["--label-smoothing", "0.1", "--report-accuracy"]
    rows, side = [], []
    for name in args.archs:
        for prec in args.precisions:
            spec = dict(data=args.data, max_tokens=args.max_tokens, seed=args.seed, lr=0.001,
                        warmup=args.warmup, updates=args.updates, criterion=criterion_name,
                        criterion_options=criterion_options,
                        model_options=benchmark.model_options(name, prec, args.size, 1, 0.1))
            cfg, task = benchmark.build(spec)
            torch.set_num_threads(args.threads)
            batches = benchmark.train_batches(task, spec)
            torch.manual_seed(args.seed)
            model = task.build_model(cfg.model)
            criterion = task.build_criterion(cfg.criterion)
            model.train()
            optimizer = benchmark.cpu_adam(model.parameters(), 0.001)

            def update(sample):
                t0 = time.perf_counter()
                loss, _, _ = criterion(model, sample)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return time.perf_counter() - t0

            for sample in batches[:args.warmup]:
                update(sample)
            timed = batches[args.warmup:]
            for lever in args.levers:
                if lever in SIDE_BY_SIDE:
                    side.append((name, benchmark.precision_label(name, prec),
                                 side_by_side(dict(spec, warmup=args.warmup), args.rounds)))
                    continue
                on, off = switches[lever]
                ratios, t_off, t_on = [], [], []
                for r in range(args.rounds):
                    for i, sample in enumerate(timed):
                        pair = {}
                        for state in (("off", "on") if (i + r) % 2 == 0 else ("on", "off")):
                            (on if state == "on" else off)()
                            pair[state] = update(sample)
                        on()
                        ratios.append(pair["off"] / pair["on"])
                        t_off.append(pair["off"])
                        t_on.append(pair["on"])
                q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
                rows.append((name, benchmark.precision_label(name, prec), lever, len(ratios),
                             statistics.median(t_off), statistics.median(t_on),
                             statistics.median(ratios), q[0], q[2]))
                print(f"{name} {prec} {lever}: {statistics.median(ratios):.3f}x", file=sys.stderr, flush=True)

    print(benchmark.report_header("CPU fast paths off and on in turns", "train_ab.py", argv, args.threads))
    if rows:
        print(f"Sizes {args.size}, --max-tokens {args.max_tokens}, --criterion "
              f"{' '.join([criterion_name] + criterion_options)}, {args.updates} batches x "
              f"{args.rounds} rounds, each batch trained once with the lever off and once on "
              f"(alternating order) after {args.warmup} warm-up updates; speed-up = the median over "
              f"pairs of off time / on time.\n")
        print("| config | precision | lever | pairs | ms/update off | ms/update on | speed-up | quartiles |")
        print("|---|---|---|---:|---:|---:|---:|---|")
    for name, label, lever, n, m_off, m_on, med, q1, q3 in rows:
        print(f"| {name} | {label} | {lever} | {n} | {m_off * 1000:.1f} | {m_on * 1000:.1f} | "
              f"{med:.3f} | {q1:.3f}-{q3:.3f} |")
    if side:
        from fairseq_s2s_attn.runtime import TRAINING_PRIMITIVE_CACHE
        print(f"\nLever rows, side by side (sizes {args.size}, --max-tokens {args.max_tokens}; two "
              f"processes at once, one core each, swapped every other round; {args.updates} timed "
              f"updates each after {args.warmup}): off = each "
              f"batch's own rows, oneDNN cache {OLD_TRAINING_PRIMITIVE_CACHE}; on = rows padded, "
              f"cache {TRAINING_PRIMITIVE_CACHE}.\n")
        print("| config | precision | round | s off | s on | ms/update off | ms/update on | speed-up "
              "| peak MB off | peak MB on |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, label, results in side:
            for r, (off, on) in enumerate(results, 1):
                t_off, t_on = sum(off["times"]), sum(on["times"])
                n = len(off["times"])
                print(f"| {name} | {label} | {r} | {t_off:.1f} | {t_on:.1f} | {t_off / n * 1000:.1f} | "
                      f"{t_on / n * 1000:.1f} | {t_off / t_on:.3f} | {off['peak_mb']:.0f} | "
                      f"{on['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
