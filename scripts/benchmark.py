#!/usr/bin/env python3
"""Speed, memory and FLOP-efficiency benchmark: our architectures against fairseq's own ``lstm``.

    python scripts/benchmark.py --data work/demo/data-bin --out BENCHMARKS.md

(defaults: 20 timed updates, beam search over the first 48 test sentences in batches of 16;
about 5 minutes for the 10 rows, 5 configurations x 2 precisions, on one core.)

One run measures, on the same binarised data and with matched sizes, every configuration

    rnn_vanilla       --arch rnn_vanilla
    rnn_bahdanau      --arch rnn_bahdanau --coverage false (the paper's plain additive score)
    rnn_luong         --arch rnn_luong --input-feeding true (Luong's input feeding, sec. 3.3)
    rnn_luong_nofeed  --arch rnn_luong --input-feeding false (rnn_luong's default feeding since
                      2026-12-03, with the LSTM cell of every row here; the names keep earlier
                      reports comparable)
    lstm              fairseq's --arch lstm (unidirectional encoder, Luong-general attention after
                      the decoder step, input feeding: the closest match to rnn_luong)

(LSTM cells in ours too, like fairseq's lstm; on request, --archs rnn_bahdanau_gru rnn_luong_gru
run the architectures' own GRU cell, rnn_luong_gru being what --arch rnn_luong gives and
rnn_bahdanau_gru_coverage what --arch rnn_bahdanau gives, make demo's model)

each at fp32 and bf16 (--precisions). Our bf16 is the model option --cpu-bf16 (torch CPU autocast
inside the model); fairseq's lstm has no CPU bf16 option (its --bf16 --cpu assumes a TPU), so its
bf16 row wraps the whole forward pass in torch.autocast("cpu", bfloat16). Every ratio is against
``lstm`` at fp32; a second table compares with fairseq's lstm at its fastest working setting
(per metric, the faster of its fp32 and bf16 rows).

Matched sizes (--sizes, default 256): embedding = encoder hidden = decoder hidden = decoder output
(readout) = attention size, --layers per side, unidirectional encoder, LSTM cells, dropout
--dropout everywhere, no shared embeddings; the vocabulary is the data-bin's.

What is measured (each configuration in its own subprocess, one after the other, never in parallel):

  train tok/s     target tokens per second over --updates timed updates (forward, fairseq's
                  --criterion, backward, the Adam step of fairseq-train's --optimizer adam on
                  a CPU: fairseq's Adam, which the plugin runs in torch's fused kernel,
                  fairseq_s2s_attn/optim.py; every row), after --warmup untimed
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
                  generation phase (beam 5 and 1, a fresh model), each phase in its own
                  subprocess, each as the fairseq command runs with the plugin
                  (fairseq_s2s_attn/runtime.py; every row, fairseq's lstm too): training as
                  fairseq-train (oneDNN's primitive cache capped at 128, freed memory kept on the
                  heap), generation as fairseq-generate (the default primitive cache, freed memory
                  kept on the heap). The peak is reset after the warm-up
                  (/proc/self/clear_refs); where that is not allowed (or with --separate-phases)
                  ru_maxrss is used, which then also holds the throwaway warm-up's peak (the same
                  work, so about the same figure).
  tensor MB       the peak of tensor memory (TensorPeak below: every storage an operator returns,
                  from its creation until it is freed, plus the parameters and Adam's state), the
                  CPU analogue of the GPU mode's torch.cuda.max_memory_allocated: of whole updates
                  (forward, backward, Adam step) on the first --flop-batches timed batches (the
                  largest), and of beam search (the first beam size) on the first generation batch.
                  The RSS above also holds what the process keeps besides live tensors: freed but
                  retained heap, oneDNN's scratchpads, JIT code and primitive caches; this does not.
  GFLOP/s         FLOPs of the timed training updates / their time. FLOPs are counted with
                  torch.utils.flop_counter.FlopCounterMode on forward + backward of the first
                  --flop-batches timed batches (0 = all), per target token, times the timed target
                  tokens. FlopCounterMode counts matrix products (mm, addmm, bmm, baddbmm, ...),
                  including backward; an nn.LSTM/GRU over packed sequences and torch.lstm_cell
                  decompose into such products and are counted. oneDNN's fused RNN kernel
                  (aten.mkldnn_rnn_layer and its backward, used by nn.LSTM on unpacked CPU input) is
                  NOT counted by FlopCounterMode; its FLOPs are added analytically:
                  2 * T * B * (I + H) * G*H forward (G gates), twice that for backward; nor is
                  oneDNN's linear (the --cpu-bf16 output layer's forward in the fused loss):
                  2 * rows * K * N. Element-wise
                  work (gate nonlinearities, softmax, dropout, the Adam update) is not counted.
                  Counted over each batch's own rows: the zero rows that --cpu-bf16 training adds
                  to its products over all positions (fairseq_s2s_attn/precision.py, ~3% more
                  rows) are work done, not work asked for, and are left out (PAD_ROWS off while
                  counting).
  % of peak       GFLOP/s as a share of the machine's matmul peak in the same precision and the same
                  thread count: best of several 2048 x 2048 x 2048 torch.mm in fp32 or bf16.

Threads: --threads intra-op threads (default 1) and one inter-op thread in every subprocess
(torch.set_num_threads, OMP_NUM_THREADS, MKL_NUM_THREADS, S2S_NUM_THREADS). The load average at
the start and end is printed: on a busy machine the timings are not representative.

Output: the Markdown report is printed and appended to --out as a new dated section (earlier runs
are kept; --overwrite replaces the file). Worker logs go to --log-dir (default: a temp folder,
deleted on success).

GPU mode (--device cuda; --device cpu --gpu-style runs the same code on the CPU, to test it):

    python3 scripts/benchmark.py --device cuda --data data-bin --out BENCHMARKS-gpu.md --json bench.json

ONE worker process (started with sys.executable and the caller's environment, PYTHONPATH included,
plus this repository) measures every configuration at every precision, one after the other:
precision by precision, lstm first, so that a cut-short run still has whole precisions. Defaults:
sizes 512, --max-tokens 8000, 5 warm-up + 30 timed updates, beam 5 at generation batch sizes 128
(first 256 --gen-split sentences) and 1 (first --gen-sentences-bs1 = 32 sentences), --precisions
fp16 bf16 (also fp32, amp), --time-budget 120 s (configurations not started by then are listed as
skipped, so the report is always written; designed to finish in well under 150 s on an H100/H200).
--configs (= --archs) may add rnn_bahdanau_paper and rnn_luong_paper; with --paper-sizes they keep
their architectures' own sizes.

  precisions      as fairseq-train / fairseq-generate do them, for our models and fairseq's lstm
                  alike: fp16 = model.half(), bf16 = model.to(torch.bfloat16) (fairseq's trainer
                  does exactly that; floating tensors in the samples are cast to the same dtype,
                  token ids stay long), with an fp32 master copy of the parameters for the Adam
                  step: FP32MasterAdam below, written out to mirror fairseq's FP16Optimizer
                  (flattened fp32 copy; fp16/bf16 grads copied in, torch.optim.Adam step, copied
                  back) because FP16Optimizer itself calls torch.cuda.current_device() and cannot
                  run on the CPU path; no loss scaling, overflow check or clipping (timing only).
                  amp = fp32 model with torch.autocast(device, float16) over forward and loss.
                  fp32 = plain. Our models get --cpu-bf16 false (a CPU autocast option).
  batches         the same as the CPU mode (fingerprinted), moved to the device once before any
                  timing; torch.cuda.synchronize() before every timer read.
  train tok/s     as above (warm-up untimed).
  generation      beam-5 sentences and tokens per second per --gen-batch-size (same forced-length
                  trick, no alignment extraction, one untimed warm-up batch per batch size).
  breakdown       a separate pass over the first --breakdown-batches batches of the first batch
                  size: every model call of SequenceGenerator (forward_encoder, forward_decoder,
                  reorder_encoder_out, reorder_incremental_state) timed between synchronize()
                  calls; fairseq's search = the rest of the pass. On CUDA the matrix-product share
                  is NOT measured (no profiler run; the table says so); with --gpu-style it comes
                  from torch.profiler as in the CPU mode.
  peak MB         torch.cuda.max_memory_allocated() per phase (reset_peak_memory_stats() before
                  each phase), minus what was allocated at the phase's start (the resident batches,
                  the same for every model); the absolute peak is in the JSON. --gpu-style: growth
                  of the peak RSS (n/a where it cannot be reset). Ratios against lstm at the SAME
                  precision.
  FLOPs, % peak   FlopCounterMode as above; cuDNN's fused RNN (aten._cudnn_rnn, not counted by
                  FlopCounterMode either) added analytically like oneDNN's. Peaks: best of 5
                  --peak-size (cuda: 8192) cubed torch.mm per fp32/fp16/bf16 on the device (torch's
                  TF32 defaults, named in the header).
  --max-tokens-search (off by default): per configuration, at the first precision, the largest
                  --max-tokens at which one update of the longest training sentences fits
                  (doubling from --max-tokens up to --max-tokens-search-cap, then 2 bisection steps).

Output: the Markdown report (printed and appended to --out) and, with --json FILE, every result as
JSON, rewritten after each configuration so that a killed run keeps what it measured. The worker's
log (tracebacks of failed phases) is kept in --log-dir, or in a temp folder when something failed.

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
    # the plain additive score of the paper, as measured in BENCHMARKS.md (the architecture's
    # default adds coverage, whose speed compare.py reports: 0.66x lstm's updates against 0.67x)
    "rnn_bahdanau": ("rnn_bahdanau", ["--coverage", "false"]),
    "rnn_luong": ("rnn_luong", ["--input-feeding", "true"]),
    "rnn_luong_nofeed": ("rnn_luong", ["--input-feeding", "false"]),
    "lstm": ("lstm", []),
}
# --device cuda (and --gpu-style) only: the papers' configurations, with their own sizes under
# --paper-sizes (the architectures' defaults), otherwise with the matched sizes like the others
PAPER_CONFIGS = {
    "rnn_bahdanau_paper": ("rnn_bahdanau_paper", []),
    "rnn_luong_paper": ("rnn_luong_paper", []),
}
# on request only (--archs): the step-loop decoders with --compile-step (torch.compile of the step)
COMPILED_CONFIGS = {
    "rnn_bahdanau_compiled": ("rnn_bahdanau", ["--coverage", "false", "--compile-step", "true"]),
    "rnn_luong_compiled": ("rnn_luong", ["--input-feeding", "true", "--compile-step", "true"]),
}
# on request only (--archs): the architectures' own cell, a GRU (the rows above are LSTMs like
# fairseq's lstm); rnn_luong_gru is what --arch rnn_luong gives, at the matched sizes
GRU_CONFIGS = {
    "rnn_bahdanau_gru": ("rnn_bahdanau", ["--coverage", "false", "--rnn-type", "gru"]),
    "rnn_luong_gru": ("rnn_luong", ["--input-feeding", "false", "--rnn-type", "gru"]),
    # what --arch rnn_bahdanau gives (make demo's model), at the matched sizes
    "rnn_bahdanau_gru_coverage": ("rnn_bahdanau", ["--coverage", "true", "--rnn-type", "gru"]),
}
ALL_CONFIGS = dict(CONFIGS, **PAPER_CONFIGS, **COMPILED_CONFIGS, **GRU_CONFIGS)
BASELINE = "lstm"
PRECISIONS = ("fp32", "bf16")
DEVICE_PRECISIONS = ("fp32", "fp16", "bf16", "amp")
RESULT_TAG = "BENCHMARK_RESULT "
# the plugin's fused output layer + loss (fairseq_s2s_attn/criterion.py): the same loss as
# fairseq's cross_entropy; models without an output projection (fairseq's lstm) take
# cross_entropy's own path, so lstm's rows are fairseq's criterion either way
DEFAULT_CRITERION = "fused_cross_entropy"
T_START = time.perf_counter()


# =================================================================== model options


def model_options(name: str, precision: str, size: int, layers: int, dropout: float,
                  paper_sizes: bool = False):
    arch, extra = ALL_CONFIGS[name]
    if name in PAPER_CONFIGS and paper_sizes:  # the architecture's own sizes and options
        return ["--arch", arch] + extra + ["--cpu-bf16", "true" if precision == "bf16" else "false"]
    sizes = ["--encoder-embed-dim", size, "--decoder-embed-dim", size,
             "--encoder-hidden-size", size, "--decoder-hidden-size", size,
             "--decoder-out-embed-dim", size, "--encoder-layers", layers, "--decoder-layers", layers]
    if arch == "lstm":  # fairseq's lstm: unidirectional encoder and attention by default
        opts = ["--arch", arch] + sizes + ["--dropout", dropout]
    else:
        # LSTM cells like fairseq's lstm (rnn_bahdanau's and rnn_luong's own default is a GRU,
        # the *_gru configurations; their --rnn-type gru comes later and wins)
        opts = (["--arch", arch] + sizes + ["--attention-dim", size, "--encoder-bidirectional", "false",
                                            "--rnn-type", "lstm"]
                + [x for k in ("encoder-dropout-in", "encoder-dropout-out", "decoder-dropout-in",
                               "decoder-dropout-out") for x in ("--" + k, dropout)]
                + extra + ["--cpu-bf16", "true" if precision == "bf16" else "false"])
    return [str(x) for x in opts]


def precision_label(name: str, precision: str) -> str:
    if precision == "fp32":
        return "fp32"
    return "bf16 (torch.autocast)" if ALL_CONFIGS[name][0] == "lstm" else "bf16 (--cpu-bf16)"


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


class TensorPeak:
    """Peak bytes of tensor storage alive inside a region, counting every new storage an operator
    returns (forward, backward, autocast's casts, the optimizer step; not views or in-place
    results) from its creation until it is freed, plus ``static`` bytes alive throughout (parameters, optimizer state). The allocator-
    independent measure (the CPU analogue of torch.cuda.max_memory_allocated): unlike the RSS, it
    holds no freed-but-retained heap, no oneDNN scratchpads, JIT code or primitive caches, and no
    memory that kernels allocate and free internally.

        with TensorPeak(static_bytes) as tp:
            ...
        tp.peak  # bytes
    """

    def __init__(self, static: int = 0):
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.weak import WeakIdKeyDictionary

        counter = self
        self.static, self.current, self.peak = static, static, static
        seen = WeakIdKeyDictionary()

        def freed(n):
            counter.current -= n

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                # an output on an input's storage (in-place op, view) is not a new allocation;
                # opaque tensors (oneDNN's packed weights) have no storage to read: static
                inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor) and has_storage(t)}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and has_storage(t):
                        st = t.untyped_storage()
                        if st not in seen and (st.nbytes() == 0 or st.data_ptr() not in inputs):
                            n = st.nbytes()
                            seen[st] = n
                            counter.current += n
                            weakref.finalize(st, freed, n)
                counter.peak = max(counter.peak, counter.current)
                return out

        self._mode = Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def has_storage(t) -> bool:
    return t.device.type != "meta" and not t.is_mkldnn


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of these tensors (parameters, optimizer state)."""
    import torch
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[(st.data_ptr(), t.device.type)] = st.nbytes()
    return sum(seen.values())


