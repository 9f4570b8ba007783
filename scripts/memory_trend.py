"""Peak memory of long CPU trainings against fairseq's lstm fp32 (issue #11, item 3).

    python scripts/memory_trend.py --data work/demo/data-bin --updates 400

scripts/benchmark.py measures the growth of the peak resident set over its 20 timed updates; a
training runs for thousands, on batches of every length, and what a process keeps grows with
the longest batches it has seen (freed heap, oneDNN's compiled kernels and scratchpads). Here
each configuration trains --updates updates in its own process, on the benchmark's batches
(``benchmark.train_batches``: --max-tokens, --seed, shuffled, the same batches in the same
order for every row, going round the epoch again on a small data set), with fairseq's Adam, one
thread, and reports its resident set every --every updates and its peak (VmHWM) at the end.

Rows: fairseq's lstm in fp32 twice, as stock fairseq runs it ("stock": glibc's default
allocator, oneDNN's default cache of compiled kernels) and as fairseq-train runs it with the
plugin ("plugin": fairseq_s2s_attn/runtime.py's cache of 128 kernels and freed memory kept on
the heap), then each of --archs in each of --precisions as fairseq-train runs it with the
plugin. Each peak is also given as a ratio against both lstm rows of the same run, and as
growth over the process's resident set once data, batches and libraries are loaded (before the
model is built): the same for every row. Sizes as benchmark.py's (--size, 1 layer, dropout 0.1).
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402
from cli_args import at_least  # noqa: E402


def _status_mb(field: str) -> float:
    return benchmark._status_kb(field) / 1024


def worker(spec):
    """One row: trains spec's model for spec["updates"] updates; returns the resident set (MB)
    before the model is built, every spec["every"] updates, and its peak."""
    import torch

    from fairseq_s2s_attn.runtime import keep_freed_memory, limit_primitive_cache_in_training

    kept = False
    if spec["runtime"] == "plugin":  # as fairseq-train sets them with the plugin
        limit_primitive_cache_in_training(training=True)
        kept = keep_freed_memory(command=True)  # False where the allocator is not glibc's
    cfg, task = benchmark.build(spec)
    torch.set_num_threads(1)
    batches = benchmark.train_batches(task, spec)
    base = _status_mb("VmRSS")
    torch.manual_seed(spec["seed"])
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    model.train()
    optimizer = benchmark.cpu_adam(model.parameters(), spec["lr"])
    trend = []
    for i, sample in enumerate(batches, 1):
        criterion(model, sample)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i % spec["every"] == 0 or i == len(batches):
            trend.append((i, round(_status_mb("VmRSS"))))
    return {"base_mb": base, "peak_mb": _status_mb("VmHWM"), "trend": trend,
            "freed_memory_kept": kept}


def run_row(spec):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, env=benchmark.worker_env(1), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {spec['name']} {spec['precision']} row failed with exit "
                         f"status {proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    p = benchmark.training_parser(__doc__, benchmark.CONFIGS)
    p.add_argument("--updates", type=at_least(1), default=400, help="training updates per row")
    p.add_argument("--every", type=at_least(1), default=50,
                   help="report the resident set every this many updates")
    args = p.parse_args(argv)
    benchmark.check_data(args.data, "train", synthetic=False)

    rows = [("lstm", "fp32", "stock"), ("lstm", "fp32", "plugin")]
    rows += [(name, prec, "plugin") for name in args.archs for prec in args.precisions]
    results = []
    for name, prec, runtime in rows:
        spec = dict(data=args.data, max_tokens=args.max_tokens, seed=args.seed, lr=0.001, warmup=0,
                    updates=args.updates, every=args.every, criterion=benchmark.DEFAULT_CRITERION,
                    model_options=benchmark.model_options(name, prec, args.size, 1, 0.1),
                    name=name, precision=prec, runtime=runtime)
        results.append(run_row(spec))
        print(f"{name} {prec} {runtime}: peak {results[-1]['peak_mb']:.0f} MB, freed memory kept "
              f"on the heap: {results[-1]['freed_memory_kept']}", file=sys.stderr, flush=True)

    print(benchmark.report_header("Peak memory of long CPU trainings", "memory_trend.py", argv, 1))
    print(f"Sizes {args.size}, --max-tokens {args.max_tokens}, {args.updates} updates per row "
          f"(each in its own process, the same batches in the same order); resident set (VmRSS) "
          f"in MB every {args.every} updates, peak = VmHWM at the end, growth = peak - the "
          f"resident set before the model was built.\n")
    stock, plugin = results[0], results[1]
    steps = [i for i, _ in results[0]["trend"]]
    print("| config | precision | run-time settings | " + " | ".join(f"RSS @{i}" for i in steps)
          + " | peak MB | x lstm stock | x lstm plugin | growth MB | growth x lstm stock |")
    print("|---|---|---|" + "---:|" * (len(steps) + 5))
    for (name, prec, runtime), res in zip(rows, results):
        growth = res["peak_mb"] - res["base_mb"]
        print(f"| {name} | {benchmark.precision_label(name, prec)} | {runtime} | "
              + " | ".join(str(mb) for _, mb in res["trend"])
              + f" | {res['peak_mb']:.0f} | {res['peak_mb'] / stock['peak_mb']:.2f} | "
              f"{res['peak_mb'] / plugin['peak_mb']:.2f} | {growth:.0f} | "
              f"{growth / (stock['peak_mb'] - stock['base_mb']):.2f} |")


if __name__ == "__main__":
    main()
