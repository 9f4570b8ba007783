#!/usr/bin/env python3
"""Speed, memory and FLOP-efficiency benchmark: our architectures against fairseq's own ``lstm``.

    python scripts/benchmark.py --data work/demo/data-bin --out BENCHMARKS.md

(defaults: 20 timed updates, beam search over the first 48 test sentences in batches of 16;
about 5 minutes for the 9 configurations on one core.)

One run measures, on the same binarised data and with matched sizes, every configuration

    rnn_vanilla       --arch rnn_vanilla
    rnn_bahdanau      --arch rnn_bahdanau
    rnn_luong         --arch rnn_luong --input-feeding true
    rnn_luong_nofeed  --arch rnn_luong --input-feeding false
    lstm              fairseq's --arch lstm (unidirectional encoder, Luong-general attention after
                      the decoder step, input feeding: the closest match to rnn_luong)

each at fp32 and bf16 (--precisions). Our bf16 is the model option --cpu-bf16 (torch CPU autocast
inside the model); fairseq's lstm has no CPU bf16 option (its --bf16 --cpu assumes a TPU), so its
bf16 row wraps the whole forward pass in torch.autocast("cpu", bfloat16). Every ratio is against
``lstm`` at fp32; a second table compares with fairseq's lstm at its fastest working setting
(per metric, the faster of its fp32 and bf16 rows).

Matched sizes (--sizes, default 256): embedding = encoder hidden = decoder hidden = decoder output
(readout) = attention size, --layers per side, unidirectional encoder, dropout --dropout everywhere,
no shared embeddings; the vocabulary is the data-bin's.

What is measured (each configuration in its own subprocess, one after the other, never in parallel):

  train tok/s     target tokens per second over --updates timed updates (forward, fairseq's
                  cross_entropy criterion, backward, torch.optim.Adam step), after --warmup untimed
                  updates. Batches come from fairseq's task.get_batch_iterator (--max-tokens,
                  --seed, shuffled epoch 1, required batch size multiple 8): the same batches in the
                  same order for every model (checked with a fingerprint of the sentence ids).
  beam-5 / beam-1 sentences (and tokens) per second with fairseq's SequenceGenerator on the first
                  --gen-sentences sentences of --gen-split, batches of --gen-batch-size in file
                  order, after one untimed warm-up batch. The models are untrained (random weights),
                  so their hypotheses' lengths would be arbitrary: every hypothesis is forced to
                  the length of the longest reference in its batch (EOS blocked before that step
                  with min_len, forced at it with max_len), so every model runs the same number of
                  decoder steps on the same batches. Tokens are counted as fairseq-generate counts
                  them (hypothesis tokens including EOS).
  peak MB         growth of the process's peak resident set size (VmHWM) over a baseline RSS
                  taken after imports, data loading, batching and one throwaway update and
                  generation batch with a separate model instance (freed again), so that lazily
                  loaded library code and one-off runtime set-up are not counted: the training
                  phase (model, gradients, Adam state, activations) and, separately, the
                  generation phase (beam 5 and 1, a fresh model). The
                  peak is reset between phases (/proc/self/clear_refs); where that is not allowed
                  (or with --separate-phases) each phase runs in its own subprocess and ru_maxrss
                  is used, which then also holds the throwaway warm-up's peak (the same work, so
                  about the same figure).
  GFLOP/s         FLOPs of the timed training updates / their time. FLOPs are counted with
                  torch.utils.flop_counter.FlopCounterMode on forward + backward of the first
                  --flop-batches timed batches (0 = all), per target token, times the timed target
                  tokens. FlopCounterMode counts matrix products (mm, addmm, bmm, baddbmm, ...),
                  including backward; an nn.LSTM/GRU over packed sequences and torch.lstm_cell
                  decompose into such products and are counted. oneDNN's fused RNN kernel
                  (aten.mkldnn_rnn_layer and its backward, used by nn.LSTM on unpacked CPU input) is
                  NOT counted by FlopCounterMode; its FLOPs are added analytically:
                  2 * T * B * (I + H) * G*H forward (G gates), twice that for backward. Element-wise
                  work (gate nonlinearities, softmax, dropout, the Adam update) is not counted.
  % of peak       GFLOP/s as a share of the machine's matmul peak in the same precision and the same
                  thread count: best of several 2048 x 2048 x 2048 torch.mm in fp32 or bf16.

Threads: --threads intra-op threads (default 1) and one inter-op thread in every subprocess
(torch.set_num_threads, OMP_NUM_THREADS, MKL_NUM_THREADS, S2S_NUM_THREADS). The load average at
the start and end is printed: on a busy machine the timings are not representative.

Output: the Markdown report is printed and appended to --out as a new dated section (earlier runs
are kept; --overwrite replaces the file). Worker logs go to --log-dir (default: a temp folder,
deleted on success).

Data: --data must be a fairseq data-bin (dict.*.txt, train.* and the --gen-split files). The demo
one is built by `python scripts/prepare_data.py all --lang de --work work/demo` (or `make demo`).
--synthetic builds a small synthetic reversal data-bin in a temporary folder instead
(scripts/make_synthetic.py + fairseq-preprocess).
"""
import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "fairseq_s2s_attn")
BIN = os.path.dirname(sys.executable)