def optimizer_tensors(optimizer):
    return [v for state in optimizer.state.values() for v in state.values()]


def training_cache() -> int:
    """The oneDNN primitive cache fairseq-train keeps with the plugin (runtime.py)."""
    from fairseq_s2s_attn.runtime import TRAINING_PRIMITIVE_CACHE
    return TRAINING_PRIMITIVE_CACHE


def release_memory():
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def uncounted_flop_formulas(tally):
    """FlopCounterMode formulas for the kernels it does not count itself: oneDNN's and cuDNN's
    fused RNN layers (their FLOPs added up in ``tally`` by kernel, for the report) and oneDNN's
    linear (``torch.ops.mkldnn._linear_pointwise``: the fused loss's bf16 output layer,
    fairseq_s2s_attn/criterion.py; decoding's packed weights), a plain matrix product."""
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

    def cudnn_flops(input, weight):
        # aten._cudnn_rnn: the whole (multi-layer, maybe bidirectional) RNN in one call; `weight` is
        # the list of per-layer, per-direction tensors (w_ih, w_hh[, b_ih, b_hh]); input is
        # (T, B, I), (B, T, I) or packed (tokens, I): every layer and direction sees every token
        tokens = 1
        for d in input[:-1]:
            tokens *= d
        mats = [w for w in weight if len(w) == 2]
        n = 0
        for w_ih, w_hh in zip(mats[0::2], mats[1::2]):
            n += 2 * tokens * w_ih[0] * (w_ih[1] + w_hh[1])
        return n

    def cudnn_forward(input, weight, *args, out_shape=None, **kwargs):
        n = cudnn_flops(input, weight)
        tally["cudnn_rnn"] = tally.get("cudnn_rnn", 0) + n
        return n

    def cudnn_backward(input, weight, *args, out_shape=None, **kwargs):
        n = 2 * cudnn_flops(input, weight)
        tally["cudnn_rnn_backward"] = tally.get("cudnn_rnn_backward", 0) + n
        return n

    def onednn_linear(x, *args, out_shape=None, **kwargs):
        # x: ... x K -> out: ... x N, whichever overload (with a bias, or a binary post-op)
        n = 2 * x[-1]
        for d in out_shape:
            n *= d
        return n

    formulas = {aten.mkldnn_rnn_layer: forward, aten.mkldnn_rnn_layer_backward: backward}
    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if linear is not None:
        formulas[linear] = onednn_linear
    if hasattr(aten, "_cudnn_rnn"):  # cuDNN's fused RNN (nn.LSTM/GRU on CUDA): not counted either
        formulas[aten._cudnn_rnn] = cudnn_forward
        formulas[aten._cudnn_rnn_backward] = cudnn_backward
    return formulas


