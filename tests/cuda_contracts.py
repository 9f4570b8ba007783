"""The CUDA RNN-cell kernels' argument checks, enforced on CPU.

CI has no GPU, and the CPU kernels accept arguments that the CUDA kernels refuse: on CUDA,
``torch.lstm_cell``/``torch.gru_cell`` run the fused kernels ``_thnn_fused_lstm_cell`` /
``_thnn_fused_gru_cell``, which take 1-D biases only (a B x 4H "bias" dies with "Expected
1-dimensional tensor, but got 2-dimensional tensor for argument #3 'input_bias'"); the CPU
kernels broadcast anything. ``enforce(monkeypatch)`` makes a CPU run as strict as a CUDA run:

- ``torch.lstm_cell`` / ``torch.gru_cell`` check their arguments as the CUDA path does, then run;
- the decoder takes its CUDA branch (``use_fused_cells`` -> True) and the fused kernels, which
  exist on CUDA only, are replaced by references that check what the CUDA kernels check
  (aten/src/ATen/native/cuda/RNN.cu, ``checkSizes``: 2-D gates of one size, the state 2-D with
  B x gates/factor elements, biases 1-D of the gates' width or none; one dtype and device for all,
  as the kernel is dispatched on the gates' dtype) and compute the cell in the gates' dtype.

``HostReads`` finds the other thing a CPU run hides: reading a tensor's values on the host
(``.item()``, ``bool()``, ``torch.equal``, ``nonzero``, ...), free on CPU, makes the host wait for
the GPU.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fairseq_s2s_attn import decoder as decoder_module


class CudaContractError(RuntimeError):
    pass


def _require(ok: bool, op: str, what: str):
    if not ok:
        raise CudaContractError(f"{op}: {what} (the CUDA kernel refuses this)")


def check_fused(op, igates, hgates, state, input_bias, hidden_bias, factor):
    _require(igates.dim() == 2, op, f"input_gates must be 2-D, got {igates.dim()}-D")
    _require(hgates.shape == igates.shape, op,
             f"hidden_gates {tuple(hgates.shape)} != input_gates {tuple(igates.shape)}")
    width = igates.size(1)
    _require(width % factor == 0, op, f"gates width {width} not a multiple of {factor}")
    _require(state.dim() == 2 and state.numel() == igates.size(0) * width // factor, op,
             f"state {tuple(state.shape)} does not match gates {tuple(igates.shape)}")
    for name, bias in (("input_bias", input_bias), ("hidden_bias", hidden_bias)):
        if bias is not None:
            _require(bias.dim() == 1, op, f"Expected 1-dimensional tensor, but got "
                     f"{bias.dim()}-dimensional tensor for argument '{name}'")
            _require(bias.numel() == width, op, f"{name} has {bias.numel()} elements, gates {width}")
    tensors = [t for t in (igates, hgates, state, input_bias, hidden_bias) if t is not None]
    dtypes = {t.dtype for t in tensors}
    _require(len(dtypes) == 1, op, f"mixed dtypes {sorted(map(str, dtypes))}")
    _require(len({t.device for t in tensors}) == 1, op, "tensors on different devices")


def _biased(igates, hgates, input_bias, hidden_bias):
    if input_bias is not None:
        igates = igates + input_bias
    if hidden_bias is not None:
        hgates = hgates + hidden_bias
    return igates, hgates


def fused_lstm_cell(igates, hgates, cx, input_bias=None, hidden_bias=None):
    """Checks and semantics of CUDA's _thnn_fused_lstm_cell: (hy, cy, workspace)."""
    check_fused("_thnn_fused_lstm_cell", igates, hgates, cx, input_bias, hidden_bias, 4)
    igates, hgates = _biased(igates, hgates, input_bias, hidden_bias)
    i, f, g, o = (igates + hgates).chunk(4, dim=1)
    cy = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cy), cy, igates.new_empty(0)