# name -> (fairseq --arch, extra model options)
CONFIGS = {
    "rnn_vanilla": ("rnn_vanilla", []),
    "rnn_bahdanau": ("rnn_bahdanau", []),
    "rnn_luong": ("rnn_luong", ["--input-feeding", "true"]),
    "rnn_luong_nofeed": ("rnn_luong", ["--input-feeding", "false"]),
    "lstm": ("lstm", []),
}
BASELINE = "lstm"
PRECISIONS = ("fp32", "bf16")
RESULT_TAG = "BENCHMARK_RESULT "
T_START = time.perf_counter()


# =================================================================== model options


def model_options(name: str, precision: str, size: int, layers: int, dropout: float):
    arch, extra = CONFIGS[name]
    sizes = ["--encoder-embed-dim", size, "--decoder-embed-dim", size,
             "--encoder-hidden-size", size, "--decoder-hidden-size", size,
             "--decoder-out-embed-dim", size, "--encoder-layers", layers, "--decoder-layers", layers]
    if arch == "lstm":  # fairseq's lstm: unidirectional encoder and attention by default
        opts = ["--arch", arch] + sizes + ["--dropout", dropout]
    else:
        opts = (["--arch", arch] + sizes + ["--attention-dim", size, "--encoder-bidirectional", "false"]
                + [x for k in ("encoder-dropout-in", "encoder-dropout-out", "decoder-dropout-in",
                               "decoder-dropout-out") for x in ("--" + k, dropout)]
                + extra + ["--cpu-bf16", "true" if precision == "bf16" else "false"])
    return [str(x) for x in opts]


def precision_label(name: str, precision: str) -> str:
    if precision == "fp32":
        return "fp32"
    return "bf16 (torch.autocast)" if CONFIGS[name][0] == "lstm" else "bf16 (--cpu-bf16)"


# =================================================================== worker (one subprocess)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except (OSError, RuntimeError):
        return False


class PeakRSS:
    """Peak resident set size of this process, in kB, with a reset where Linux allows it."""

    def __init__(self, resettable: bool):
        self.resettable = resettable

    def reset(self):
        if self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS

    def current(self) -> int:
        return _status_kb("VmRSS")

    def peak(self) -> int:
        if self.resettable:
            return _status_kb("VmHWM")
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def release_memory():
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rnn_flop_formulas(tally):
    """FlopCounterMode formulas for oneDNN's fused RNN layer, which it does not count itself."""
    import torch
    aten = torch.ops.aten

    def layer_flops(input_shape, w_ih_shape, w_hh_shape, batch_first=False):
        tokens = 1
        for d in input_shape[:-1]:
            tokens *= d
        gates_h, in_dim = w_ih_shape
        return 2 * tokens * gates_h * (in_dim + w_hh_shape[1])

    def forward(input, weight0, weight1, *args, out_shape=None, **kwargs):
        n = layer_flops(input, weight0, weight1)
        tally["mkldnn_rnn_layer"] = tally.get("mkldnn_rnn_layer", 0) + n
        return n

    def backward(input, weight1, weight2, *args, out_shape=None, **kwargs):
        n = 2 * layer_flops(input, weight1, weight2)  # grad wrt inputs/state and wrt weights
        tally["mkldnn_rnn_layer_backward"] = tally.get("mkldnn_rnn_layer_backward", 0) + n
        return n

    return {aten.mkldnn_rnn_layer: forward, aten.mkldnn_rnn_layer_backward: backward}