def build(spec):
    """fairseq's own parse -> task -> model path, as fairseq-train does it."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    device_flag = ["--cpu"] if spec.get("device", "cpu") == "cpu" else []
    argv = [spec["data"], "--user-dir", USER_DIR, "--task", "translation"] + device_flag + [
            "--criterion", spec.get("criterion", DEFAULT_CRITERION),
            *spec.get("criterion_options", []),
            "--max-tokens", str(spec["max_tokens"]),
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


def cpu_adam(params, lr):
    """fairseq-train's --optimizer adam on a CPU: fairseq's Adam (its FusedAdam needs CUDA), as
    the plugin runs it (one fused kernel, fairseq_s2s_attn/optim.py); the same for every row."""
    from fairseq.optim.adam import Adam

    return Adam(params, lr=lr)


def run_train(spec, cfg, task, batches, autocast, result):
    import torch

    torch.manual_seed(spec["seed"])
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    model.train()
    criterion.train()
    optimizer = cpu_adam(model.parameters(), spec["lr"])
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
    from fairseq_s2s_attn import precision
    padded, precision.PAD_ROWS = precision.PAD_ROWS, False  # the work asked for, not the padding
    try:
        with FlopCounterMode(display=False, custom_mapping=uncounted_flop_formulas(tally)) as counter:
            for sample in counted:
                forward_backward(sample)
                optimizer.zero_grad(set_to_none=True)
    finally:
        precision.PAD_ROWS = padded
    flops = counter.get_total_flops()
    counted_tokens = sum(int(s["ntokens"]) for s in counted)
    per_token = flops / counted_tokens
    by_op = {str(op).replace("aten.", ""): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    result.update(flop_batches=len(counted), flops_counted=flops, flops_per_token=per_token,
                  flops_by_op=by_op, flops_analytic=sum(tally.values()), fused_rnn_kernels=sorted(tally),
                  gflop_per_update=per_token * result["train_tokens"] / result["train_updates"] / 1e9,
                  gflop_s=per_token * result["train_tok_s"] / 1e9)


def train_tensor_peak(spec, model, optimizer, forward_backward, timed, result):
    """TensorPeak of whole updates (forward, backward, Adam step) on the first --flop-batches
    timed batches: the largest, with the parameters and Adam's state counted as static."""
    peak = 0
    for sample in timed[:spec["flop_batches"] or len(timed)]:
        static = storage_bytes(list(model.parameters()) + optimizer_tensors(optimizer))
        with TensorPeak(static) as tp:
            forward_backward(sample)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = max(peak, tp.peak)
    result["train_tensor_mb"] = peak / 2 ** 20


def run_generate(spec, cfg, task, batches, autocast, result, rss_peak=None):
    """Timed beam search at each beam size (the RSS peak, ``rss_peak()``, is read after these
    passes), then the profiled pass of the first beam size and its tensor memory: the profiler's
    event records would otherwise count as generation memory, more for models of more ops."""
    import torch
    from fairseq.sequence_generator import SequenceGenerator

    torch.manual_seed(spec["seed"])
    model = task.build_model(cfg.model)
    result.setdefault("params", sum(p.numel() for p in model.parameters()))
    model.prepare_for_inference_(cfg)  # as fairseq-generate does (ours: bf16 product weights)
    translators = {}
    for beam in spec["beams"]:
        gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam,
                                max_len_a=0, max_len_b=1, min_len=1)

        def translate(sample, length, gen=gen):
            gen.max_len_b, gen.min_len = length, length  # exactly `length` tokens, then EOS
            with autocast():
                hypos = gen.generate([model], sample)
            return sum(len(h[0]["tokens"]) for h in hypos)

        translators[beam] = gen, translate
        translate(*batches[0])  # warm-up
        sentences, tokens, t0 = 0, 0, time.perf_counter()
        for sample, length in batches:
            tokens += translate(sample, length)
            sentences += int(sample["nsentences"])
        seconds = time.perf_counter() - t0
        result[f"beam{beam}"] = dict(seconds=seconds, sentences=sentences, tokens=tokens,
                                     sent_s=sentences / seconds, tok_s=tokens / seconds)
    if rss_peak is not None:
        result["gen_peak_mb"] = rss_peak()
    beam = spec["beams"][0]
    gen, translate = translators[beam]
    result[f"beam{beam}"]["breakdown"] = generation_breakdown(gen, batches, translate)
    # tensor memory of the first batch, the model's parameters (and their oneDNN copies,
    # fairseq_s2s_attn/packed.py) counted as static
    from fairseq_s2s_attn import packed
    params = list(model.parameters())
    with TensorPeak(storage_bytes(params) + packed.packed_bytes(params)) as tp:
        translate(*batches[0])
    result["gen_tensor_mb"] = tp.peak / 2 ** 20


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
              "aten::mkldnn_rnn_layer", "mkldnn::_linear_pointwise"}  # the last: packed weights


def generation_breakdown(gen, batches, translate, sync=None, profile_matmul=True):
    """Where one generation pass spends its time (from a separate, profiled pass): matrix
    products (self time of the matmul kernels), the rest of the model (encoder, decoder steps,
    output softmax, state reorders) and fairseq's search itself (topk, bookkeeping, finalising).
    Profiling adds a little time per operation, so read these as shares, not as speeds.

    sync: called before and after every model call and around the pass (torch.cuda.synchronize
    on CUDA, so that the GPU work queued by the search is not billed to the model and the other way
    round). profile_matmul=False (CUDA): no profiler; matmul is None and model_other holds the
    whole model share."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    sync = sync or (lambda: None)

    ensemble = gen.model
    in_model = [0.0]
    wrapped = {}
    for name in ("forward_encoder", "forward_decoder", "reorder_encoder_out", "reorder_incremental_state"):
        method = getattr(ensemble, name)

        def timed(*a, _method=method, **k):
            sync()
            t = time.perf_counter()
            try:
                return _method(*a, **k)
            finally:
                sync()
                in_model[0] += time.perf_counter() - t

        wrapped[name] = method
        setattr(ensemble, name, timed)
    try:
        with (profile(activities=[ProfilerActivity.CPU]) if profile_matmul
              else contextlib.nullcontext()) as prof:
            sync()
            t0 = time.perf_counter()
            for sample, length in batches:
                translate(sample, length)
            sync()
            total = time.perf_counter() - t0
    finally:
        for name in wrapped:
            delattr(ensemble, name)  # back to the class's methods
    if not profile_matmul:
        return dict(matmul=None, model_other=min(in_model[0], total) / total,
                    search=max(0.0, total - in_model[0]) / total)
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
        optimizer = cpu_adam(model.parameters(), spec["lr"])
        model.train()
        with autocast():
            loss, _, _ = criterion(model, train[0])
        loss.backward()
        optimizer.step()
        del criterion, optimizer, loss
    if gen:
        model.prepare_for_inference_(cfg)
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
    from fairseq_s2s_attn.runtime import keep_freed_memory, limit_primitive_cache_in_training
    if spec["phases"] == ["train"]:
        limit_primitive_cache_in_training(training=True)
    keep_freed_memory(command=True)  # as fairseq-train and fairseq-generate do with the plugin
    cfg, task = build(spec)
    torch.set_num_threads(threads)  # the plugin's run-time defaults must not change it
    bf16_outside = spec["precision"] == "bf16" and ALL_CONFIGS[spec["name"]][0] == "lstm"

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
        train_tensor_peak(spec, model, optimizer, fb, tr[spec["warmup"]:], result)
        del model, criterion, optimizer, fb
        release_memory()
    if "generate" in phases:
        rss.reset()
        run_generate(spec, cfg, task, gb, autocast, result,
                     rss_peak=lambda: max(0, rss.peak() - baseline) / 1024)
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


# =================================================================== device mode (one worker process)
#
# --device cuda (or --device cpu --gpu-style, the same code on the CPU): every configuration and
# precision in ONE worker process, one after the other; phases are separated by freeing the models
# and resetting the peak-memory counter, not by process boundaries.

LOW_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # model.half() / model.to(torch.bfloat16)
PEAK_KEY = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "amp": "fp16"}


def device_precision_label(name: str, precision: str) -> str:
    return {"fp32": "fp32", "fp16": "fp16 (model.half())", "bf16": "bf16 (model.to(bfloat16))",
            "amp": "amp (autocast fp16)"}[precision]


class FP32MasterAdam:
    """The optimizer step of fairseq-train --fp16 / --bf16, written out so that it also runs on the
    CPU: fairseq's FP16Optimizer (flattened fp32 master copy of all parameters; copy the fp16/bf16
    gradients into its flat fp32 gradient, Adam step on the master, copy the master back into the
    model's fp16/bf16 parameters). fairseq's own class calls torch.cuda.current_device() when it
    builds the master copy, so it cannot run on the CPU path. Left out (as in the fp32 rows and the
    CPU benchmark): loss scaling, the overflow check and gradient clipping. The step is
    torch.optim.Adam on the one flat master tensor (fairseq's --optimizer adam would use its
    FusedAdam where apex/fused_adam_cuda is installed)."""

    def __init__(self, params, lr):
        import torch
        self.params = [p for p in params if p.requires_grad]
        total = sum(p.numel() for p in self.params)
        master = torch.empty(total, dtype=torch.float32, device=self.params[0].device)
        offset = 0
        for p in self.params:
            master[offset:offset + p.numel()].copy_(p.data.reshape(-1))
            offset += p.numel()
        self.master = torch.nn.Parameter(master)
        self.master.grad = torch.zeros_like(master)
        self.optimizer = torch.optim.Adam([self.master], lr=lr)

    def step(self):
        offset, grad = 0, self.master.grad
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                grad[offset:offset + n].zero_()
            else:
                grad[offset:offset + n].copy_(p.grad.reshape(-1))
            offset += n
        self.optimizer.step()
        offset = 0
        for p in self.params:
            n = p.numel()
            p.data.copy_(self.master.data[offset:offset + n].view_as(p.data))
            offset += n

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class DeviceMemory:
    """Peak memory of one phase: torch.cuda.max_memory_allocated on CUDA (reset per phase), minus
    what was allocated at the start of the phase (the batches already on the device, nothing of an
    earlier model). On the CPU: growth of the peak RSS (VmHWM, reset per phase) where Linux allows
    the reset, else not measured (None)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.rss = PeakRSS(can_reset_peak()) if not self.cuda else None
        self.base = 0

    def start(self):
        import gc

        import torch
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            release_memory()
            self.rss.reset()
            self.base = self.rss.current() * 1024

    def peak(self):
        """(growth over the phase's start, absolute peak) in MB; None where not measured."""
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            top = torch.cuda.max_memory_allocated()
            return (top - self.base) / 2 ** 20, top / 2 ** 20
        if not self.rss.resettable:
            return None, None
        top = self.rss.peak() * 1024
        return max(0, top - self.base) / 2 ** 20, top / 2 ** 20


