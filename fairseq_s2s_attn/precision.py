"""bf16 mixed precision on CPU.

fairseq's ``--bf16`` assumes a TPU when combined with ``--cpu`` and crashes. With the model
option ``--cpu-bf16`` the encoder and decoder run under ``torch.autocast("cpu", bfloat16)``:
matrix products (and the RNN cells built on them) run in bf16, while parameters, gradients,
optimizer state, the softmax of attention and the loss stay fp32. On GPU, use fairseq's own
``--fp16`` / ``--bf16`` / ``--amp``; this option then does nothing.
"""

import contextlib

import torch


def cpu_autocast(enabled: bool, like: torch.Tensor):
    if enabled and like.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _all_cpu_bf16(generator) -> bool:
    models = getattr(getattr(generator, "model", None), "models", None)
    return bool(models) and all(getattr(getattr(m, "decoder", None), "cpu_bf16", False) for m in models)


def generate_in_one_autocast_region() -> None:
    """Beam search with ``--cpu-bf16`` models runs inside one autocast region.

    fairseq's SequenceGenerator calls the decoder once per target step. Autocast keeps its bf16
    copies of the weights only while the outermost autocast region is open, so a region opened
    per decoder call casts every weight (the output layer: vocabulary x dim) again at every step.
    One region around the whole search casts them once per batch; what runs in bf16 is the same.
    """
    from fairseq.sequence_generator import SequenceGenerator

    original = SequenceGenerator._generate
    if getattr(original, "_s2s_bf16", False):
        return

    def _generate(self, sample, *args, **kwargs):
        src = sample.get("net_input", {}).get("src_tokens") if isinstance(sample, dict) else None
        if src is None or not _all_cpu_bf16(self):
            return original(self, sample, *args, **kwargs)
        with cpu_autocast(True, src):
            return original(self, sample, *args, **kwargs)

    _generate._s2s_bf16 = True
    SequenceGenerator._generate = _generate


def install() -> None:
    generate_in_one_autocast_region()
