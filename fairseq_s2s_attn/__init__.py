"""fairseq-s2s-attn: vanilla, Bahdanau and Luong RNN encoder-decoders for fairseq.

Loaded by fairseq with ``--user-dir fairseq_s2s_attn`` (or by importing this package), which
registers the model ``rnn_s2s`` and its architectures, lets torch's safe checkpoint loader accept
the plain types fairseq checkpoints hold, and applies the run-time defaults in ``runtime``.
"""

from . import checkpoint, inputs, runtime
from . import model  # noqa: F401  (registers the model and architectures)
from .model import RNNS2SModel  # noqa: F401

checkpoint.install()
inputs.install()
runtime.install(RNNS2SModel)

__version__ = "0.1.0"
