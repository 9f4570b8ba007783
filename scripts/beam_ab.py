"""Beam search speed of several configurations in one process, taking turns: medians of rounds.

    python scripts/beam_ab.py --data work/demo/data-bin --archs lstm rnn_bahdanau rnn_luong \
        rnn_luong_nofeed --rounds 5

scripts/benchmark.py measures each configuration in its own process, one after the other, with
one short beam pass each; on a shared machine its beam figures moved by 10-40% between rows of
one run (two rows running the same generation code once differed by 1.4x). Here every model is
built once, in one process, with the benchmark's matched sizes and options
(``benchmark.model_options``), prepared for inference as fairseq-generate prepares it (with the
plugin's allocator setting, fairseq_s2s_attn/runtime.py), and
decodes the benchmark's batches (the first --gen-sentences sentences of --gen-split, batches of
--gen-batch-size, every hypothesis forced to the longest reference length of its batch) with
fairseq's SequenceGenerator. Each round runs every (configuration, precision, beam) once, in an
order rotated from round to round; a slow spell of the machine then slows every configuration
of that round, and the median over rounds of each one's time, and its ratio to fairseq's lstm
within each round, are what the report gives. Untrained (random) weights, one thread.

``--precisions ... int8`` adds rows in int8: ours with ``--cpu-bf16 --cpu-int8`` (the decoder's
step weights in int8, fairseq_s2s_attn/int8.py), fairseq's lstm (fp32) with its Linear, LSTM and
LSTMCell layers through torch's ``quantize_dynamic``; "best lstm" is then the fastest of lstm's
rows, int8 included.

With ``--levers``, every (configuration, beam) also runs once per round with each named lever
off (one of fairseq_s2s_attn/native.py's C loops of decoding, or search.py's lines of fairseq's
search: ``LEVERS``), in the same rotation, and a second table gives each lever's speed-up: the
median over rounds of time off / time on.
"""
import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (scripts/benchmark.py: options, data and machine description)
from cli_args import at_least  # noqa: E402


# beam_ab's precisions: benchmark.py's, and int8: our models with --cpu-bf16 --cpu-int8,
# fairseq's lstm (fp32) with its Linear, LSTM and LSTMCell layers through torch's quantize_dynamic
PRECISIONS = benchmark.PRECISIONS + ("int8",)


def precision_label(name, precision):
    if precision != "int8":
        return benchmark.precision_label(name, precision)
    if benchmark.ALL_CONFIGS[name][0] == "lstm":
        return "int8 (torch's quantize_dynamic)"
    return "bf16 + int8 (--cpu-bf16 --cpu-int8)"


def load(name, precision, args):
    import torch
    lstm = benchmark.ALL_CONFIGS[name][0] == "lstm"
    base = precision if precision != "int8" else "fp32" if lstm else "bf16"
    options = benchmark.model_options(name, base, args.size, args.layers, 0.1)
    if precision == "int8" and not lstm:
        options += ["--cpu-int8", "true"]
    spec = dict(data=args.data, max_tokens=2000, seed=args.seed, lr=0.001, model_options=options)
    cfg, task = benchmark.build(spec)
    torch.manual_seed(args.seed)
    model = task.build_model(cfg.model)
    model.prepare_for_inference_(cfg)
    model.eval()
    if precision == "int8" and lstm:
        model = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear, torch.nn.LSTM, torch.nn.LSTMCell}, dtype=torch.qint8)
    lstm_bf16 = precision == "bf16" and lstm
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if lstm_bf16 else contextlib.nullcontext
    return task, model, autocast


# lever -> (module of fairseq_s2s_attn, name): a flag of native.py that turns a C loop off when
# False, or a function of search.py that takes False (fairseq's own lines) and True
LEVERS = {"logsoftmax": ("native", "LOG_SOFTMAX"), "topk": ("native", "TOPK"),
          "scoreloop": ("native", "SCORE"), "cells": ("native", "CELLS"),
          "searchlines": ("search", "use_search_lines")}