def device_matmul_peaks(device, n, repeats, dtypes, sync):
    """Best of `repeats` n x n x n torch.mm per dtype, in GFLOP/s (three products per timing)."""
    import torch
    out = {}
    for name in dtypes:
        dtype = getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[name])
        try:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            for _ in range(2):
                torch.mm(a, b)
            sync()
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(3):
                    torch.mm(a, b)
                sync()
                best = min(best, (time.perf_counter() - t0) / 3)
            out[name] = 2 * n ** 3 / best / 1e9
            del a, b
        except Exception as e:  # e.g. no fp16 matmul on this CPU
            print(f"matmul peak {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return out


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return ("out of memory" in text or "alloc_failed" in text  # cuDNN/cuBLAS say it their way
            or type(e).__name__ == "OutOfMemoryError")


class DeviceRun:
    """The state shared by all configurations in the one worker process."""

    def __init__(self, spec):
        import contextlib

        import torch
        self.spec = spec
        self.torch = torch
        self.device = torch.device(spec["device"])
        self.cuda = self.device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.memory = DeviceMemory(self.device)
        self.nullcontext = contextlib.nullcontext

    def emit(self, kind, **payload):
        print(RESULT_TAG + json.dumps(dict(kind=kind, **payload)), flush=True)

    def to_device(self, sample):
        from fairseq import utils
        if self.cuda:
            return utils.move_to_cuda(sample, device=self.device)
        return utils.apply_to_sample(lambda t: t.to(self.device), sample)

    def cast(self, sample, precision):
        """Floating tensors of a sample to the model's dtype, as fairseq's trainer does for
        --fp16/--bf16 (token ids stay long); a no-op for the translation task's samples."""
        from fairseq import utils
        if precision not in LOW_DTYPES:
            return sample
        dtype = getattr(self.torch, LOW_DTYPES[precision])
        return utils.apply_to_sample(lambda t: t.to(dtype) if t.dtype is self.torch.float32 else t,
                                     sample)

    def autocast(self, precision):
        if precision == "amp":
            return self.torch.autocast(self.device.type, dtype=self.torch.float16)
        return self.nullcontext()

    def model(self, cfg, task, precision):
        self.torch.manual_seed(self.spec["seed"])
        model = task.build_model(cfg.model).to(self.device)
        if precision in LOW_DTYPES:  # fairseq's trainer: model.half() / model.to(torch.bfloat16)
            model = model.to(getattr(self.torch, LOW_DTYPES[precision]))
        return model

    def optimizer(self, model, precision):
        if precision in LOW_DTYPES:
            return FP32MasterAdam(model.parameters(), self.spec["lr"])
        return self.torch.optim.Adam(model.parameters(), lr=self.spec["lr"])

    # ------------------------------------------------------------------ phases

    def train(self, cfg, task, batches, ntokens, precision, result):
        spec = self.spec
        model = self.model(cfg, task, precision)
        criterion = task.build_criterion(cfg.criterion).to(self.device)
        if precision in LOW_DTYPES:
            criterion = criterion.to(getattr(self.torch, LOW_DTYPES[precision]))
        model.train()
        criterion.train()
        optimizer = self.optimizer(model, precision)
        result["params"] = sum(p.numel() for p in model.parameters())

        def forward_backward(sample):
            with self.autocast(precision):
                loss, _sample_size, _log = criterion(model, sample)
            loss.backward()
            return loss

        w = spec["warmup"]
        for sample in batches[:w]:
            forward_backward(sample)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        timed, timed_tokens = batches[w:], ntokens[w:]
        self.sync()
        t0 = time.perf_counter()
        for sample in timed:
            loss = forward_backward(sample)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.sync()
        seconds = time.perf_counter() - t0
        tokens = sum(timed_tokens)
        growth, top = self.memory.peak()
        result.update(train_seconds=seconds, train_tokens=tokens, train_updates=len(timed),
                      train_tok_s=tokens / seconds, train_peak_mb=growth, train_peak_abs_mb=top,
                      final_loss=float(loss.detach().float()) / max(1, timed_tokens[-1]))
        try:  # FLOPs: shapes only, so any precision gives the same count
            count_flops(spec, model, optimizer, forward_backward, timed, result)
        except Exception as e:
            print(f"FLOP count failed: {_error_text(e)}", file=sys.stderr, flush=True)
            result["flop_error"] = _error_text(e)
        optimizer.zero_grad(set_to_none=True)

    def generate(self, cfg, task, gen_sets, precision, result):
        from fairseq.sequence_generator import SequenceGenerator

        spec = self.spec
        model = self.model(cfg, task, precision)
        model.eval()
        result.setdefault("params", sum(p.numel() for p in model.parameters()))
        for bs, batches in gen_sets:
            for beam in spec["beams"]:
                gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam,
                                        max_len_a=0, max_len_b=1, min_len=1)

                def translate(sample, length, gen=gen):
                    gen.max_len_b, gen.min_len = length, length  # exactly `length` tokens, then EOS
                    with self.autocast(precision):
                        hypos = gen.generate([model], sample)
                    return sum(len(h[0]["tokens"]) for h in hypos)

                translate(*batches[0])  # warm-up
                self.sync()
                sentences, tokens, t0 = 0, 0, time.perf_counter()
                for sample, length in batches:
                    tokens += translate(sample, length)
                    sentences += sample["nsentences"]
                self.sync()
                seconds = time.perf_counter() - t0
                entry = dict(batch_size=bs, beam=beam, seconds=seconds, sentences=sentences,
                             tokens=tokens, sent_s=sentences / seconds, tok_s=tokens / seconds)
                if bs == gen_sets[0][0] and beam == spec["beams"][0]:
                    nb = spec["breakdown_batches"] or len(batches)
                    try:
                        entry["breakdown"] = generation_breakdown(
                            gen, batches[:nb], translate, sync=self.sync,
                            profile_matmul=not self.cuda)
                        entry["breakdown_batches"] = min(nb, len(batches))
                    except Exception as e:
                        print(f"breakdown failed: {_error_text(e)}", file=sys.stderr, flush=True)
                result[f"beam{beam}_bs{bs}"] = entry
        growth, top = self.memory.peak()
        result.update(gen_peak_mb=growth, gen_peak_abs_mb=top)

    def max_tokens_search(self, cfg, task, precision, start, cap, bisect_steps):
        """The largest --max-tokens at which ONE training update (forward, backward, step) of the
        longest training sentences fits: batches of max_tokens // longest length sentences (rounded
        down to a multiple of 8 as fairseq's batching does), doubling from `start`, then
        `bisect_steps` bisection steps between the last fit and the first failure."""
        import numpy as np

        dataset = task.dataset("train")
        sizes = np.maximum(dataset.src_sizes, dataset.tgt_sizes if dataset.tgt_sizes is not None
                           else dataset.src_sizes)
        order = np.argsort(-sizes, kind="stable")
        longest = int(sizes[order[0]])
        model = self.model(cfg, task, precision)
        criterion = task.build_criterion(cfg.criterion).to(self.device)
        model.train()
        optimizer = self.optimizer(model, precision)
        trials = []

        def fits(max_tokens):
            n = max_tokens // longest
            if n >= 8:
                n -= n % 8
            if n < 1 or n > len(dataset):
                return None  # cannot build such a batch from this data
            sample = dataset.collater([dataset[int(i)] for i in order[:n]])
            sample = self.cast(self.to_device(sample), precision)
            error = None
            try:
                with self.autocast(precision):
                    loss, _, _ = criterion(model, sample)
                loss.backward()
                optimizer.step()
                self.sync()
            except Exception as e:  # out of memory; anything else also ends the doubling, noted
                error = ("" if _is_oom(e) else "not out of memory: ") + _error_text(e)
            finally:
                optimizer.zero_grad(set_to_none=True)
                loss = sample = None
            import gc
            gc.collect()
            if self.cuda:
                self.torch.cuda.empty_cache()
            trials.append(dict(max_tokens=max_tokens, sentences=n, fits=error is None, error=error))
            return error is None

        ok, bad, limit = None, None, None
        m = start
        while m <= cap:
            r = fits(m)
            if r is None:
                limit = "data"
                break
            if r:
                ok = m
                m *= 2
            else:
                bad = m
                break
        else:
            limit = "cap"
        if ok is not None and bad is not None:
            for _ in range(bisect_steps):
                mid = (ok + bad) // 2
                r = fits(mid)
                if r:
                    ok = mid
                else:
                    bad = mid
        del model, criterion, optimizer
        odd = [t["error"] for t in trials if t["error"] and t["error"].startswith("not out of memory")]
        if odd:
            limit = odd[0]
        return dict(precision=precision, largest_fit=ok, smallest_fail=bad, limit=limit,
                    longest_sentence=longest, trials=trials)


