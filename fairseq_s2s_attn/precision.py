"""Reduced precision: fairseq's ``--bf16`` on GPUs (and CPUs), and ``--cpu-bf16`` autocast.

``--bf16`` (every architecture, fairseq's own ``lstm`` and ``transformer`` too): fairseq turns
``--bf16`` into ``--tpu`` (``options.parse_args_and_arch``: "use bfloat16; implies --tpu"), so on a
GPU or CPU machine the trainer asks torch_xla for a TPU and dies with ``'NoneType' object has no
attribute 'xla_device'``. ``bf16_without_tpu`` clears the implied ``--tpu`` where torch_xla is not
installed (no TPU can be meant there), before fairseq's entry points read it. ``--bf16`` then does
on CUDA what ``--fp16`` does, in bfloat16 and without loss scaling: the trainer converts the model
to bf16 and keeps fp32 master weights (fairseq's FP16Optimizer). fairseq-generate and
fairseq-interactive convert the model for ``--fp16`` only; ``bf16_inference`` converts it for
``--bf16`` as well (log-probabilities and beam scores stay fp32 in fairseq's search).

``--fp16`` without CUDA: one error naming --cpu-bf16 and --bf16 (``fp16_needs_cuda``).

``--cpu-bf16`` (model option, CPU only): the encoder and decoder run under
``torch.autocast("cpu", bfloat16)``: matrix products run in bf16, while parameters, gradients,
optimizer state, the softmax of attention and the loss stay fp32. On a GPU it does nothing; use
``--bf16``, ``--fp16`` or ``--amp`` there. For decoding (fairseq-generate, fairseq-interactive,
the hub) the model stores the weights that enter only matrix products in bf16
(``store_in_bf16_``, called by ``RNNS2SModel.prepare_for_inference_``). In ``--cpu-bf16``
training the products over all positions of a batch run over their rows padded to a few sizes
(``padded_rows_linear``), so that oneDNN compiles their kernels once, not at every update.
"""

import contextlib
import importlib.util
import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .packed import linear
from .patching import replaces

logger = logging.getLogger(__name__)


def runs_cpu_bf16(module) -> bool:
    """Whether an encoder or decoder with --cpu-bf16 runs under bf16 autocast: not once the model
    was converted to fp16 (fairseq-generate and -interactive call ``model.half()`` for --fp16 on
    any device), where bf16 autocast over fp16 tensors stopped the first padded batch with
    "Unexpected floating ScalarType in at::autocast::prioritize": such a model runs in fp16, as
    fairseq's own models do with --fp16 on a CPU."""
    return module.cpu_bf16 and module.embed_tokens.weight.dtype != torch.float16


def cpu_autocast(enabled: bool, like: torch.Tensor):
    if enabled and like.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Tests set this to False to run the plain path (autocast casting at every product) for equality
HOIST_CASTS = True


def cast_for_products(x: Tensor) -> Tensor:
    """x in the dtype autocast runs matrix products in on its device (bf16 under --cpu-bf16), or
    x itself outside autocast.

    For a tensor that enters many products (the encoder outputs: every decoder step's attention
    context; the target embeddings: the RNN input and the readout), one cast instead of
    autocast's cast at every use, and no fp32 promotion where it is concatenated with bf16
    states: the products see the same bf16 values either way.

    Inference only (beam search, validation): where x needs a gradient, its gradient from the
    many uses would be summed in bf16, while autocast's per-use casts sum it in fp32; training
    keeps them (measured: gradients differ by up to 2^-5 on a tiny model).
    """
    device = x.device.type
    if not HOIST_CASTS or not torch.is_autocast_enabled(device) or not x.is_floating_point():
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return x
    return x.to(torch.get_autocast_dtype(device))


# Tests and scripts/train_ab.py set this to False to run every product over its own rows
PAD_ROWS = True
MIN_ROW_STEP = 64  # the finest bucket step (rows); steps grow with the row count (``padded_rows``)