def switch(lever, on):
    """Turns a lever on (True: the plugin's fast path) or off."""
    module, name = LEVERS[lever]
    module = importlib.import_module(f"fairseq_s2s_attn.{module}")
    if callable(getattr(module, name)):
        getattr(module, name)(on)
    else:
        setattr(module, name, on)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="fairseq data-bin (e.g. work/demo/data-bin)")
    p.add_argument("--archs", nargs="+", default=["lstm", "rnn_bahdanau", "rnn_luong", "rnn_luong_nofeed"],
                   choices=sorted(benchmark.ALL_CONFIGS), help="configurations (benchmark.py's names)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=PRECISIONS,
                   help="fp32, bf16 (--cpu-bf16; lstm under torch.autocast), int8 (--cpu-bf16 "
                        "--cpu-int8; lstm through torch's quantize_dynamic)")
    p.add_argument("--beams", nargs="+", type=at_least(1), default=[5, 1])
    p.add_argument("--size", type=at_least(1), default=256, help="matched sizes, as benchmark.py --sizes")
    p.add_argument("--layers", type=at_least(1), default=1)
    p.add_argument("--gen-split", default="test")
    p.add_argument("--gen-sentences", type=at_least(1), default=48)
    p.add_argument("--gen-batch-size", type=at_least(1), default=16)
    p.add_argument("--rounds", type=at_least(1), default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=at_least(1), default=1)
    p.add_argument("--levers", nargs="+", default=[], choices=sorted(LEVERS),
                   help="also run each configuration with each of these C loops off, in turns, "
                        "and report the speed-up of each (logsoftmax: the decoder's log-softmax, "
                        "topk: beam search's candidates, scoreloop: the additive score, cells: "
                        "the LSTM/GRU cells, searchlines: fairseq's NaN scrub as one pass and "
                        "no division by a temperature of 1)")
    args = p.parse_args(argv)
    if benchmark.BASELINE not in args.archs:
        p.error(f"--archs needs {benchmark.BASELINE} (the ratios are against it)")
    benchmark.check_data(args.data, args.gen_split)

    import torch
    torch.set_num_threads(args.threads)
    from fairseq.sequence_generator import SequenceGenerator

    from fairseq_s2s_attn.runtime import keep_freed_memory
    keep_freed_memory(command=True)  # as in fairseq-generate with the plugin (every configuration)

    configs = [(n, prec) for n in args.archs for prec in args.precisions]
    models = {c: load(*c, args) for c in configs}
    task = models[configs[0]][0]
    batches = benchmark.gen_batches(task, dict(gen_split=args.gen_split, gen_sentences=args.gen_sentences,
                                               gen_batch_size=args.gen_batch_size))
    sentences = sum(int(s["nsentences"]) for s, _ in batches)

    def passes(config, beam, lever=None):
        _, model, autocast = models[config]
        gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_a=0,
                                max_len_b=1, min_len=1)

        def run():
            if lever is not None:
                switch(lever, False)
            try:
                t0 = time.perf_counter()
                with torch.no_grad():
                    for sample, length in batches:
                        gen.max_len_b, gen.min_len = length, length
                        with autocast():
                            gen.generate([model], sample)
                return time.perf_counter() - t0
            finally:
                if lever is not None:
                    switch(lever, True)
        return run

    runs = {}
    for c in configs:
        for b in args.beams:  # a configuration's lever runs right after its own (the same spell)
            runs[(c, b)] = passes(c, b)
            runs.update({(c, b, lever): passes(c, b, lever) for lever in args.levers})
    for run in runs.values():  # warm-up: one pass each
        run()
    times = {key: [] for key in runs}
    keys = list(runs)
    for r in range(args.rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            times[key].append(runs[key]())
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    print(benchmark.report_header("Beam search taking turns in one process", "beam_ab.py", argv, args.threads))
    print(f"{sentences} sentences of {args.gen_split} in batches of {args.gen_batch_size}, sizes "
          f"{args.size}, {args.rounds} rounds (+1 warm-up). Ratios: per round against fairseq's lstm "
          f"(fp32, and at its fastest setting per beam: the faster of its rows), then the median.\n")
    header = "| config | precision | " + " | ".join(
        f"beam {b} sent/s | × lstm fp32 | × best lstm" for b in args.beams) + " |"
    print(header)
    print("|---|---|" + "---:|---:|---:|" * len(args.beams))
    for config in configs:
        name, prec = config
        cells = []
        for b in args.beams:
            mine = times[(config, b)]
            fp32 = times[((benchmark.BASELINE, "fp32"), b)] if "fp32" in args.precisions else None
            lstm_rows = [times[((benchmark.BASELINE, q), b)] for q in args.precisions]
            best = min(lstm_rows, key=statistics.median)
            cells.append(f"{sentences / statistics.median(mine):.1f}")
            cells.append("" if fp32 is None else f"{statistics.median([f / m for f, m in zip(fp32, mine)]):.2f}")
            cells.append(f"{statistics.median([f / m for f, m in zip(best, mine)]):.2f}")
        print(f"| {name} | {precision_label(name, prec)} | " + " | ".join(cells) + " |")
    if args.levers:
        print("\nEach lever off and on in the same rounds (speed-up: the median over rounds of "
              "time off / time on):\n")
        print("| config | precision | beam | lever | sent/s off | sent/s on | speed-up |")
        print("|---|---|---:|---|---:|---:|---:|")
        for config in configs:
            for b in args.beams:
                for lever in args.levers:
                    on, off = times[(config, b)], times[(config, b, lever)]
                    print(f"| {config[0]} | {precision_label(*config)} | {b} | {lever} | "
                          f"{sentences / statistics.median(off):.1f} | "
                          f"{sentences / statistics.median(on):.1f} | "
                          f"{statistics.median([f / n for f, n in zip(off, on)]):.3f} |")


if __name__ == "__main__":
    main()