def device_worker(spec):
    import gc

    import torch
    torch.set_num_threads(spec["threads"])
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    run = DeviceRun(spec)
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, device=spec["device"],
                python=platform.python_version(), threads=torch.get_num_threads())
    try:
        import fairseq
        info["fairseq"] = fairseq.__version__
    except Exception:
        info["fairseq"] = "?"
    if run.cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    gpu_memory_mb=props.total_memory / 2 ** 20,
                    cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    run.emit("info", info=info)

    peak_dtypes = ["fp32", "fp16", "bf16"] if run.cuda else ["fp32", "bf16"]
    run.emit("progress", text=f"matmul peaks ({spec['peak_size']}^3 torch.mm: {', '.join(peak_dtypes)})")
    peaks = device_matmul_peaks(run.device, spec["peak_size"], 5, peak_dtypes, run.sync)
    run.emit("peaks", peaks=peaks)
    gc.collect()
    if run.cuda:
        torch.cuda.empty_cache()

    names = spec["names"]
    cfgs, task = {}, None
    for size in spec["sizes"]:
        for name in names:
            opts = model_options(name, "fp32", size, spec["layers"], spec["dropout"], spec["paper_sizes"])
            cfg, t = build(dict(spec, max_tokens=spec["max_tokens"], model_options=opts))
            cfgs[(size, name)] = (cfg, opts)
            task = task or t
    tr = train_batches(task, spec)
    ntokens = [int(s["ntokens"]) for s in tr]
    gen_host = []
    for bs in spec["gen_batch_sizes"]:
        n = spec["gen_sentences_bs1"] if bs == 1 else spec["gen_sentences"]
        gen_host.append((bs, gen_batches(task, dict(spec, gen_batch_size=bs, gen_sentences=n))))
    fingerprints = dict(train=fingerprint([s["id"].tolist() for s in tr]),
                        **{f"gen_bs{bs}": fingerprint([[s["id"].tolist(), n] for s, n in b])
                           for bs, b in gen_host})
    run.emit("data", fingerprints=fingerprints, train_batches=len(tr), train_tokens=sum(ntokens),
             gen={str(bs): dict(batches=len(b), sentences=sum(s["nsentences"] for s, _ in b))
                  for bs, b in gen_host})
    tr_dev = [run.to_device(s) for s in tr]  # once, before any timing
    gen_dev = [(bs, [(run.to_device(s), n) for s, n in b]) for bs, b in gen_host]
    run.sync()

    budget = spec["time_budget"]
    for size in spec["sizes"]:
        for precision in spec["precisions"]:
            tr_p = [run.cast(s, precision) for s in tr_dev]
            gen_p = [(bs, [(run.cast(s, precision), n) for s, n in b]) for bs, b in gen_dev]
            for name in names:
                cfg, opts = cfgs[(size, name)]
                result = dict(name=name, precision=precision, size=size, options=opts)
                elapsed = time.perf_counter() - T_START
                if budget and elapsed > budget:
                    result["error"] = f"skipped: --time-budget {budget:.0f} s used up ({elapsed:.0f} s)"
                    run.emit("result", result=result)
                    continue
                run.emit("progress", text=f"[size {size}] {name} {precision} ...")
                t0 = time.perf_counter()
                for phase in ("train", "generate"):
                    error = None
                    run.memory.start()
                    try:
                        if phase == "train":
                            run.train(cfg, task, tr_p, ntokens, precision, result)
                        else:
                            run.generate(cfg, task, gen_p, precision, result)
                    except Exception as e:
                        import traceback
                        traceback.print_exc()
                        error = ("out of memory: " if _is_oom(e) else "") + _error_text(e)
                    gc.collect()
                    if run.cuda:
                        torch.cuda.empty_cache()
                    if error:
                        result[f"{phase}_error"] = error
                result["seconds"] = time.perf_counter() - t0
                run.emit("result", result=result)

    if spec["max_tokens_search"]:
        size, precision = spec["sizes"][0], spec["precisions"][0]
        for name in names:
            cfg, _ = cfgs[(size, name)]
            elapsed = time.perf_counter() - T_START
            if budget and elapsed > budget:
                run.emit("search", name=name, result=dict(
                    precision=precision, error=f"skipped: --time-budget {budget:.0f} s used up"))
                continue
            run.emit("progress", text=f"max-tokens search: {name} {precision} ...")
            try:
                found = run.max_tokens_search(cfg, task, precision, spec["max_tokens"],
                                              spec["max_tokens_search_cap"], 2)
            except Exception as e:
                import traceback
                traceback.print_exc()
                found = dict(precision=precision, error=_error_text(e))
            gc.collect()
            if run.cuda:
                torch.cuda.empty_cache()
            run.emit("search", name=name, result=found)
    run.emit("done", seconds=time.perf_counter() - T_START)


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
                criterion=args.criterion,
                updates=args.updates, flop_batches=args.flop_batches, gen_split=args.gen_split,
                gen_sentences=args.gen_sentences, gen_batch_size=args.gen_batch_size,
                beams=args.beams, reset_peak=reset_peak,
                model_options=model_options(name, precision, size, args.layers, args.dropout))
    tag = f"{name}-{precision}-{size}"
    # one subprocess per phase: the training one runs as fairseq-train does with the plugin
    # (oneDNN's primitive cache capped, freed memory kept on the heap: fairseq_s2s_attn/runtime.py),
    # the generation one as fairseq-generate does (freed memory kept too), and its memory does not
    # start from what training left behind
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


def data_splits(data):
    """The splits of a data-bin: train, valid, test, ... from its {split}.{src}-{tgt}.{lang}.bin files."""
    return sorted({os.path.basename(f).split(".")[0] for f in glob.glob(os.path.join(data, "*.bin"))})


def check_data(data, gen_split, synthetic: bool = True):
    """Stops with one error (and the command that builds the demo data) unless ``data`` is a
    fairseq data-bin with a train split and ``gen_split``; ``synthetic``: the script has
    --synthetic, which the error then names too."""
    def missing():
        if not os.path.isdir(data):
            return f"{data} does not exist"
        if not glob.glob(os.path.join(data, "dict.*.txt")):
            return f"{data} has no dict.*.txt"
        if not glob.glob(os.path.join(data, "train.*.bin")):
            return f"{data} has no train.*.bin"
        return None

    problem = missing()
    if not problem and gen_split not in data_splits(data):  # the data is there, the split is not
        raise SystemExit(f"error: --gen-split {gen_split}: {data} has no {gen_split}.*.bin; its splits: "
                         f"{', '.join(data_splits(data))}")
    if problem:
        raise SystemExit(
            f"error: {problem}: --data must be a fairseq data-bin.\n"
            "Build the demo data first:\n"
            "    python scripts/prepare_data.py all --lang de --work work/demo\n"
            + ("(or `make demo`), or pass --synthetic to benchmark on a synthetic data-bin built in "
               "a temporary folder." if synthetic else "(or `make demo`)."))


def make_synthetic(root, args):
    raw, bin_dir = os.path.join(root, "raw"), os.path.join(root, "data-bin")
    env = worker_env(1)
    steps = [
        [sys.executable, os.path.join(ROOT, "scripts", "make_synthetic.py"), "--task", "reverse",
         "--out", raw, "--train", str(args.synthetic_train), "--valid", "50",
         "--test", str(max(args.gen_sentences, 50)), "--vocab", str(args.synthetic_vocab),
         "--max-len", str(args.synthetic_max_len), "--seed", str(args.seed)],
        [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt",
         "--trainpref", os.path.join(raw, "train"), "--validpref", os.path.join(raw, "valid"),
         "--testpref", os.path.join(raw, "test"), "--destdir", bin_dir, "--workers", "1"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd[:2])} failed:\n{proc.stderr[-2000:]}")
    return bin_dir


def training_parser(doc: str, configs) -> argparse.ArgumentParser:
    """The options the training scripts that build on this one share (train_ab.py,
    memory_trend.py): the data, the configurations (names from ``configs``, lstm left out: it is
    the baseline), precisions, matched sizes, --max-tokens and the seed of the batches."""
    from cli_args import at_least

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="fairseq data-bin (e.g. work/demo/data-bin)")
    p.add_argument("--archs", nargs="+", default=["rnn_bahdanau", "rnn_luong", "rnn_luong_nofeed"],
                   choices=sorted(n for n in configs if n != BASELINE),
                   help="configurations (benchmark.py's names)")
    p.add_argument("--precisions", nargs="+", default=["bf16"], choices=PRECISIONS)
    p.add_argument("--size", type=at_least(1), default=256, help="matched sizes, as benchmark.py --sizes")
    p.add_argument("--max-tokens", type=at_least(1), default=2000)
    p.add_argument("--seed", type=int, default=1)
    return p


