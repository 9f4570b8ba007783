"""Element-wise work fused into single loops by torch.compile's inductor backend, on CPU.

Eager torch runs a chain of element-wise operations as one pass over memory per operation;
inductor compiles the chain, and a reduction that ends it, into one C++ loop. The plugin uses it
for the additive score (``attention.AdditiveScore``), whose element-wise work over B x S x A
values is the largest of Bahdanau's decoder step: its forward was four passes (add, sigmoid,
subtract, product with v), its backward seven or more. Where the plugin's own C loops are built
(``native.additive_score``: fp32 CPU operands in a step's or beam search's layout) they run
instead, faster still and in decoding too; this path remains for the rest (other layouts, the C
loops off).

Training only: fairseq-generate of the demo's test set (1,000 sentences, beam 5, batch 32) took
10.7 s with the score compiled against 7.8 s eager, its ~3 s of compilation and loading at the
start more than the loop saves in a run that short (in a warm process beam search gained
1.14x at batch 32, 1.02x at batch 16, nothing at beam 1).

A function is compiled at its first call (dynamic shapes: one kernel for all batch and sentence
sizes; a C++ compiler is needed at run time) and the kernel is kept in inductor's on-disk cache
for later processes. If compilation fails (no compiler, an unsupported platform), the failure is
logged once and every later call returns None, for the caller's eager path. S2S_FUSED=0 in the
environment keeps the eager path from the start (nothing compiled).
"""

import logging
import os
from typing import Callable, Optional

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# tests and scripts/train_ab.py set it to False for the eager path
ENABLED = os.environ.get("S2S_FUSED", "1") != "0"
# below this many values per call the eager path is faster: a compiled call pays ~20 us of
# guard checks and wrapper code (one forward and one backward call per decoder step over the
# B x S x A values: at B 16, S 20, A 256, 84 against 79 us eager; at B 32, S 40, 206 against
# 280 us; one thread of an Intel Xeon with AMX, torch 2.13)
MIN_ELEMENTS = 1 << 17


class Fused:
    """fn compiled by inductor at its first call; ``__call__`` returns None where the caller
    should run its eager path: switched off, not a CPU fp32 input, under another compilation
    (``--compile-step`` traces the eager path into its own graph) or compilation failed."""

    failure: Optional[str] = None  # the first failure, for every Fused: the cause is the same

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled: Optional[Callable] = None

    def usable(self, like: Tensor, elements: int) -> bool:
        return (ENABLED and Fused.failure is None and like.device.type == "cpu"
                and like.dtype == torch.float32 and elements >= MIN_ELEMENTS
                and not torch.compiler.is_compiling())

    def __call__(self, *args, **kwargs):
        from torch._dynamo.exc import BackendCompilerFailed  # inductor's errors derive from it

        try:
            if self.compiled is None:
                _check_compiler()
                self.compiled = torch.compile(self.fn, dynamic=True)
            return self.compiled(*args, **kwargs)
        except (BackendCompilerFailed, _CompilerMissing) as exc:  # the eager path from now on
            lines = str(exc).strip().splitlines()
            Fused.failure = lines[0][:300] if lines else type(exc).__name__
            logger.warning(f"the fused CPU kernels are off, their compilation failed "
                           f"({Fused.failure}); running the eager operations instead")
            return None


class _CompilerMissing(RuntimeError):
    pass


def _check_compiler() -> None:
    """Raises _CompilerMissing without a C++ compiler that inductor can use, before inductor
    tries one: its own failure, later, logs a multi-line CRITICAL record of the kernel it could
    not build before raising."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler, or no inductor on this platform
        raise _CompilerMissing(f"{type(exc).__name__}: {exc}") from exc
