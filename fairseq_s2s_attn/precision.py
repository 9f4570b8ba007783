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