def report_header(title: str, script: str, argv, threads: int) -> str:
    """The opening of a turn-taking script's markdown report (beam_ab.py, train_ab.py): a dated
    title, the command as run, the machine."""
    command = " ".join(argv if argv is not None else sys.argv[1:])
    return (f"## {title} ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
            f"Command: `python scripts/{script} {command}`\n\n{machine_description(threads)}\n")


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
    head += ["train peak MB", "× lstm", "gen peak MB", "train tensor MB", "× lstm", "gen tensor MB",
             "× lstm", "GFLOP/update", "GFLOP/s", "% of peak"]
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
                  fmt(res["gen_peak_mb"], 1),
                  fmt(res.get("train_tensor_mb"), 1), ratio(res.get("train_tensor_mb"), metric(b, "train_tensor_mb")),
                  fmt(res.get("gen_tensor_mb"), 1), ratio(res.get("gen_tensor_mb"), metric(b, "gen_tensor_mb")),
                  fmt(res["gflop_per_update"], 2), fmt(res["gflop_s"], 1),
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
        # a model whose products and search took what they took here, and nothing else, would
        # decode 1 / (products + search) times as fast: the bound on what trimming the rest gives
        lstm_beam = [metric(r["result"], f"beam{beams[0]}.sent_s") for r in rows
                     if r["name"] == BASELINE and r["result"]]
        best_lstm = max([v for v in lstm_beam if v], default=None)
        lines += ["", f"Beam-{beams[0]} generation time by part (shares of one profiled pass; "
                  "at most: the speed with nothing but these products and fairseq's search, "
                  "against fairseq's lstm at its fastest):", "",
                  "| config | precision | matrix products | rest of the model | fairseq's search | at most × best lstm |",
                  "|---|---|---:|---:|---:|---:|"]
        for r, sh in shares:
            sent_s = metric(r["result"], f"beam{beams[0]}.sent_s")
            bound = (ratio(sent_s / (sh["matmul"] + sh["search"]), best_lstm)
                     if sent_s and best_lstm and sh["matmul"] is not None else "–")
            lines.append(f"| {r['name']} | {precision_label(r['name'], r['precision'])} | "
                         f"{100 * sh['matmul']:.0f}% | {100 * sh['model_other']:.0f}% | "
                         f"{100 * sh['search']:.0f}% | {bound} |")
        for r, sh in shares:
            if r["name"] == BASELINE:
                floor = sh["matmul"] + sh["search"]
                lines.append(
                    f"\nfairseq lstm {r['precision']}: matrix products plus fairseq's search take "
                    f"{100 * floor:.0f}% of its beam-{beams[0]} time. A model doing the same products "
                    "(the same sizes) as fast, under the same search, can be at most "
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


# =================================================================== device mode: driver and report


def device_spec(args, names):
    return dict(device=args.device, data=args.data, threads=args.threads, names=names,
                sizes=args.sizes, layers=args.layers, dropout=args.dropout,
                paper_sizes=args.paper_sizes, precisions=args.precisions,
                max_tokens=args.max_tokens, seed=args.seed, lr=args.lr, warmup=args.warmup,
                criterion=args.criterion,
                updates=args.updates, flop_batches=args.flop_batches, gen_split=args.gen_split,
                gen_sentences=args.gen_sentences, gen_sentences_bs1=args.gen_sentences_bs1,
                gen_batch_sizes=args.gen_batch_size, beams=args.beams,
                breakdown_batches=args.breakdown_batches, peak_size=args.peak_size,
                time_budget=args.time_budget, max_tokens_search=args.max_tokens_search,
                max_tokens_search_cap=args.max_tokens_search_cap)


def stream_device_worker(spec, log_path, threads, timeout, on_message):
    """Runs the one device worker; its tagged stdout lines go to on_message as they come (so a
    crash or a kill keeps what was measured). Returns an error string or None."""
    import threading

    cmd = [sys.executable, os.path.abspath(__file__), "--device-worker", json.dumps(spec)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env=worker_env(threads), cwd=ROOT, bufsize=1)
        killed = []

        def kill():
            killed.append(True)
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith(RESULT_TAG):
                    on_message(json.loads(line[len(RESULT_TAG):]))
                else:
                    log.write(line)
                    log.flush()
            proc.wait()
        finally:
            timer.cancel()
    if killed:
        return f"timed out after {timeout} s (log: {log_path})"
    if proc.returncode != 0:
        tail = open(log_path).read().strip().splitlines()
        reason = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln),
                      tail[-1] if tail else "")
        return f"exit {proc.returncode}: {reason.strip()[:300]} (log: {log_path})"
    return None