def padded_rows(rows: int) -> int:
    """The bucket ``rows`` is padded to: the next multiple of 2^(floor(log2 rows) - 3), at least
    MIN_ROW_STEP: 8 buckets per octave (1,024-2,047 rows: multiples of 128), so at most 1/8 and
    on average ~3% more rows (the demo's batches at --max-tokens 2000: 2.9% over the target
    positions, 3.4% over the source positions)."""
    step = max(MIN_ROW_STEP, 1 << max(0, rows.bit_length() - 4))
    return -(-rows // step) * step


def pads_rows(x: Tensor) -> bool:
    """Whether a product over x's rows is padded (``padded_rows_linear``): in training (autograd
    recording) on a CPU with the product in bf16 (x bf16, or CPU autocast in bf16), where oneDNN
    compiles a kernel per shape. fp32 products on a CPU (MKL, no per-shape compilation), GPUs and
    decoding are left alone."""
    if not PAD_ROWS or x.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if x.dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def pad_rows(x: Tensor, fill=0) -> Tensor:
    """x (N x ...) with rows of ``fill`` appended up to ``padded_rows(N)``; x itself if none are
    needed. Autograd gives the appended rows no gradient and slices x's gradient back to N rows."""
    extra = padded_rows(x.size(0)) - x.size(0)
    if not extra:
        return x
    return torch.cat([x, x.new_full((extra,) + tuple(x.shape[1:]), fill)])


def padded_rows_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, weight, bias) for a product over many rows (x: ... x K, all positions of a
    batch: B x T or B x S of them), its rows padded with zeros to a bucket (``padded_rows``) in
    bf16 training on a CPU; ... x N.

    Why: torch runs a bf16 product on a CPU through oneDNN, which compiles a kernel for every
    shape it meets (ONEDNN_VERBOSE: 0.4-15 ms each). fairseq's batches give a new number of
    positions B x T at nearly every update, so every update compiled all of its N-row products
    anew, forward and backward: traced on an Intel Xeon with AMX (rnn_bahdanau, sizes 256,
    --max-tokens 2000), 25 kernels and 33-60 ms per update against 48-61 ms of oneDNN execution.
    Over a bucket's rows the products meet a few shapes, compiled once and kept in oneDNN's cache
    (``runtime.TRAINING_PRIMITIVE_CACHE``). Each row's result is its own product (the zero rows
    add nothing to the weight's gradient). Elsewhere ``packed.linear`` (decoding's packed
    weights)."""
    if not pads_rows(x):
        return linear(x, weight, bias)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.size(-1))  # N x K
    if torch.is_autocast_enabled("cpu"):
        flat = flat.to(torch.get_autocast_dtype("cpu"))  # pad the copy the product reads
    out = F.linear(pad_rows(flat), weight, bias)  # N' x N
    return out[:flat.size(0)].view(*lead, out.size(-1))


def over_positions(proj: nn.Linear, x: Tensor) -> Tensor:
    """proj(x); for x over all positions of a batch (B x T x D or B x S x D, not one step's B x D)
    through ``padded_rows_linear``, whose rows come in a few sizes (oneDNN's per-shape kernels)."""
    return padded_rows_linear(x, proj.weight, proj.bias) if x.dim() == 3 else proj(x)


def store_in_bf16_(params) -> int:
    """Stores each parameter's data in bf16 in place (the Parameter objects stay, so nn.LSTM's
    flat weight list and optimisers that hold them still see them); returns the bytes freed.

    For weights that enter only matrix products run under CPU autocast: autocast casts an fp32
    weight to bf16 before every such product and, while its region is open, keeps that bf16
    copy next to the fp32 weight. A weight stored in bf16 gives the products the same values
    (the cast is the same round-to-nearest-even) with half the memory and no copy at all.
    """
    freed = 0
    with torch.no_grad():
        for p in params:
            if p.dtype == torch.bfloat16 or not p.is_floating_point():
                continue
            freed += p.numel() * (p.element_size() - 2)
            p.data = p.data.to(torch.bfloat16)
    return freed


def _all_cpu_bf16(generator) -> bool:
    models = getattr(getattr(generator, "model", None), "models", None)
    decoders = [getattr(m, "decoder", None) for m in models or ()]
    return bool(decoders) and all(getattr(d, "cpu_bf16", False) and runs_cpu_bf16(d) for d in decoders)


def generate_in_one_autocast_region() -> None:
    """Beam search with ``--cpu-bf16`` models runs inside one autocast region.

    fairseq's SequenceGenerator calls the decoder once per target step. Autocast keeps its bf16
    copies of the weights only while the outermost autocast region is open, so a region opened
    per decoder call casts every weight (the output layer: vocabulary x dim) again at every step.
    One region around the whole search casts them once per batch; what runs in bf16 is the same.
    """
    from fairseq.sequence_generator import SequenceGenerator

    @replaces(SequenceGenerator, "_generate")
    def _generate(original, self, sample, *args, **kwargs):
        src = sample.get("net_input", {}).get("src_tokens") if isinstance(sample, dict) else None
        if src is None or not _all_cpu_bf16(self):
            return original(self, sample, *args, **kwargs)
        with cpu_autocast(True, src):
            return original(self, sample, *args, **kwargs)


def tpu_available() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def clear_implied_tpu(cfg) -> bool:
    """--bf16 without torch_xla: drop the --tpu that fairseq's option parsing added, from
    ``common`` and every section that copied it (distributed_training, optimizer, ...). Returns
    whether it did."""
    common = getattr(cfg, "common", None)
    if common is None or not (common.bf16 and common.tpu) or tpu_available():
        return False
    from omegaconf import open_dict

    with open_dict(cfg):
        for name in list(cfg.keys()):
            section = cfg.get(name)
            if hasattr(section, "keys") and "tpu" in section and section.get("tpu") is True:
                section.tpu = False
    device = "CPU" if common.cpu or not torch.cuda.is_available() else "CUDA"
    logger.info(f"--bf16 on {device}: bfloat16 model with fp32 master weights "
                f"(fairseq's --bf16 implies --tpu; torch_xla is not installed, so no TPU is used)")
    return True


def bf16_without_tpu() -> None:
    from fairseq.distributed import utils as distributed_utils

    @replaces(distributed_utils, "call_main")
    def call_main(original, cfg, main, **kwargs):
        clear_implied_tpu(cfg)
        return original(cfg, main, **kwargs)


def bf16_inference() -> None:
    from fairseq.models import BaseFairseqModel

    @replaces(BaseFairseqModel, "prepare_for_inference_")
    def prepare_for_inference_(original, self, cfg):
        common = getattr(cfg, "common", None)
        if getattr(common, "bf16", False) and not getattr(common, "fp16", False):
            self.to(torch.bfloat16)
        return original(self, cfg)


def fp16_needs_cuda() -> None:
    """``fairseq-train --fp16`` without CUDA died at its first update with a traceback ending in
    "AssertionError: Torch not compiled with CUDA enabled" (fairseq's FP16Optimizer asks CUDA
    for the device of its flat fp32 master weights). Now one error names the options that work
    on a CPU. ``--fp16-no-flatten-grads`` and ``--memory-efficient-fp16`` (no flat copy) are left
    to fairseq. ``--amp`` (fp16 autocast and loss scaling, CUDA only) trained in fp32 on a CPU,
    with torch's "CUDA is not available" warnings only: now the same kind of error."""
    from fairseq.trainer import Trainer

    from .errors import ConfigError

    @replaces(Trainer, "_build_optimizer")
    def _build_optimizer(original, self):
        common = self.cfg.common
        if (common.fp16 and not common.memory_efficient_fp16 and not common.fp16_no_flatten_grads
                and not torch.cuda.is_available()):
            raise ConfigError("--fp16 trains on a CUDA GPU, and none is available; on a CPU use "
                              "--cpu-bf16 (bf16 products, fp32 weights) or --bf16")
        if common.amp and (common.cpu or not torch.cuda.is_available()):
            raise ConfigError("--amp is fp16 autocast on a CUDA GPU, and none is used here (it "
                              "would train in fp32); on a CPU use --cpu-bf16 (bf16 products, fp32 "
                              "weights) or --bf16")
        return original(self)


BF16_HELP = ("use bfloat16: the model in bf16 with fp32 master weights, as --fp16 without loss "
             "scaling, on CUDA or CPU (fairseq_s2s_attn; fairseq alone: implies --tpu); on a TPU "
             "machine (torch_xla installed) it implies --tpu as before")


def document_bf16_option() -> None:
    """fairseq's help says '--bf16: use bfloat16; implies --tpu', which is no longer what it does."""
    import types

    from fairseq.dataclass.configs import CommonConfig

    field = CommonConfig.__dataclass_fields__["bf16"]
    field.metadata = types.MappingProxyType({**field.metadata, "help": BF16_HELP})


def install() -> None:
    generate_in_one_autocast_region()
    bf16_without_tpu()
    fp16_needs_cuda()
    bf16_inference()
    document_bf16_option()
