"""fairseq's Adam on the CPU in torch's fused kernel (``--optimizer adam``).

Which fairseq behaviour this changes, and why: without CUDA, ``--optimizer adam`` runs fairseq's
own ``fairseq.optim.adam.Adam`` (its FusedAdam needs CUDA and apex), a Python loop over the
parameters with seven tensor operations on each (two moment updates, sqrt, add, the weight
decay, addcdiv, ...), every one a pass over the parameter's memory: 21.8 ms a step for the
6.6 M parameters of the benchmark's sizes-256 models, on one core of an Intel Xeon with AMX
(2026-12-06), 3-7% of a --cpu-bf16 training update. torch's fused CPU Adam (``_fused_adamw_``,
torch >= 2.4) does the same in one pass: 7.5 ms. ``fused_adam_on_cpu`` gives it fairseq's step:

  m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2   (t: the step, from 1)
  p = p - lr wd p - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

torch's kernel computes p - lr wd p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps'),
which is the same with eps' = eps / sqrt(1 - b2^t), passed at every step (fairseq's decoupled
weight decay is the kernel's AdamW mode). Equal to fairseq's loop up to rounding. The state keeps
fairseq's layout (an int ``step``, ``exp_avg``, ``exp_avg_sq``): checkpoints are read and written
as before, and a run can resume with either. Steps where any parameter is not a contiguous fp32
CPU tensor with a dense fp32 gradient (CUDA, --memory-efficient-fp16/bf16's bf16 parameters) or
with amsgrad take fairseq's loop, unchanged.
"""

import math
from collections import defaultdict

import torch

from .patching import replaces

FUSED_ADAMW = getattr(torch, "_fused_adamw_", None)


def _fusable(p: torch.Tensor, grad: torch.Tensor) -> bool:
    return (p.device.type == "cpu" and p.dtype == torch.float32 and grad.dtype == torch.float32
            and not grad.is_sparse and p.is_contiguous() and grad.is_contiguous())


def fused_step(optimizer) -> bool:
    """fairseq's ``Adam.step`` (without closure) through the fused kernel, where every parameter
    with a gradient can take it; returns False (and changes nothing) where one cannot."""
    if FUSED_ADAMW is None:
        return False
    groups = []
    for group in optimizer.param_groups:
        if group.get("amsgrad", False):
            return False
        params = [p for p in group["params"] if p.grad is not None]
        if not all(_fusable(p, p.grad) for p in params):
            return False
        groups.append((group, params))
    for group, params in groups:
        beta1, beta2 = group["betas"]
        by_step = defaultdict(list)  # parameters at the same step share eps'
        for p in params:
            state = optimizer.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            else:  # as fairseq's loop: moments loaded from a checkpoint follow the parameter
                state["exp_avg"] = state["exp_avg"].to(p).contiguous()
                state["exp_avg_sq"] = state["exp_avg_sq"].to(p).contiguous()
            state["step"] += 1
            by_step[state["step"]].append(p)
        for step, ps in by_step.items():
            states = [optimizer.state[p] for p in ps]
            step_t = torch.tensor(float(step))
            FUSED_ADAMW(ps, [p.grad for p in ps], [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states], [], [step_t] * len(ps),
                        lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                        weight_decay=float(group["weight_decay"]),
                        eps=group["eps"] / math.sqrt(1 - beta2 ** step),
                        amsgrad=False, maximize=False)
    return True


def fused_adam_on_cpu() -> None:
    from fairseq.optim.adam import Adam

    @replaces(Adam, "step")
    def step(original, self, closure=None):
        if closure is not None:  # fairseq's trainer passes none; keep its order of work
            return original(self, closure)
        with torch.no_grad():
            if fused_step(self):
                return None
        return original(self)


def install() -> None:
    fused_adam_on_cpu()
