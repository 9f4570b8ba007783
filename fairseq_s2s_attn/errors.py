"""Errors a user can act on. Uncaught, they print as one ``error:`` line (see runtime.py).

Under fairseq-hydra-train (or ``python -m fairseq_s2s_attn.hydra_train``) the job's exceptions
never reach that hook: hydra 1.3 (``hydra._internal.utils.run_and_report``) catches them and
prints a traceback of about 25 lines through fairseq, or, for its own compact errors, the
message alone. Ours are therefore compact hydra errors (hydra is one of fairseq's
dependencies), and inside a hydra job their message names hydra's keys
(``model.decoder_hidden_size`` for ``--decoder-hidden-size``, ``hydra_train.hydra_keys``).
"""

import sys

try:
    from hydra.errors import CompactHydraException as _Base
except ImportError:  # fairseq without hydra: plain exceptions
    _Base = Exception


class S2SError(_Base):
    """Base class: bad options, bad checkpoints, bad input."""

    def __init__(self, message: str = "", *args):
        # hydra prints it after the job ended; an error re-made from a pickle keeps one prefix
        if "hydra" in sys.modules and not message.startswith("error: ") and _in_hydra_job():
            from .hydra_train import hydra_keys
            message = f"error: {hydra_keys(message)}"
        super().__init__(message, *args)


def _in_hydra_job() -> bool:
    from hydra.core.hydra_config import HydraConfig
    return HydraConfig.initialized()


class ConfigError(S2SError, ValueError):
    """Options that are invalid or cannot work together."""


class CheckpointError(S2SError, RuntimeError):
    """A checkpoint that cannot be loaded safely or at all."""
