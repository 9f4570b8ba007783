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
"""
import argparse
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

    from fairseq_s2s_attn import attention, dropout, optim

    fast_dropout, fused = dropout.Dropout.forward, optim.FUSED_ADAMW

    def setter(obj, name, value):
        return lambda: setattr(obj, name, value)

    return {
        "dropout": (setter(dropout.Dropout, "forward", fast_dropout),
                    setter(dropout.Dropout, "forward", FairseqDropout.forward)),
        "adam": (setter(optim, "FUSED_ADAMW", fused), setter(optim, "FUSED_ADAMW", None)),
        "context": (setter(attention, "FP32_CONTEXT", True), setter(attention, "FP32_CONTEXT", False)),
    }


LEVERS = ("dropout", "adam", "context")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="fairseq data-bin (e.g. work/demo/data-bin)")
    p.add_argument("--archs", nargs="+", default=["rnn_bahdanau", "rnn_luong", "rnn_luong_nofeed"],
                   choices=sorted(n for n in benchmark.ALL_CONFIGS if n != benchmark.BASELINE),
                   help="configurations (benchmark.py's names)")
    p.add_argument("--precisions", nargs="+", default=["bf16"], choices=benchmark.PRECISIONS)
    p.add_argument("--levers", nargs="+", default=list(LEVERS), choices=LEVERS)
    p.add_argument("--size", type=at_least(1), default=256, help="matched sizes, as benchmark.py --sizes")
    p.add_argument("--max-tokens", type=at_least(1), default=2000)
    p.add_argument("--updates", type=at_least(1), default=24, help="batches per round (pairs of updates)")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed updates first (fast paths on)")
    p.add_argument("--rounds", type=at_least(1), default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=at_least(1), default=1)
    args = p.parse_args(argv)
    benchmark.check_data(args.data, "train")

    import torch
    torch.set_num_threads(args.threads)
    from fairseq_s2s_attn.runtime import keep_freed_memory, limit_primitive_cache_in_training
    limit_primitive_cache_in_training(training=True)  # as in fairseq-train with the plugin
    keep_freed_memory(command=True)
    switches = levers()

    rows = []
    for name in args.archs:
        for prec in args.precisions:
            spec = dict(data=args.data, max_tokens=args.max_tokens, seed=args.seed, lr=0.001,
                        warmup=args.warmup, updates=args.updates, criterion=benchmark.DEFAULT_CRITERION,
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
    print(f"Sizes {args.size}, --max-tokens {args.max_tokens}, {args.updates} batches x {args.rounds} "
          f"rounds, each batch trained once with the lever off and once on (alternating order) after "
          f"{args.warmup} warm-up updates; speed-up = the median over pairs of off time / on time.\n")
    print("| config | precision | lever | pairs | ms/update off | ms/update on | speed-up | quartiles |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for name, label, lever, n, m_off, m_on, med, q1, q3 in rows:
        print(f"| {name} | {label} | {lever} | {n} | {m_off * 1000:.1f} | {m_on * 1000:.1f} | "
              f"{med:.3f} | {q1:.3f}-{q3:.3f} |")


if __name__ == "__main__":
    main()