def build(spec):
    """fairseq's own parse -> task -> model path, as fairseq-train does it."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [spec["data"], "--user-dir", USER_DIR, "--task", "translation", "--cpu",
            "--criterion", "cross_entropy", "--max-tokens", str(spec["max_tokens"]),
            "--seed", str(spec["seed"]), "--optimizer", "adam", "--lr", str(spec["lr"]),
            "--num-workers", "0"] + spec["model_options"]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    return cfg, task


def train_batches(task, spec):
    task.load_dataset("train")
    dataset = task.dataset("train")
    itr = task.get_batch_iterator(
        dataset=dataset, max_tokens=spec["max_tokens"], max_positions=task.max_positions(),
        ignore_invalid_inputs=True, required_batch_size_multiple=8, seed=spec["seed"],
        num_shards=1, shard_id=0, num_workers=0, epoch=1,
    ).next_epoch_itr(shuffle=True)
    need = spec["warmup"] + spec["updates"]
    batches = []
    for sample in itr:
        if sample and sample.get("ntokens", 0) > 0:
            batches.append(sample)
        if len(batches) == need:
            break
    if not batches:
        raise SystemExit("error: the training split gave no batches")
    while len(batches) < need:  # a small data set: go round the epoch again, same order
        batches.append(batches[len(batches) % max(1, len(batches))])
    return batches


def gen_batches(task, spec):
    split = spec["gen_split"]
    task.load_dataset(split)
    dataset = task.dataset(split)
    n = min(spec["gen_sentences"], len(dataset))
    out = []
    for start in range(0, n, spec["gen_batch_size"]):
        ids = list(range(start, min(n, start + spec["gen_batch_size"])))
        sample = dataset.collater([dataset[i] for i in ids])
        # hypothesis length: the longest reference in the batch, without its EOS
        length = max(1, max(int(dataset.tgt_sizes[i]) - 1 for i in ids))
        out.append((sample, length))
    return out


def fingerprint(id_lists) -> str:
    return hashlib.sha1(json.dumps(id_lists).encode()).hexdigest()[:12]


def run_train(spec, cfg, task, batches, autocast, result):
    import torch

    torch.manual_seed(spec["seed"])
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    model.train()
    criterion.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    result["params"] = sum(p.numel() for p in model.parameters())

    def forward_backward(sample):
        with autocast():
            loss, _sample_size, _log = criterion(model, sample)
        loss.backward()
        return loss

    warm, timed = batches[:spec["warmup"]], batches[spec["warmup"]:]
    for sample in warm:
        forward_backward(sample)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tokens, t0 = 0, time.perf_counter()
    for sample in timed:
        loss = forward_backward(sample)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(sample["ntokens"])
    seconds = time.perf_counter() - t0
    result.update(train_seconds=seconds, train_tokens=tokens, train_updates=len(timed),
                  train_sentences=sum(int(s["nsentences"]) for s in timed),
                  final_loss=float(loss.detach()) / max(1, int(timed[-1]["ntokens"])),
                  train_tok_s=tokens / seconds)
    return model, criterion, optimizer, forward_backward


def count_flops(spec, model, optimizer, forward_backward, timed, result):
    from torch.utils.flop_counter import FlopCounterMode

    k = spec["flop_batches"] or len(timed)
    counted = timed[:k]
    tally = {}
    with FlopCounterMode(display=False, custom_mapping=rnn_flop_formulas(tally)) as counter:
        for sample in counted:
            forward_backward(sample)
            optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    counted_tokens = sum(int(s["ntokens"]) for s in counted)
    per_token = flops / counted_tokens
    by_op = {str(op).replace("aten.", ""): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    result.update(flop_batches=len(counted), flops_counted=flops, flops_per_token=per_token,
                  flops_by_op=by_op, flops_analytic=sum(tally.values()),
                  gflop_per_update=per_token * result["train_tokens"] / result["train_updates"] / 1e9,
                  gflop_s=per_token * result["train_tok_s"] / 1e9)


def run_generate(spec, cfg, task, batches, autocast, result):
    import torch
    from fairseq.sequence_generator import SequenceGenerator

    torch.manual_seed(spec["seed"])
    model = task.build_model(cfg.model)
    model.eval()
    result.setdefault("params", sum(p.numel() for p in model.parameters()))
    for beam in spec["beams"]:
        gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam,
                                max_len_a=0, max_len_b=1, min_len=1)

        def translate(sample, length):
            gen.max_len_b, gen.min_len = length, length  # exactly `length` tokens, then EOS
            with autocast():
                hypos = gen.generate([model], sample)
            return sum(len(h[0]["tokens"]) for h in hypos)

        translate(*batches[0])  # warm-up
        sentences, tokens, t0 = 0, 0, time.perf_counter()
        for sample, length in batches:
            tokens += translate(sample, length)
            sentences += int(sample["nsentences"])
        seconds = time.perf_counter() - t0
        result[f"beam{beam}"] = dict(seconds=seconds, sentences=sentences, tokens=tokens,
                                     sent_s=sentences / seconds, tok_s=tokens / seconds)
        if beam == spec["beams"][0]:
            result[f"beam{beam}"]["breakdown"] = generation_breakdown(gen, batches, translate)


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
              "aten::mkldnn_rnn_layer"}


def generation_breakdown(gen, batches, translate):
    """Where one generation pass spends its time (from a separate, profiled pass): matrix
    products (self time of the matmul kernels), the rest of the model (encoder, decoder steps,
    output softmax, state reorders) and fairseq's search itself (topk, bookkeeping, finalising).
    Profiling adds a little time per operation, so read these as shares, not as speeds."""
    from torch.profiler import ProfilerActivity, profile

    ensemble = gen.model
    in_model = [0.0]
    wrapped = {}
    for name in ("forward_encoder", "forward_decoder", "reorder_encoder_out", "reorder_incremental_state"):
        method = getattr(ensemble, name)

        def timed(*a, _method=method, **k):
            t = time.perf_counter()
            try:
                return _method(*a, **k)
            finally:
                in_model[0] += time.perf_counter() - t

        wrapped[name] = method
        setattr(ensemble, name, timed)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for sample, length in batches:
                translate(sample, length)
            total = time.perf_counter() - t0
    finally:
        for name in wrapped:
            delattr(ensemble, name)  # back to the class's methods
    matmul = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e6
    return dict(matmul=matmul / total, model_other=max(0.0, in_model[0] - matmul) / total,
                search=max(0.0, total - in_model[0]) / total)


def runtime_warmup(spec, cfg, task, train, gen, autocast):
    """One throwaway update and generation batch with a separate model instance, before the memory
    baseline: lazily loaded library code, oneDNN/autocast initialisation and thread pools are then
    part of the baseline, not of the peaks measured for the model."""
    import torch
    from fairseq.sequence_generator import SequenceGenerator

    model = task.build_model(cfg.model)
    if train:
        criterion = task.build_criterion(cfg.criterion)
        optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"])
        model.train()
        with autocast():
            loss, _, _ = criterion(model, train[0])
        loss.backward()
        optimizer.step()
        del criterion, optimizer, loss
    if gen:
        model.eval()
        sample, length = gen[0]
        for beam in spec["beams"]:
            g = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_a=0,
                                  max_len_b=length, min_len=length)
            with autocast():
                g.generate([model], sample)
    del model


def worker(spec):
    threads = spec["threads"]
    import contextlib

    import torch
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    cfg, task = build(spec)
    torch.set_num_threads(threads)  # the plugin's run-time defaults must not change it
    bf16_outside = spec["precision"] == "bf16" and CONFIGS[spec["name"]][0] == "lstm"

    def autocast():
        if bf16_outside:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    result = {"name": spec["name"], "precision": spec["precision"], "size": spec["size"],
              "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
    phases = spec["phases"]
    tr = train_batches(task, spec) if "train" in phases else []
    gb = gen_batches(task, spec) if "generate" in phases else []
    result["train_fingerprint"] = fingerprint([s["id"].tolist() for s in tr])
    result["gen_fingerprint"] = fingerprint([[s["id"].tolist(), n] for s, n in gb])
    t_setup = time.perf_counter()
    runtime_warmup(spec, cfg, task, tr, gb, autocast)
    result["setup_seconds"] = t_setup - T_START
    result["runtime_warmup_seconds"] = time.perf_counter() - t_setup
    release_memory()
    rss = PeakRSS(spec["reset_peak"])
    rss.reset()
    baseline = rss.current()
    result["baseline_rss_mb"] = baseline / 1024

    if "train" in phases:
        model, criterion, optimizer, fb = run_train(spec, cfg, task, tr, autocast, result)
        result["train_peak_mb"] = max(0, rss.peak() - baseline) / 1024
        count_flops(spec, model, optimizer, fb, tr[spec["warmup"]:], result)
        del model, criterion, optimizer, fb
        release_memory()
    if "generate" in phases:
        rss.reset()
        run_generate(spec, cfg, task, gb, autocast, result)
        result["gen_peak_mb"] = max(0, rss.peak() - baseline) / 1024
    print(RESULT_TAG + json.dumps(result), flush=True)


def matmul_peak(spec):
    import torch
    torch.set_num_threads(spec["threads"])
    n, out = spec["n"], {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        for _ in range(2):
            torch.mm(a, b)
        best = float("inf")
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n ** 3 / best / 1e9
    print(RESULT_TAG + json.dumps(out), flush=True)


# =================================================================== driver


def worker_env(threads: int):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "S2S_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def call_worker(mode, spec, log_path, threads, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--" + mode, json.dumps(spec)]
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                  env=worker_env(threads), cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout} s (log: {log_path})"
    with open(log_path, "a") as log:
        log.write(proc.stdout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):]), None
    tail = open(log_path).read().strip().splitlines()
    reason = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
    return None, f"exit {proc.returncode}: {reason.strip()[:300]} (log: {log_path})"


def run_config(name, precision, size, args, reset_peak, log_dir):
    spec = dict(name=name, precision=precision, size=size, data=args.data, threads=args.threads,
                max_tokens=args.max_tokens, seed=args.seed, lr=args.lr, warmup=args.warmup,
                updates=args.updates, flop_batches=args.flop_batches, gen_split=args.gen_split,
                gen_sentences=args.gen_sentences, gen_batch_size=args.gen_batch_size,
                beams=args.beams, reset_peak=reset_peak,
                model_options=model_options(name, precision, size, args.layers, args.dropout))
    tag = f"{name}-{precision}-{size}"
    if reset_peak:
        groups = [["train", "generate"]]
    else:  # ru_maxrss cannot be reset: one subprocess per phase
        groups = [["train"], ["generate"]]
    merged = {}
    for phases in groups:
        spec["phases"] = phases
        log_path = os.path.join(log_dir, f"{tag}-{'+'.join(phases)}.log")
        result, error = call_worker("worker", spec, log_path, args.threads, args.timeout)
        if error:
            return None, error, spec
        for key, phase in (("train_fingerprint", "train"), ("gen_fingerprint", "generate")):
            if phase in phases:
                merged[key] = result[key]
        merged.update({k: v for k, v in result.items() if not k.endswith("_fingerprint")})
    return merged, None, spec


def check_data(data, gen_split):
    def missing():
        if not os.path.isdir(data):
            return f"{data} does not exist"
        if not glob.glob(os.path.join(data, "dict.*.txt")):
            return f"{data} has no dict.*.txt"
        for split in ("train", gen_split):
            if not glob.glob(os.path.join(data, f"{split}.*.bin")):
                return f"{data} has no {split}.*.bin"
        return None

    problem = missing()
    if problem:
        raise SystemExit(
            f"error: {problem}: --data must be a fairseq data-bin.\n"
            "Build the demo data first:\n"
            "    python scripts/prepare_data.py all --lang de --work work/demo\n"
            "(or `make demo`), or pass --synthetic to benchmark on a synthetic data-bin built in a "
            "temporary folder.")


def make_synthetic(root, args):
    raw, bin_dir = os.path.join(root, "raw"), os.path.join(root, "data-bin")
    env = worker_env(1)
    steps = [
        [sys.executable, os.path.join(ROOT, "scripts", "make_synthetic.py"), "--task", "reverse",
         "--out", raw, "--train", str(args.synthetic_train), "--valid", "50",
         "--test", str(max(args.gen_sentences, 50)), "--vocab", str(args.synthetic_vocab),
         "--max-len", str(args.synthetic_max_len), "--seed", str(args.seed)],
        [os.path.join(BIN, "fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
         "--trainpref", os.path.join(raw, "train"), "--validpref", os.path.join(raw, "valid"),
         "--testpref", os.path.join(raw, "test"), "--destdir", bin_dir, "--workers", "1"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd[:2])} failed:\n{proc.stderr[-2000:]}")
    return bin_dir


def machine_description(threads):
    cpu = "unknown CPU"
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown CPU":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        cpu = platform.processor() or cpu
    import torch
    try:
        from importlib.metadata import version
        fairseq_version = version("fairseq-fixed")
    except Exception:
        try:
            import fairseq
            fairseq_version = fairseq.__version__
        except Exception:
            fairseq_version = "?"
    isa = ", ".join(f"{x}: {'yes' if x in flags else 'no'}" for x in ("avx512_bf16", "amx_bf16"))
    return (f"{cpu}, {os.cpu_count()} logical cores ({isa}); Linux {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, fairseq {fairseq_version}; "
            f"{threads} intra-op thread{'s' if threads != 1 else ''} and 1 inter-op thread per "
            f"measurement (torch.set_num_threads({threads}), OMP_NUM_THREADS={threads})")


def fmt(x, digits=0):
    if x is None:
        return "–"
    if digits == 0 and abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{max(digits, 1 if abs(x) < 100 else 0)}f}"


def ratio(x, base):
    if x is None or not base:
        return "–"
    return f"{x / base:.2f}"


def metric(res, key):
    if res is None:
        return None
    if key.startswith("beam"):
        beam, what = key.split(".")
        return res.get(beam, {}).get(what)
    return res.get(key)


def report(rows, size, args, peaks):
    base = next((r for r in rows if r["name"] == BASELINE and r["precision"] == "fp32"), None)
    b = base["result"] if base else None
    beams = args.beams
    head = ["config", "precision", "params (M)", "train tok/s", "× lstm"]
    for beam in beams:
        head += [f"beam-{beam} sent/s", "× lstm", f"beam-{beam} tok/s"]
    head += ["train peak MB", "× lstm", "gen peak MB", "GFLOP/update", "GFLOP/s", "% of peak"]
    lines = [f"### Sizes: embedding = hidden = {size}, {args.layers} layer(s)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in rows:
        res, name = row["result"], row["name"]
        label = f"{name} (fairseq)" if name == BASELINE else name
        if res is None:
            error = row["error"].replace("|", "\\|")
            cells = [label, precision_label(name, row["precision"]), f"failed: {error}"]
            cells += [""] * (len(head) - len(cells))
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [label, precision_label(name, row["precision"]), f"{res['params'] / 1e6:.2f}",
                 fmt(res["train_tok_s"]), ratio(res["train_tok_s"], metric(b, "train_tok_s"))]
        for beam in beams:
            cells += [fmt(metric(res, f"beam{beam}.sent_s"), 1),
                      ratio(metric(res, f"beam{beam}.sent_s"), metric(b, f"beam{beam}.sent_s")),
                      fmt(metric(res, f"beam{beam}.tok_s"))]
        peak = peaks.get("bf16" if row["precision"] == "bf16" else "fp32")
        cells += [fmt(res["train_peak_mb"], 1), ratio(res["train_peak_mb"], metric(b, "train_peak_mb")),
                  fmt(res["gen_peak_mb"], 1), fmt(res["gflop_per_update"], 2), fmt(res["gflop_s"], 1),
                  f"{100 * res['gflop_s'] / peak:.1f}" if peak else "–"]
        lines.append("| " + " | ".join(cells) + " |")

    # against fairseq's lstm at its fastest working setting, per metric
    lstm_rows = [r["result"] for r in rows if r["name"] == BASELINE and r["result"] is not None]
    ours = [r for r in rows if r["name"] != BASELINE and r["result"] is not None]
    if lstm_rows and ours:
        keys = [("train_tok_s", "training")] + [(f"beam{bm}.sent_s", f"beam {bm}") for bm in beams]
        best, which = {}, []
        for key, label in keys:
            cands = [(metric(r, key), r["precision"]) for r in lstm_rows if metric(r, key)]
            if cands:
                best[key] = max(cands)
                which.append(f"{label}: {best[key][1]}")
        lines += ["", "Ours against fairseq's lstm at its fastest working setting, per metric "
                  f"(fastest lstm setting — {'; '.join(which)}):", "",
                  "| config | precision | " + " | ".join(f"{label} × best lstm" for _, label in keys) + " |",
                  "|---|---|" + "|".join("---:" for _ in keys) + "|"]
        for row in ours:
            cells = [row["name"], precision_label(row["name"], row["precision"])]
            cells += [ratio(metric(row["result"], key), best.get(key, (None,))[0]) for key, _ in keys]
            lines.append("| " + " | ".join(cells) + " |")

    # where beam search spends its time, and what that bounds
    shares = [(r, metric(r["result"], f"beam{beams[0]}.breakdown")) for r in rows if r["result"]]
    shares = [(r, sh) for r, sh in shares if sh]
    if shares:
        lines += ["", f"Beam-{beams[0]} generation time by part (shares of one profiled pass):", "",
                  "| config | precision | matrix products | rest of the model | fairseq's search |",
                  "|---|---|---:|---:|---:|"]
        for r, sh in shares:
            lines.append(f"| {r['name']} | {precision_label(r['name'], r['precision'])} | "
                         f"{100 * sh['matmul']:.0f}% | {100 * sh['model_other']:.0f}% | {100 * sh['search']:.0f}% |")
        for r, sh in shares:
            if r["name"] == BASELINE:
                floor = sh["matmul"] + sh["search"]
                lines.append(
                    f"\nfairseq lstm {r['precision']}: matrix products plus fairseq's search take "
                    f"{100 * floor:.0f}% of its beam-{beams[0]} time. A model doing the same products "
                    "(the same sizes) under the same search can be at most "
                    f"{1 / floor:.2f}x as fast as it at this precision, however little else it does.")

    # how the FLOPs were counted
    analytic = [(r["name"], r["precision"], r["result"]["flops_analytic"] / r["result"]["flops_counted"])
                for r in rows if r["result"] and r["result"].get("flops_analytic")]
    any_res = next((r["result"] for r in rows if r["result"]), None)
    lines.append("")
    if any_res:
        lines.append(f"FLOPs: counted on the first {any_res['flop_batches']} timed batches "
                     "(forward + backward) with FlopCounterMode, scaled by target tokens.")
    if analytic:
        lines.append("oneDNN's fused RNN kernel (aten.mkldnn_rnn_layer, not counted by FlopCounterMode) "
                     "added analytically for: " + ", ".join(
                         f"{n} {p} ({100 * s:.0f}% of its FLOPs)" for n, p, s in analytic) + ".")
    else:
        lines.append("No configuration ran oneDNN's fused RNN kernel (aten.mkldnn_rnn_layer); every RNN "
                     "FLOP was counted by FlopCounterMode (packed nn.LSTM and torch.lstm_cell decompose "
                     "into mm/addmm).")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="work/demo/data-bin", help="fairseq data-bin (default: %(default)s)")
    p.add_argument("--synthetic", action="store_true",
                   help="benchmark on a synthetic reversal data-bin built in a temporary folder")
    p.add_argument("--synthetic-train", type=int, default=5000, help="synthetic training pairs")
    p.add_argument("--synthetic-vocab", type=int, default=1000, help="synthetic vocabulary size")
    p.add_argument("--synthetic-max-len", type=int, default=30, help="longest synthetic sentence")
    p.add_argument("--archs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="configurations to measure (lstm at fp32, the baseline, is always added)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--sizes", nargs="+", type=int, default=[256],
                   help="embedding = hidden = readout = attention size; one table per size")
    p.add_argument("--layers", type=int, default=1, help="RNN layers on each side")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout everywhere (fairseq lstm's default)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per measurement")
    p.add_argument("--max-tokens", type=int, default=2000, help="training batch size in tokens")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates before timing")
    p.add_argument("--updates", type=int, default=20, help="timed updates")
    p.add_argument("--flop-batches", type=int, default=2,
                   help="timed batches whose FLOPs are counted (0 = all)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gen-split", default="test")
    p.add_argument("--gen-sentences", type=int, default=48, help="first N sentences of --gen-split")
    p.add_argument("--gen-batch-size", type=int, default=16, help="sentences per generation batch")
    p.add_argument("--beams", nargs="+", type=int, default=[5, 1], help="beam sizes")
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak measurement")
    p.add_argument("--out", default=None, help="Markdown file: a dated section is appended")
    p.add_argument("--overwrite", action="store_true", help="replace --out instead of appending")
    p.add_argument("--log-dir", default=None, help="keep the workers' logs here")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    p.add_argument("--separate-phases", action="store_true",
                   help="run training and generation in separate subprocesses and take peak memory "
                   "from ru_maxrss (automatic where /proc/self/clear_refs cannot reset the peak)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--peak", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.peak:
        return matmul_peak(json.loads(args.peak))
    for name in ("threads", "max_tokens", "updates", "gen_sentences", "gen_batch_size", "layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.flop_batches < 0:
        p.error("--warmup and --flop-batches must be >= 0")

    given = argv if argv is not None else sys.argv[1:]
    argv_line = "python scripts/benchmark.py " + " ".join(shlex.quote(str(a)) for a in given)
    tmp = tempfile.mkdtemp(prefix="s2s-bench-")
    log_dir = args.log_dir or os.path.join(tmp, "logs")
    os.makedirs(log_dir, exist_ok=True)
    failed = False
    try:
        if args.synthetic:
            print(f"building a synthetic data-bin in {tmp}", flush=True)
            args.data = make_synthetic(tmp, args)
            data_desc = (f"synthetic reversal data ({args.synthetic_train} training pairs, vocabulary "
                         f"{args.synthetic_vocab}, up to {args.synthetic_max_len} tokens)")
        else:
            args.data = os.path.abspath(args.data)
            check_data(args.data, args.gen_split)
            data_desc = os.path.relpath(args.data, ROOT) if args.data.startswith(ROOT) else args.data
        dicts = sorted(glob.glob(os.path.join(args.data, "dict.*.txt")))
        vocab = ", ".join(f"{os.path.basename(d)[5:-4]} {sum(1 for _ in open(d, encoding='utf-8')) + 4}"
                          for d in dicts)

        loads = [os.getloadavg()[0]]
        print(f"measuring the matmul peak ({args.threads} thread(s))", flush=True)
        peaks, error = call_worker("peak", {"threads": args.threads, "n": args.peak_size, "repeats": 5},
                                   os.path.join(log_dir, "peak.log"), args.threads, args.timeout)
        if error:
            print(f"warning: matmul peak not measured: {error}", file=sys.stderr)
            peaks = {}
        reset_peak = can_reset_peak() and not args.separate_phases

        names = [BASELINE] + [a for a in args.archs if a != BASELINE]
        plan = [(n, pr) for n in names for pr in args.precisions]
        if (BASELINE, "fp32") not in plan:
            plan.insert(0, (BASELINE, "fp32"))
        sections = []
        for size in args.sizes:
            rows, fingerprints = [], {}
            for name, precision in plan:
                print(f"[size {size}] {name} {precision} ...", flush=True)
                t0 = time.time()
                result, error, spec = run_config(name, precision, size, args, reset_peak, log_dir)
                if error:
                    failed = True
                    print(f"  failed: {error}", flush=True)
                else:
                    print(f"  {time.time() - t0:.0f} s: train {result['train_tok_s']:.0f} tok/s, "
                          + ", ".join(f"beam {bm} {result[f'beam{bm}']['sent_s']:.1f} sent/s"
                                      for bm in args.beams)
                          + f", peak {result['train_peak_mb']:.0f} MB, {result['gflop_s']:.1f} GFLOP/s",
                          flush=True)
                    for key in ("train_fingerprint", "gen_fingerprint"):
                        fingerprints.setdefault(key, set()).add(result[key])
                rows.append(dict(name=name, precision=precision, result=result, error=error,
                                 options=spec["model_options"]))
            for key, values in fingerprints.items():
                if len(values) > 1:
                    failed = True
                    print(f"error: models saw different batches ({key}: {sorted(values)})", file=sys.stderr)
            sections.append((size, rows, fingerprints))
        loads.append(os.getloadavg()[0])

        machine = machine_description(args.threads)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        md = [f"## Benchmark {stamp}", "", f"Command: `{argv_line}`", "", f"Machine: {machine}.", ""]
        if loads[0] > args.threads + 0.5 or loads[1] > args.threads + 0.5:
            md += [f"**Warning:** the machine was busy (1-minute load average {loads[0]:.1f} at the start, "
                   f"{loads[1]:.1f} at the end, for {args.threads} benchmark thread(s)): the timings "
                   "are not representative.", ""]
        else:
            md += [f"Load average: {loads[0]:.1f} at the start, {loads[1]:.1f} at the end.", ""]
        if peaks:
            md += [f"Matmul peak ({args.peak_size}³ torch.mm, {args.threads} thread(s), best of 5): "
                   f"fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s.", ""]
        md += [f"Data: {data_desc} (dictionaries incl. special symbols: {vocab}). Training: "
               f"{args.updates} timed updates after {args.warmup} warm-up, --max-tokens {args.max_tokens}, "
               f"cross_entropy, torch.optim.Adam (lr {args.lr}), dropout {args.dropout}; the same batches "
               "in the same order for every model. Generation: fairseq SequenceGenerator, the first "
               f"{args.gen_sentences} sentences of {args.gen_split} in batches of {args.gen_batch_size}, "
               "hypotheses forced to the longest reference length in the batch (untrained models). "
               "Each configuration ran alone in its own subprocess. Peak memory: growth over the RSS "
               "after imports, data and one throwaway update/generation batch; "
               + ("VmHWM reset per phase." if reset_peak else "ru_maxrss, one subprocess per phase.")
               + " Ratios (× lstm) are against fairseq's lstm at fp32; for memory, lower is better.", "",
               "Columns: train tok/s = target tokens (incl. EOS) per second of forward + backward + "
               "Adam step; beam-k sent/s, tok/s = sentences and generated tokens (incl. EOS) per "
               "second; train/gen peak MB = growth of peak RSS in the training/generation phase; "
               "GFLOP/update = matrix-product FLOPs of one training update (forward + backward, mean "
               "over the timed updates); GFLOP/s = those FLOPs per second of training; % of peak = "
               "GFLOP/s over the measured matmul peak of the row's precision.", ""]
        for size, rows, fingerprints in sections:
            md += report(rows, size, args, peaks)
            fp = ", ".join(f"{k.split('_')[0]} {'/'.join(sorted(v))}" for k, v in fingerprints.items())
            md += [f"Batch fingerprints (sentence ids): {fp}.", "", "Model options:", ""]
            for r in rows:
                outside = r["name"] == BASELINE and r["precision"] == "bf16"
                md.append(f"- {r['name']} {r['precision']}: `{' '.join(r['options'])}`"
                          + (' under torch.autocast("cpu", bfloat16)' if outside else ""))
            md.append("")
        text = "\n".join(md) + "\n"
        print("\n" + text)
        if args.out:
            mode = "w" if args.overwrite or not os.path.exists(args.out) else "a"
            with open(args.out, mode, encoding="utf-8") as f:
                if mode == "a":
                    f.write("\n")
                f.write(text)
            print(f"{'wrote' if mode == 'w' else 'appended to'} {args.out}")
    finally:
        if failed:
            print(f"worker logs kept in {log_dir}", file=sys.stderr)
        if not failed and not args.log_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        elif args.synthetic or not args.log_dir:
            shutil.rmtree(os.path.join(tmp, "raw"), ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