def device_main(args, argv_line, log_dir, data_desc, vocab):
    names = [BASELINE] + [a for a in args.archs if a != BASELINE]
    spec = device_spec(args, names)
    state = dict(command=argv_line, stamp=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                 args={k: v for k, v in vars(args).items() if k not in ("device_worker", "worker", "peak")},
                 data=dict(description=data_desc, vocab=vocab), info={}, peaks={}, rows=[],
                 max_tokens_search={}, worker_error=None, worker_seconds=None)

    def save_json():
        if args.json:
            tmp_path = args.json + ".part"
            with open(tmp_path, "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1)
            os.replace(tmp_path, args.json)

    def on_message(msg):
        kind = msg["kind"]
        if kind == "progress":
            print(f"{time.perf_counter() - T_START:6.1f} s  {msg['text']}", flush=True)
        elif kind == "info":
            state["info"] = msg["info"]
        elif kind == "peaks":
            state["peaks"] = msg["peaks"]
            print("        matmul peaks: " + ", ".join(f"{k} {v / 1e3:.1f} TFLOP/s"
                                                      for k, v in msg["peaks"].items()), flush=True)
        elif kind == "data":
            state["data"].update(fingerprints=msg["fingerprints"], train_batches=msg["train_batches"],
                                 train_tokens=msg["train_tokens"], gen=msg["gen"])
        elif kind == "result":
            r = msg["result"]
            state["rows"].append(r)
            print("        " + device_summary(r, args), flush=True)
        elif kind == "search":
            state["max_tokens_search"][msg["name"]] = msg["result"]
            res = msg["result"]
            print(f"        {msg['name']} {res.get('precision')}: " + (res["error"] if res.get("error") else
                  f"largest fit {res.get('largest_fit')}, first failure {res.get('smallest_fail')}"
                  + (f" ({res['limit']})" if res.get("limit") else "")), flush=True)
        elif kind == "done":
            state["worker_seconds"] = msg["seconds"]
        save_json()

    print(f"one worker process on {args.device} for {len(names)} configuration(s) x "
          f"{len(args.precisions)} precision(s) x {len(args.sizes)} size(s)", flush=True)
    load0 = os.getloadavg()[0]
    error = stream_device_worker(spec, os.path.join(log_dir, "device-worker.log"), args.threads,
                                 args.timeout, on_message)
    state["load"] = [load0, os.getloadavg()[0]]
    state["seconds"] = time.perf_counter() - T_START
    if error:
        state["worker_error"] = error
        print(f"error: the worker failed: {error}", file=sys.stderr)
    save_json()
    text = "\n".join(device_report(state, args)) + "\n"
    print("\n" + text)
    write_report(text, args)
    if args.json:
        print(f"wrote {args.json}")
    print(f"total {time.perf_counter() - T_START:.1f} s")
    failed = bool(error) or any(any(k.endswith("error") for k in r) for r in state["rows"])
    return failed


def device_summary(r, args):
    head = f"{r['name']} {r['precision']}"
    if r.get("error"):
        return f"{head}: {r['error']}"
    parts = [f"{r.get('seconds', 0):.1f} s"]
    if "train_tok_s" in r:
        parts.append(f"train {r['train_tok_s']:,.0f} tok/s")
    for bs in args.gen_batch_size:
        for beam in args.beams:
            e = r.get(f"beam{beam}_bs{bs}")
            if e:
                parts.append(f"beam {beam} bs {bs} {e['sent_s']:.1f} sent/s")
    if r.get("train_peak_mb") is not None:
        parts.append(f"train peak {r['train_peak_mb']:.0f} MB")
    if r.get("gen_peak_mb") is not None:
        parts.append(f"gen peak {r['gen_peak_mb']:.0f} MB")
    for phase in ("train", "generate"):
        if r.get(f"{phase}_error"):
            parts.append(f"{phase} FAILED: {r[phase + '_error']}")
    return f"{head}: " + ", ".join(parts)


def _cell_error(text):
    return text.replace("|", "\\|").replace("\n", " ")


def device_report(state, args):
    info, peaks = state["info"], state["peaks"]
    cuda = args.device == "cuda"
    md = [f"## Benchmark {state['stamp']} (--device {args.device}"
          + ("" if cuda else ", --gpu-style") + ")", "", f"Command: `{state['command']}`", ""]
    cpu_name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu_name)
    except OSError:
        pass
    versions = (f"torch {info.get('torch', '?')}, CUDA {info.get('cuda') or 'none'}"
                + (f", cuDNN {info.get('cudnn')}" if info.get("cudnn") else "")
                + f", fairseq {info.get('fairseq', '?')}, Python {info.get('python', '?')}")
    if cuda and info.get("gpu"):
        cap = info.get("capability") or ["?", "?"]
        md += [f"Machine: GPU {info['gpu']} (compute capability {cap[0]}.{cap[1]}, "
               f"{info.get('gpu_memory_mb', 0):,.0f} MB); {versions}; TF32 for fp32 matmul "
               f"{'on' if info.get('tf32_matmul') else 'off'}, for cuDNN "
               f"{'on' if info.get('tf32_cudnn') else 'off'} (torch defaults); host {cpu_name}, "
               f"{os.cpu_count()} logical cores, Linux {platform.release()}.", ""]
    elif cuda:
        md += [f"Machine: the worker stopped before it named the GPU; host {cpu_name}, "
               f"{os.cpu_count()} logical cores, Linux {platform.release()}.", ""]
    else:
        md += [f"Machine: {cpu_name}, {os.cpu_count()} logical cores, Linux {platform.release()}; "
               f"{versions}; {info.get('threads', args.threads)} intra-op thread(s). "
               "(--gpu-style: the GPU benchmark's code path run on the CPU, to check it; CPU "
               "timings here are not the CPU benchmark's.)", ""]
    load = state.get("load") or [0, 0]
    md += [f"Load average: {load[0]:.1f} at the start, {load[1]:.1f} at the end; the whole run took "
           f"{state.get('seconds', 0):.0f} s.", ""]
    if state.get("worker_error"):
        md += [f"**The worker process failed:** {state['worker_error']}. Rows below are what it "
               "measured before that.", ""]
    if peaks:
        md += [f"Matmul peak ({args.peak_size}³ torch.mm, best of 5 timings of 3 products"
               + (", torch.cuda.synchronize() after each timing" if cuda else "") + "): "
               + ", ".join(f"{k} {v / 1e3:,.1f} TFLOP/s" for k, v in peaks.items())
               + ". % of peak uses the row's precision (amp: fp16).", ""]
    d = state["data"]
    gen_desc = "; ".join(
        f"batch {bs}: the first {(d.get('gen') or {}).get(str(bs), {}).get('sentences', '?')} sentences"
        for bs in args.gen_batch_size)
    md += [f"Data: {d['description']} (dictionaries incl. special symbols: {d['vocab']}). Training: "
           f"{args.updates} timed updates after {args.warmup} warm-up, --max-tokens {args.max_tokens}, "
           f"{args.criterion}, Adam (lr {args.lr}), dropout {args.dropout}; the same batches in the same "
           "order for every model and precision, moved to the device once before any timing. "
           f"Generation: fairseq SequenceGenerator, beam {', '.join(map(str, args.beams))}, "
           f"{args.gen_split} in file order ({gen_desc}), one untimed warm-up batch per batch size, "
           "hypotheses forced to the longest reference length in the batch (untrained models); no "
           "alignment extraction.", "",
           "Precisions, as fairseq-train/fairseq-generate do them: fp16 = model.half() and bf16 = "
           "model.to(torch.bfloat16) (floating tensors of the samples cast to the same dtype, token "
           "ids stay long), with an fp32 master copy of the parameters for the Adam step (flattened, "
           "as fairseq's FP16Optimizer; no loss scaling, no overflow check, no clipping); amp = fp32 "
           f"model, forward and loss under torch.autocast(\"{args.device}\", float16); fp32 = plain. Our "
           "models get --cpu-bf16 false. fairseq's lstm is treated exactly the same way. Every "
           "configuration and precision ran in ONE worker process, one after the other"
           + (" (torch.cuda.synchronize() before every timer read)" if cuda else "") + ".", "",
           "Columns: train tok/s = target tokens (incl. EOS) per second of forward + backward + "
           "optimizer step; beam-k bs-b sent/s, tok/s = sentences and generated tokens (incl. EOS) "
           "per second at batch size b; train/gen peak MB = "
           + ("torch.cuda.max_memory_allocated() in the phase minus what was allocated at its start "
              "(the batches, the same for every model): model, gradients, master copy, Adam state, "
              "activations / model, beam search state"
              if cuda else "growth of the peak RSS in the phase (rough; n/a where the peak cannot be reset)")
           + "; GFLOP/update = matrix-product FLOPs of one update (forward + backward, counted with "
           "FlopCounterMode on the first "
           f"{args.flop_batches or 'all'} timed batches, cuDNN's/oneDNN's fused RNN kernels added "
           "analytically); GFLOP/s = those per second of training; % of peak = GFLOP/s over the "
           "measured matmul peak of the row's precision. Every × lstm is against fairseq's lstm at "
           "the SAME precision (for memory, lower is better).", ""]

    beams, sizes_bs = args.beams, args.gen_batch_size
    for size in args.sizes:
        rows = [r for r in state["rows"] if r["size"] == size]
        base = {r["precision"]: r for r in rows if r["name"] == BASELINE}
        head = ["config", "precision", "params (M)", "train tok/s", "× lstm"]
        for bs in sizes_bs:
            for beam in beams:
                head += [f"beam-{beam} bs-{bs} sent/s", "× lstm", f"beam-{beam} bs-{bs} tok/s"]
        head += ["train peak MB", "× lstm", "gen peak MB", "× lstm", "GFLOP/update", "GFLOP/s",
                 "% of peak", "notes"]
        md += [f"### Sizes: embedding = hidden = {size}, {args.layers} layer(s), --device {args.device}", "",
               "| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 3) + ["---"]) + "|"]
        for r in rows:
            b = base.get(r["precision"]) or {}
            label = f"{r['name']} (fairseq)" if r["name"] == BASELINE else r["name"]
            if r["name"] in PAPER_CONFIGS and args.paper_sizes:
                label += " (own sizes)"
            cells = [label, device_precision_label(r["name"], r["precision"]),
                     f"{r['params'] / 1e6:.2f}" if r.get("params") else "–",
                     fmt(r.get("train_tok_s")), ratio(r.get("train_tok_s"), b.get("train_tok_s"))]
            for bs in sizes_bs:
                for beam in beams:
                    e, be = r.get(f"beam{beam}_bs{bs}") or {}, b.get(f"beam{beam}_bs{bs}") or {}
                    cells += [fmt(e.get("sent_s"), 1), ratio(e.get("sent_s"), be.get("sent_s")),
                              fmt(e.get("tok_s"))]
            peak = peaks.get(PEAK_KEY[r["precision"]])
            gflop_s = r.get("gflop_s")
            cells += [fmt(r.get("train_peak_mb"), 1), ratio(r.get("train_peak_mb"), b.get("train_peak_mb")),
                      fmt(r.get("gen_peak_mb"), 1), ratio(r.get("gen_peak_mb"), b.get("gen_peak_mb")),
                      fmt(r.get("gflop_per_update"), 2), fmt(gflop_s, 1),
                      f"{100 * gflop_s / peak:.2f}" if gflop_s and peak else "–"]
            notes = [f"{k.replace('_error', '')}: {r[k]}" for k in ("error", "train_error", "generate_error",
                                                                    "flop_error") if r.get(k)]
            cells.append(_cell_error("; ".join(notes)) if notes else "")
            md.append("| " + " | ".join(cells) + " |")

        fused = [f"{r['name']} {r['precision']} ({', '.join(r['fused_rnn_kernels'])})"
                 for r in rows if r.get("fused_rnn_kernels")]
        md += ["", "Fused RNN kernels seen while counting FLOPs (their FLOPs added analytically): "
               + ("; ".join(fused) if fused else "none") + "."]

        shares = [(r, (r.get(f"beam{beams[0]}_bs{sizes_bs[0]}") or {})) for r in rows]
        shares = [(r, e) for r, e in shares if e.get("breakdown")]
        if shares:
            nb = shares[0][1].get("breakdown_batches", "?")
            md += ["", f"Beam-{beams[0]} generation time at batch {sizes_bs[0]} by part (a separate pass "
                   f"over the first {nb} batch(es); every model call — forward_encoder, forward_decoder, "
                   "reorder_encoder_out, reorder_incremental_state — timed"
                   + (" between torch.cuda.synchronize() calls" if cuda else "")
                   + "; fairseq's search = the rest of the pass: SequenceGenerator outside the model"
                   + ("; matrix products not measured on CUDA (no profiler run)" if cuda else
                      "; matrix products from torch.profiler self CPU time") + "):", "",
                   "| config | precision | model's calls | of which matrix products | fairseq's search |",
                   "|---|---|---:|---:|---:|"]
            for r, e in shares:
                sh = e["breakdown"]
                model_share = (sh["matmul"] or 0) + sh["model_other"]
                mm = "not measured" if sh["matmul"] is None else f"{100 * sh['matmul']:.0f}%"
                md.append(f"| {r['name']} | {device_precision_label(r['name'], r['precision'])} | "
                          f"{100 * model_share:.0f}% | {mm} | {100 * sh['search']:.0f}% |")
            for r, e in shares:
                if r["name"] == BASELINE:
                    md.append(f"\nfairseq lstm {r['precision']}: fairseq's search alone takes "
                              f"{100 * e['breakdown']['search']:.0f}% of its beam-{beams[0]} batch-"
                              f"{sizes_bs[0]} time; a model with a zero-cost forward could be at most "
                              f"{1 / max(e['breakdown']['search'], 1e-9):.2f}x as fast under the same search.")
        md.append("")

    if state["max_tokens_search"]:
        md += [f"Largest --max-tokens at which one training update (forward, backward, step) of the "
               f"longest training sentences fits ({args.sizes[0]} units, precision "
               f"{args.precisions[0]}; doubling from {args.max_tokens}, then 2 bisection steps, up to "
               f"{args.max_tokens_search_cap}):", "",
               "| config | largest fit | first failure | sentences × length at the fit | note |",
               "|---|---:|---:|---|---|"]
        for name, s in state["max_tokens_search"].items():
            if s.get("error"):
                md.append(f"| {name} | – | – | – | {_cell_error(s['error'])} |")
                continue
            fit = next((t for t in s["trials"] if t["max_tokens"] == s["largest_fit"]), None)
            note = {"cap": "reached the cap", "data": "the training data has too few sentences for "
                    "the next step", None: ""}.get(s.get("limit"), _cell_error(str(s.get("limit"))))
            if s["largest_fit"] is None and not note:
                note = f"--max-tokens {args.max_tokens} does not fit"
            md.append(f"| {name} | {fmt(s['largest_fit'])} | {fmt(s['smallest_fail'])} | "
                      + (f"{fit['sentences']} × {s['longest_sentence']}" if fit else "–") + f" | {note} |")
        md.append("")

    fps = (state["data"].get("fingerprints") or {})
    if fps:
        md.append("Batch fingerprints (sentence ids; one process, so the same for every row): "
                  + ", ".join(f"{k} {v}" for k, v in fps.items()) + ".")
        md.append("")
    md += ["Model options:", ""]
    seen = set()
    for r in state["rows"]:
        key = (r["name"], r["size"])
        if key not in seen and r.get("options"):
            seen.add(key)
            md.append(f"- {r['name']} (size {r['size']}): `{' '.join(r['options'])}`")
    md.append("")
    return md


def write_report(text, args):
    """The Markdown report to --out: a new file, or a new section appended (--overwrite replaces)."""
    if not args.out:
        return
    mode = "w" if args.overwrite or not os.path.exists(args.out) else "a"
    with open(args.out, mode, encoding="utf-8") as f:
        if mode == "a":
            f.write("\n")
        f.write(text)
    print(f"{'wrote' if mode == 'w' else 'appended to'} {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="work/demo/data-bin", help="fairseq data-bin (default: %(default)s)")
    p.add_argument("--synthetic", action="store_true",
                   help="benchmark on a synthetic reversal data-bin built in a temporary folder")
    p.add_argument("--synthetic-train", type=int, default=5000, help="synthetic training pairs")
    p.add_argument("--synthetic-vocab", type=int, default=1000, help="synthetic vocabulary size")
    p.add_argument("--synthetic-max-len", type=int, default=30, help="longest synthetic sentence")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the CPU benchmark (one subprocess per configuration); cuda: the GPU "
                   "benchmark, everything in ONE worker process (see 'GPU mode' above)")
    p.add_argument("--gpu-style", action="store_true",
                   help="with --device cpu: run the GPU benchmark's code path on the CPU (a check of it)")
    p.add_argument("--archs", "--configs", nargs="+", default=None, choices=list(ALL_CONFIGS),
                   help="configurations to measure (the lstm baseline is always added; "
                   f"{', '.join(PAPER_CONFIGS)} only with --device cuda / --gpu-style)")
    p.add_argument("--paper-sizes", action="store_true",
                   help="GPU mode: the *_paper configurations with their own sizes (the architectures' "
                   "defaults) instead of the matched --sizes")
    p.add_argument("--precisions", nargs="+", default=None, choices=DEVICE_PRECISIONS,
                   help="CPU: fp32 bf16 (default both); GPU mode: fp32 fp16 bf16 amp "
                   "(default: fp16 bf16 on cuda, fp32 bf16 with --gpu-style)")
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="embedding = hidden = readout = attention size; one table per size "
                   "(default 256; GPU mode 512)")
    p.add_argument("--layers", type=int, default=1, help="RNN layers on each side")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout everywhere (fairseq lstm's default)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per measurement")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="training batch size in tokens (default 2000; GPU mode 8000)")
    p.add_argument("--warmup", type=int, default=None, help="untimed updates before timing (default 3; GPU mode 5)")
    p.add_argument("--updates", type=int, default=None, help="timed updates (default 20; GPU mode 30)")
    p.add_argument("--flop-batches", type=int, default=2,
                   help="timed batches whose FLOPs are counted (0 = all)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--criterion", default=DEFAULT_CRITERION,
                   choices=("fused_cross_entropy", "cross_entropy"),
                   help="training loss (default %(default)s: the plugin's output layer and loss in "
                        "one pass; cross_entropy: fairseq's, to measure the difference)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gen-split", default="test")
    p.add_argument("--gen-sentences", type=int, default=None,
                   help="first N sentences of --gen-split (default 48; GPU mode 256, for batch sizes > 1)")
    p.add_argument("--gen-sentences-bs1", type=int, default=32,
                   help="GPU mode: sentences for generation batch size 1 (default %(default)s)")
    p.add_argument("--gen-batch-size", nargs="+", type=int, default=None,
                   help="sentences per generation batch (default 16; GPU mode several: 128 1)")
    p.add_argument("--beams", nargs="+", type=int, default=None, help="beam sizes (default 5 1; GPU mode 5)")
    p.add_argument("--breakdown-batches", type=int, default=1,
                   help="GPU mode: batches of the first generation batch size in the pass that splits "
                   "generation time into model and search (0 = all)")
    p.add_argument("--peak-size", type=int, default=None,
                   help="matmul size for the peak measurement (default 2048; cuda 8192)")
    p.add_argument("--max-tokens-search", action="store_true",
                   help="GPU mode: also find the largest --max-tokens at which one update of the longest "
                   "batches fits, per configuration, at the first precision (costs time)")
    p.add_argument("--max-tokens-search-cap", type=int, default=2 ** 20,
                   help="GPU mode: largest --max-tokens tried by --max-tokens-search")
    p.add_argument("--time-budget", type=float, default=None,
                   help="GPU mode: seconds after the worker's start past which the remaining "
                   "configurations are skipped (marked in the table), so that a report is always "
                   "written (default: 120 on cuda, none with --gpu-style; 0 = none)")
    p.add_argument("--json", default=None, help="also write every result as JSON here "
                   "(GPU mode: rewritten after every configuration, so a killed run keeps its results)")
    p.add_argument("--out", default=None, help="Markdown file: a dated section is appended")
    p.add_argument("--overwrite", action="store_true", help="replace --out instead of appending")
    p.add_argument("--log-dir", default=None, help="keep the workers' logs here")
    p.add_argument("--timeout", type=int, default=None,
                   help="seconds per configuration (default 1800); GPU mode: for the one worker, which "
                   "is then killed and what it measured reported (default --time-budget + 25 s, "
                   "1800 without a budget)")
    p.add_argument("--separate-phases", action="store_true",
                   help="take peak memory from ru_maxrss instead of the reset VmHWM (automatic "
                   "where /proc/self/clear_refs cannot reset the peak); training and generation "
                   "always run in separate subprocesses")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--peak", help=argparse.SUPPRESS)
    p.add_argument("--device-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.peak:
        return matmul_peak(json.loads(args.peak))
    if args.device_worker:
        return device_worker(json.loads(args.device_worker))
    device_mode = args.device == "cuda" or args.gpu_style
    if args.gpu_style and args.device != "cpu":
        p.error("--gpu-style goes with --device cpu (--device cuda always runs that code path)")
    defaults = dict(archs=list(CONFIGS), timeout=1800)
    if device_mode:
        defaults.update(precisions=["fp16", "bf16"] if args.device == "cuda" else ["fp32", "bf16"],
                        sizes=[512], max_tokens=8000, warmup=5, updates=30, gen_sentences=256,
                        gen_batch_size=[128, 1], beams=[5],
                        peak_size=8192 if args.device == "cuda" else 2048,
                        time_budget=120 if args.device == "cuda" else 0)
    else:
        defaults.update(precisions=list(PRECISIONS), sizes=[256], max_tokens=2000, warmup=3,
                        updates=20, gen_sentences=48, gen_batch_size=[16], beams=[5, 1], peak_size=2048)
    if device_mode and args.timeout is None:  # a hung worker must not eat a GPU run's budget
        budget = args.time_budget if args.time_budget is not None else defaults["time_budget"]
        args.timeout = int(budget + 25) if budget else 1800
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not device_mode:
        bad = [x for x in args.precisions if x not in PRECISIONS]
        if bad:
            p.error(f"--precisions {' '.join(bad)}: only with --device cuda (or --gpu-style); "
                    f"the CPU benchmark measures {' '.join(PRECISIONS)}")
        bad = [x for x in args.archs if x in PAPER_CONFIGS]
        if bad:
            p.error(f"--archs {' '.join(bad)}: only with --device cuda (or --gpu-style)")
        if len(args.gen_batch_size) != 1:
            p.error("--gen-batch-size takes one value on the CPU benchmark (several with --device cuda)")
        args.gen_batch_size = args.gen_batch_size[0]
        for name in ("paper_sizes", "max_tokens_search"):
            if getattr(args, name):
                p.error(f"--{name.replace('_', '-')}: only with --device cuda (or --gpu-style)")
    for name in ("threads", "max_tokens", "updates", "gen_sentences", "layers", "gen_sentences_bs1"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.gen_batch_size if device_mode else [args.gen_batch_size]) < 1 or min(args.beams) < 1:
        p.error("--gen-batch-size and --beams must be at least 1")
    if min(args.sizes) < 1:
        p.error("--sizes must be at least 1")
    if args.warmup < 0 or args.flop_batches < 0 or args.breakdown_batches < 0:
        p.error("--warmup, --flop-batches and --breakdown-batches must be >= 0")
    if device_mode and args.updates < 1:
        p.error("--updates must be at least 1")
    if args.synthetic and args.gen_split not in ("train", "valid", "test"):
        p.error(f"--gen-split {args.gen_split}: the synthetic data-bin has train, valid and test")
    for name in ("out", "json"):  # written at the end: a bad path must not lose the measurements
        path = getattr(args, name)
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if path and os.path.isdir(path):
            p.error(f"--{name} {path} is a folder; give a file")
        if path and not os.path.isdir(folder):
            p.error(f"--{name} {path}: no folder {folder}")

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

        if device_mode:
            failed = device_main(args, argv_line, log_dir, data_desc, vocab)
            return 1 if failed else 0

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
               f"{args.criterion}, fairseq's Adam as fairseq-train runs it with the plugin (torch's "
               f"fused CPU kernel; lr {args.lr}), dropout {args.dropout}; the same batches "
               "in the same order for every model. Generation: fairseq SequenceGenerator, the first "
               f"{args.gen_sentences} sentences of {args.gen_split} in batches of {args.gen_batch_size}, "
               "hypotheses forced to the longest reference length in the batch (untrained models). "
               "Each configuration ran alone in its own subprocess. Peak memory: growth over the RSS "
               "after imports, data and one throwaway update/generation batch; "
               + ("one subprocess per phase, VmHWM reset after the warm-up." if reset_peak
                  else "ru_maxrss, one subprocess per phase.")
               + f" Training subprocesses cap oneDNN's primitive cache at {training_cache()} as "
               "fairseq-train does with the plugin, and both phases keep freed memory on the heap as fairseq-train and "
               "fairseq-generate do with it (every row)."
               + " Ratios (× lstm) are against fairseq's lstm at fp32; for memory, lower is better.", "",
               "Columns: train tok/s = target tokens (incl. EOS) per second of forward + backward + "
               "Adam step; beam-k sent/s, tok/s = sentences and generated tokens (incl. EOS) per "
               "second; train/gen peak MB = growth of peak RSS in the training/generation phase (gen: "
               "model loading, its preparation for inference and the timed beam searches; read "
               "before the profiled pass); "
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
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(dict(command=argv_line, machine=machine, stamp=stamp, peaks=peaks,
                               sections=[dict(size=size, rows=rows,
                                              fingerprints={k: sorted(v) for k, v in fps.items()})
                                         for size, rows, fps in sections]), f, indent=1)
            print(f"wrote {args.json}")
        write_report(text, args)
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