def fused_gru_cell(igates, hgates, hx, input_bias=None, hidden_bias=None):
    """Checks and semantics of CUDA's _thnn_fused_gru_cell: (hy, workspace)."""
    check_fused("_thnn_fused_gru_cell", igates, hgates, hx, input_bias, hidden_bias, 3)
    igates, hgates = _biased(igates, hgates, input_bias, hidden_bias)
    i_r, i_z, i_n = igates.chunk(3, dim=1)
    h_r, h_z, h_n = hgates.chunk(3, dim=1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (hx - n), igates.new_empty(0)


def check_cell_call(op, x, h, w_ih, w_hh, b_ih, b_hh):
    """torch.lstm_cell/gru_cell on CUDA: 2-D input and state, 2-D weights, 1-D biases."""
    _require(x.dim() == 2 and h.dim() == 2, op, "input and state must be 2-D")
    _require(w_ih.dim() == 2 and w_hh.dim() == 2, op, "weights must be 2-D")
    for name, bias in (("input_bias", b_ih), ("hidden_bias", b_hh)):
        if bias is not None:
            _require(bias.dim() == 1, op, f"Expected 1-dimensional tensor, but got "
                     f"{bias.dim()}-dimensional tensor for argument '{name}'")


def enforce(monkeypatch) -> dict:
    """Apply the CUDA contracts for the rest of a test; returns call counts of the fused kernels."""
    calls = {"lstm": 0, "gru": 0}
    lstm_cell, gru_cell = torch.lstm_cell, torch.gru_cell

    def strict_lstm_cell(x, hx, w_ih, w_hh, b_ih=None, b_hh=None):
        check_cell_call("lstm_cell", x, hx[0], w_ih, w_hh, b_ih, b_hh)
        return lstm_cell(x, hx, w_ih, w_hh, b_ih, b_hh)

    def strict_gru_cell(x, hx, w_ih, w_hh, b_ih=None, b_hh=None):
        check_cell_call("gru_cell", x, hx, w_ih, w_hh, b_ih, b_hh)
        return gru_cell(x, hx, w_ih, w_hh, b_ih, b_hh)

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "lstm_cell", strict_lstm_cell)
    monkeypatch.setattr(torch, "gru_cell", strict_gru_cell)
    monkeypatch.setattr(decoder_module, "use_fused_cells", lambda like: True)
    monkeypatch.setattr(decoder_module, "FUSED_LSTM_CELL", counted("lstm", fused_lstm_cell))
    monkeypatch.setattr(decoder_module, "FUSED_GRU_CELL", counted("gru", fused_gru_cell))
    return calls


# operators that read a tensor's values on the host: on a GPU each waits for the device to finish
# what was queued before it (a host synchronisation). CPU tensors show them all to a dispatch
# mode except ``tolist``/``numpy`` (no operator), which ``HostReads`` wraps itself.
HOST_READ_OPS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "allclose",
                 "unique_consecutive", "_unique2", "unique_dim", "repeat_interleave"}


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values made inside functions wrapped with ``watch``.

    A bool-mask index (``x[mask]``, its size read on the host) counts too; a
    ``repeat_interleave`` whose output size is given does not (CUDA needs no read then)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.depth, self.reads = 0, []
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._host_call(name, original))

    def _host_call(self, name, original):
        def call(tensor, *args, **kwargs):
            if self.depth:
                self.reads.append(name)
            return original(tensor, *args, **kwargs)
        return call

    def watch(self, fn, label):
        def watched(*args, **kwargs):
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        watched.__name__ = label
        return watched

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:
            name = func._schema.name.split("::")[-1]
            reads = name in HOST_READ_OPS and not (name == "repeat_interleave"
                                                   and kwargs.get("output_size") is not None)
            if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                       for i in (args[1] if len(args) > 1 else ())):
                reads = True
            if reads:
                self.reads.append(name)
        return func(*args, **kwargs)
