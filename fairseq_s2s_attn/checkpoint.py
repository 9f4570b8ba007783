"""Safe checkpoint loading for fairseq on torch >= 2.6, and clear errors for bad checkpoints.

torch.load now defaults to ``weights_only=True``: it unpickles only tensors, plain containers and
allow-listed classes, so a checkpoint cannot run code when it is loaded. fairseq checkpoints of
legacy (argparse) models keep their options as ``argparse.Namespace``, which stock fairseq then
cannot load ("Unsupported global: argparse.Namespace"). We allow-list exactly the plain-data
types fairseq checkpoints hold and keep the safe loader on: we never pass ``weights_only=False``.

A checkpoint that needs anything else is refused with a message naming the file and the type.
"""

import argparse
import collections
import logging
import os
import pickle
import zipfile

import numpy as np
import torch

from .errors import CheckpointError

logger = logging.getLogger(__name__)


def _numpy_safe_globals():
    """numpy scalars/dtypes that fairseq may store for metrics (e.g. a numpy float 'best' score)."""
    found = []
    for modname in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(modname, fromlist=["scalar"])
            found.append(mod.scalar)
            break
        except (ImportError, AttributeError):
            continue
    found.append(np.dtype)
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        dtype_cls = getattr(getattr(np, "dtypes", None), name, None)
        if dtype_cls is not None:
            found.append(dtype_cls)
    return found


SAFE_GLOBALS = [argparse.Namespace, collections.OrderedDict, collections.defaultdict] + _numpy_safe_globals()


def allow_fairseq_checkpoints() -> None:
    """Adds the plain-data types of fairseq checkpoints to torch's safe-loading allow-list."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(SAFE_GLOBALS)


def safe_load(path: str):
    """torch.load with the safe unpickler, turning failures into messages a user can act on."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        detail = next((ln.strip() for ln in msg.splitlines() if "Unsupported global" in ln), msg[:300])
        raise CheckpointError(
            f"refusing to load {path}: it contains objects outside the safe allow-list of fairseq "
            f"checkpoint types, and unpickling them could run code ({detail}). "
            "Only load checkpoints you trust; this loader never disables torch's safe mode."
        ) from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'})"
        ) from None


def _patched_torch_load(original):
    """Wraps the ``torch.load`` that fairseq's checkpoint_utils calls, keeping weights_only=True."""

    def load(f, *args, **kwargs):
        if kwargs.get("weights_only") is False:
            raise CheckpointError("fairseq_s2s_attn: refusing torch.load(weights_only=False)")
        path = getattr(f, "name", f)
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            if hasattr(f, "close"):
                f.close()
            return safe_load(os.fspath(path))
        kwargs["weights_only"] = True
        return original(f, *args, **kwargs)

    load.__wrapped__ = original
    return load


class _TorchProxy:
    """``torch`` as seen by fairseq.checkpoint_utils, with the safe ``load`` above."""

    def __init__(self, torch_module):
        self._torch = torch_module
        self.load = _patched_torch_load(torch_module.load)

    def __getattr__(self, name):
        return getattr(self._torch, name)


def install() -> None:
    allow_fairseq_checkpoints()
    from fairseq import checkpoint_utils

    if not isinstance(checkpoint_utils.torch, _TorchProxy):
        checkpoint_utils.torch = _TorchProxy(checkpoint_utils.torch)
