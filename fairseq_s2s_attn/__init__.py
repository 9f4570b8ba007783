"""fairseq-s2s-attn: vanilla, Bahdanau and Luong RNN encoder-decoders for fairseq.

Loaded by fairseq with ``--user-dir fairseq_s2s_attn`` (or by importing this package), which
registers the model ``rnn_s2s`` and its architectures and the criterions ``fused_cross_entropy``
and ``fused_label_smoothed_cross_entropy`` (``criterion``: fairseq's losses with the output layer
fused in), lets torch's safe checkpoint loader accept the plain types fairseq checkpoints hold,
makes fairseq's data-parallel training work on CPU processes (``distributed``, see
docs/distributed.md), defines what happens to empty and too-long sources (``inputs``), runs
fairseq's Adam on the CPU in torch's fused kernel (``optim``), runs beam search of ``--cpu-bf16``
models in one autocast region (``precision``), takes beam search's candidates in one C
loop on a CPU and lets diverse beam search run on every batch (``search``), fuses a language
model (``--lm-path``) in every command (``fusion``), makes
``--replace-unk`` replace through the attention (``unk``), and applies the run-time defaults in ``runtime``.
Each change to a fairseq function is installed by ``patching.replaces``.
"""

from . import runtime

with runtime.fairseq_leaves_logging_alone():  # fairseq's imports set the root logger to DEBUG
    from . import checkpoint, criterion, distributed, fusion, inputs, optim, precision, search, unk  # noqa: F401
    from . import model  # noqa: F401  (registers the model and architectures)
    from .model import RNNS2SModel  # noqa: F401

checkpoint.install()
distributed.install()
fusion.install()  # inside inputs' checks of the generation options
inputs.install()
unk.install()
optim.install()
precision.install()
search.install()
runtime.install(RNNS2SModel)

__version__ = "0.1.0"
