"""One RNN decoder for the whole family: vanilla, Bahdanau (attention before the RNN step) and
Luong (attention after the RNN step, optional input feeding).

Per target step i, with previous word embedding E y_{i-1} and top-layer state s:

  none   (Cho et al. 2014):  s_i = RNN([E y_{i-1}; c], s_{i-1}),    c fixed (encoder summary)
                             t_i = R(W_o [s; c; E y_{i-1}])
  before (Bahdanau et al.):  c_i = Attn(query=s_{i-1});   s_i = RNN([E y_{i-1}; c_i], s_{i-1})
                             t_i = R(W_o [s; c_i; E y_{i-1}])
  after  (Luong et al.):     h_t = RNN([E y_{t-1}; h~_{t-1}] if input feeding else E y_{t-1})
                             c_t = Attn(query=h_t);    h~_t = tanh(W_c [h_t; c_t])   (eq. 5)
  p(y_i | ...) = softmax(W_out t_i)

In the readout, s is s_i (``readout_state`` current) or s_{i-1} (previous, RNNsearch) and R is
tanh or maxout (Bahdanau's deep output, Appendix A.2.2: t_i = [max(t~_{2j-1}, t~_{2j})]_j).

The attention ``keys`` (e.g. U h_j of the additive score) are computed once per sentence and kept
in the incremental state, with the target step (local-m's p_t = t) and the coverage vector
(sum of previous attention weights). In beam search a sentence's source side (encoder outputs,
keys) serves all its hypotheses: they come in consecutive runs of one source row (see
RNNEncoder.reorder_encoder_out), and attention scores each row once for its run. Without a
step-to-step dependency outside the RNN (vanilla, and Luong without input feeding or coverage)
the RNN runs over the whole target in one call and attention is batched over all steps;
otherwise the decoder loops over steps.
"""

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from fairseq.models import FairseqIncrementalDecoder

from .attention import AdditiveScorer, Attention, fp32_context
from .dropout import Dropout
from .encoder import RNN_TYPES, rows_holding
from . import native, stepgrad
from .packed import Linear, linear
from .precision import (cast_for_products, cpu_autocast, over_positions, padded_rows_linear,
                        runs_cpu_bf16)

PLACEMENTS = ("none", "before", "after")
# the scores that are a product of the query with the keys (attention._bdot)
PRODUCT_SCORES = ("dot", "general")
DECODER_INITS = ("zeros", "final", "bridge", "backward_first")
READOUTS = ("tanh", "maxout")
READOUT_STATES = ("current", "previous")

State = Dict[str, Optional[Tensor]]


class StateInit(nn.Module):
    """Decoder initial state from an encoder state (one per layer).

    zeros:  s_0 = 0
    final:  s_0 = h_final (the encoder's last state), through a linear map when the sizes differ
    bridge: s_0 = tanh(W h_final + b)
    backward_first: s_0 = tanh(W_s h<-_1 + b) (Bahdanau et al., Appendix A.2.2; the paper omits
            biases from its equations), h<-_1 the right-to-left direction's state at the first
            source word; the caller passes that state, of size encoder_dim
    """

    def __init__(self, mode: str, encoder_dim: int, decoder_dim: int):
        super().__init__()
        self.mode = mode
        self.proj: Optional[nn.Linear] = None
        if mode in ("bridge", "backward_first") or (mode == "final" and encoder_dim != decoder_dim):
            self.proj = nn.Linear(encoder_dim, decoder_dim)

    def forward(self, final: Optional[Tensor], num_layers: int, shape: Tuple[int, int], like: Tensor):
        bsz, dim = shape
        if self.mode == "backward_first" and final is None:
            raise ValueError("decoder init backward_first needs a right-to-left encoder direction "
                             "(a bidirectional encoder, or --reverse-source)")
        if self.mode == "zeros" or final is None:
            return like.new_zeros(num_layers, bsz, dim)
        if final.size(0) != num_layers:  # different depths: every layer starts from the top one
            final = final[-1:].expand(num_layers, -1, -1)
        if self.proj is not None:
            final = self.proj(final)
        return final.contiguous() if self.mode == "final" else torch.tanh(final)


# The element-wise half of an LSTM/GRU step, from the two gate pre-activations. On CUDA it is one
# fused kernel (the one nn.LSTMCell/torch.lstm_cell use there); these kernels exist for CUDA only
# and check their arguments strictly: 2-D gates of one size and dtype, 1-D biases or none.
# Elsewhere the same formulas run as tensor operations. Tests replace the two names below with
# CPU references that enforce the CUDA kernels' checks, so CI (no GPU) runs the CUDA branch.
FUSED_LSTM_CELL = torch.ops.aten._thnn_fused_lstm_cell
FUSED_GRU_CELL = torch.ops.aten._thnn_fused_gru_cell


def use_fused_cells(like: Tensor) -> bool:
    """Whether the fused CUDA cell kernels run the step of a tensor on this device."""
    return like.is_cuda


def lstm_from_gates(igates: Tensor, hgates: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """LSTM cell from its gate pre-activations (PyTorch's gate order i, f, g, o):

      i, f, g, o = split(igates + hgates);  c' = s(f) * c + s(i) * tanh(g);  h' = s(o) * tanh(c')

    igates = W_i x + b (B x 4H), hgates = W_h h (+ b_h) (B x 4H), c: B x H -> (h', c'), B x H each.
    """
    c = c.to(igates.dtype)
    if use_fused_cells(igates):
        h, c, _workspace = FUSED_LSTM_CELL(igates, hgates, c)
        return h, c
    if native.usable(igates, hgates, c):  # CPU: one C loop each way
        return native.lstm_cell(igates, hgates, c)
    i, f, g, o = (igates + hgates).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def stack(tensors: List[Tensor], dim: int) -> Tensor:
    """torch.stack; for one tensor (a single step: incremental decoding, one layer) the same
    values as a view, without stack's copy (about 3 us a call at beam 5, five calls a step)."""
    return tensors[0].unsqueeze(dim) if len(tensors) == 1 else torch.stack(tensors, dim)


def gru_from_gates(igates: Tensor, hgates: Tensor, h: Tensor) -> Tensor:
    """GRU cell from its gate pre-activations (Cho et al. 2014; PyTorch's order r, z, n):

      r = s(i_r + h_r);  z = s(i_z + h_z);  n = tanh(i_n + r * h_n);  h' = (1 - z) * n + z * h

    igates = W_i x + b_i (B x 3H), hgates = W_h h + b_h (B x 3H: b_h stays inside r * (...)).
    This is PyTorch's (and cuDNN's) GRU, which every path here must equal (nn.GRU runs the
    encoder and the whole-sequence decoders). Cho et al. (2014, eq. 8) and Bahdanau et al.
    (2014, A.1.1) apply the reset gate before the product, n = tanh(W x + U (r * h)): for the
    same weights a different function of the same family.
    """
    h = h.to(igates.dtype)
    if use_fused_cells(igates):
        return FUSED_GRU_CELL(igates, hgates, h)[0]
    if native.usable(igates, hgates, h):  # CPU: one C loop each way
        return native.gru_cell(igates, hgates, h)
    i_r, i_z, i_n = igates.chunk(3, dim=1)
    h_r, h_z, h_n = hgates.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


class StackedCell:
    """Steps a multi-layer ``nn.LSTM``/``nn.GRU`` one time step at a time with its own weights.

    The first layer's input is [E y; x] (x: the context or the fed-back h~). Over many steps
    (teacher forcing), its embedding part W_e E y (+ biases) does not depend on the previous step,
    so ``embedding_part`` computes it for all steps in one product and ``step`` adds W_x x and the
    recurrent part. For a single step (incremental decoding) ``step`` takes the whole input
    [E y; x] in one product instead. Equal to running the module itself step by step (dropout
    between layers as nn.LSTM applies it).
    """

    def __init__(self, rnn: nn.RNNBase, embed_dim: int, dropout: nn.Module):
        self.lstm = isinstance(rnn, nn.LSTM)
        self.layers = rnn.num_layers
        self.dropout = dropout
        self.embed_dim = embed_dim
        self.w_ih = [getattr(rnn, f"weight_ih_l{k}") for k in range(self.layers)]
        self.w_hh = [getattr(rnn, f"weight_hh_l{k}") for k in range(self.layers)]
        self.b_ih = [getattr(rnn, f"bias_ih_l{k}") for k in range(self.layers)]
        self.b_hh = [getattr(rnn, f"bias_hh_l{k}") for k in range(self.layers)]
        self.w_x: Optional[Tensor] = None

    def embedding_part(self, emb: Tensor) -> Tensor:
        """W_e E y + b for all steps: T x B x E -> T x B x G (G = 4H for LSTM, 3H for GRU)."""
        w_x = self.w_ih[0][:, self.embed_dim:]
        if torch.is_autocast_enabled(emb.device.type):
            # autocast re-casts (and keeps for backward) a non-parameter weight at every step
            w_x = w_x.to(torch.get_autocast_dtype(emb.device.type))
        self.w_x = w_x.contiguous()
        stepgrad.add(self.w_x)  # within a step loop: W_x's gradient once per batch
        bias = self.b_ih[0] + self.b_hh[0] if self.lstm else self.b_ih[0]
        return padded_rows_linear(emb, self.w_ih[0][:, :self.embed_dim], bias)

    def step(self, x: Tensor, hs: List[Tensor], cs: Optional[List[Tensor]], pre: Optional[Tensor] = None):
        """One time step through all layers; returns the new per-layer (h, c) lists.

        x: B x X, the part of the first layer's input after the embedding (X may be 0) when
        ``pre`` (B x G, from ``embedding_part``) is given, else the whole input [E y; x].
        hs/cs: per-layer B x H. Per layer: two matrix products (input, recurrent) and the
        element-wise cell (one fused kernel on CUDA); the biases are 1-D or folded into ``pre``.
        """
        new_h, new_c = [], []
        for k in range(self.layers):
            if k > 0:
                igates = linear(self.dropout(new_h[-1]), self.w_ih[k], self.b_ih[k])
            elif pre is not None:  # W_e E y + biases came with pre: add W_x x
                igates = stepgrad.addmm(pre, x, self.w_x)
            else:
                igates = linear(x, self.w_ih[0], self.b_ih[0])
            # the recurrent bias: folded into pre for an LSTM; a GRU keeps it inside r * (...)
            b_hh = None if (k == 0 and pre is not None and self.lstm) else self.b_hh[k]
            hgates = linear(hs[k], self.w_hh[k], b_hh)
            if self.lstm:
                h, c = lstm_from_gates(igates, hgates, cs[k])
                new_c.append(c)
            else:
                h = gru_from_gates(igates, hgates, hs[k])
            new_h.append(h)
        return new_h, (new_c if self.lstm else None)


class RNNDecoder(FairseqIncrementalDecoder):
    def __init__(
        self,
        dictionary,
        embed_tokens: nn.Embedding,
        hidden_size: int,
        num_layers: int,
        encoder_output_dim: int,
        rnn_type: str = "lstm",
        attention: str = "additive",
        attention_placement: str = "before",
        attention_dim: int = 256,
        input_feeding: bool = True,
        out_embed_dim: int = 256,
        dropout_in: float = 0.0,
        dropout_out: float = 0.0,
        init: str = "final",
        share_input_output_embed: bool = False,
        max_target_positions: int = 100000,
        cpu_bf16: bool = False,
        attention_mode: str = "global",
        local_window: int = 10,
        attention_scale: bool = False,
        attention_normalize: bool = False,
        coverage: bool = False,
        readout: str = "tanh",
        maxout_dim: int = 0,
        readout_state: str = "current",
        encoder_direction_dim: Optional[int] = None,
        max_source_positions: int = 1024,
        compile_step: bool = False,
        cpu_int8: bool = False,
    ):
        super().__init__(dictionary)
        self.cpu_bf16 = cpu_bf16
        self.cpu_int8 = cpu_int8  # decoding only: RNNS2SModel.prepare_for_inference_, int8.py
        self.compile_step = compile_step
        # whether forward returns the attention outside training; see make_generation_fast_
        self.need_attn = True
        if attention_placement not in PLACEMENTS:
            raise ValueError(f"attention placement {attention_placement!r}; choose one of {PLACEMENTS}")
        if init not in DECODER_INITS:
            raise ValueError(f"decoder init {init!r}; choose one of {DECODER_INITS}")
        if readout not in READOUTS:
            raise ValueError(f"readout {readout!r}; choose one of {READOUTS}")
        if readout_state not in READOUT_STATES:
            raise ValueError(f"readout state {readout_state!r}; choose one of {READOUT_STATES}")
        if attention_placement == "after" and (readout != "tanh" or readout_state != "current"):
            raise ValueError("with attention after the RNN step the readout is Luong's "
                             "h~_t = tanh(W_c [h_t; c_t]): readout tanh, readout state current")
        if attention_placement == "none" and (coverage or attention_mode != "global"):
            raise ValueError("coverage and local attention need attention (placement before/after)")
        self.placement = attention_placement
        self.input_feeding = input_feeding and attention_placement == "after"
        self.coverage = coverage
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.rnn_type = rnn_type
        self.maxout = readout == "maxout"
        self.readout_previous = readout_state == "previous"
        if self.maxout and maxout_dim:
            out_embed_dim = maxout_dim
        self.out_embed_dim = out_embed_dim
        self.max_target_positions = max_target_positions
        self.embed_tokens = embed_tokens
        embed_dim = embed_tokens.embedding_dim
        self.dropout_in = Dropout(dropout_in, module_name=self.__class__.__name__)
        self.dropout_out = Dropout(dropout_out, module_name=self.__class__.__name__)

        # vanilla and Bahdanau feed the context into the RNN; Luong may feed the last h~ instead
        rnn_input = embed_dim
        if attention_placement in ("none", "before"):
            rnn_input += encoder_output_dim
        if self.input_feeding:
            rnn_input += out_embed_dim
        self.rnn = RNN_TYPES[rnn_type](
            input_size=rnn_input,
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout_out if num_layers > 1 else 0.0,
        )
        self.attention = (
            None
            if attention_placement == "none"
            else Attention(attention, hidden_size, encoder_output_dim, attention_dim,
                           mode=attention_mode, window=local_window, scale=attention_scale,
                           normalize=attention_normalize, coverage=coverage,
                           max_positions=max_source_positions)
        )
        # readout: [s; c] (Luong eq. 5), plus E y_{i-1} for vanilla/Bahdanau (their deep output);
        # maxout: 2 linear pieces per unit (U_o, V_o, C_o of Bahdanau A.2.2 in one matrix)
        self.readout_uses_embedding = attention_placement != "after"
        readout_in = hidden_size + encoder_output_dim + (embed_dim if self.readout_uses_embedding else 0)
        self.readout = Linear(readout_in, out_embed_dim * (2 if self.maxout else 1),
                              bias=attention_placement != "after")
        self.init_from = "backward_first" if init == "backward_first" else "final"
        init_dim = encoder_output_dim
        if init == "backward_first":
            if encoder_direction_dim is None:
                raise ValueError("decoder init backward_first needs the encoder's per-direction size")
            init_dim = encoder_direction_dim
        self.init_hidden = StateInit(init, init_dim, hidden_size)
        self.init_cell = StateInit(init, init_dim, hidden_size) if rnn_type == "lstm" else None

        self.share_input_output_embed = share_input_output_embed
        if share_input_output_embed:
            if out_embed_dim != embed_dim:
                raise ValueError(
                    f"sharing decoder input and output embeddings needs decoder_out_embed_dim "
                    f"({out_embed_dim}) == decoder_embed_dim ({embed_dim})"
                )
            self.fc_out = None
        else:
            self.fc_out = Linear(out_embed_dim, len(dictionary))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        prev_output_tokens: Tensor,
        encoder_out: Optional[Dict[str, Optional[Tensor]]] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        features_only: bool = False,
        **unused,
    ):
        with cpu_autocast(runs_cpu_bf16(self), prev_output_tokens):
            x, attn = self.extract_features(prev_output_tokens, encoder_out, incremental_state)
            if not features_only:
                x = self.output_layer(x)
        if not self.training and not self.need_attn:
            attn = None
        return x, {"attn": [attn]}

    def make_generation_fast_(self, need_attn: bool = False, **kwargs):
        """fairseq-generate, fairseq-interactive and the hub (``prepare_for_inference_``) ask for
        the attention only with --print-alignment, as fairseq's LSTMDecoder does. Without it the
        search keeps no attention: fairseq's SequenceGenerator otherwise fills a
        (B * beam) x S x max_len buffer and reorders it (index_select up to the current step)
        at every step. The context is computed the same way either way."""
        self.need_attn = need_attn

    def extract_features(
        self,
        prev_output_tokens: Tensor,
        encoder_out: Dict[str, Optional[Tensor]],
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Returns features B x T x out_embed_dim and attention B x T x S (None for vanilla)."""
        cached = self._get_cache(incremental_state)
        if cached is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
        # one row per source sentence; in beam search each serves `groups` consecutive hypotheses
        # (RNNEncoder.reorder_encoder_out): the source side is kept and used once per sentence
        padding_mask = encoder_out["encoder_padding_mask"]  # B x S
        groups = prev_output_tokens.size(0) // padding_mask.size(0)
        src_ids = encoder_out.get("src_ids")
        if cached is None or cached.get("src_ids") is None or src_ids is None:
            state = self.initial_state(encoder_out, groups) if cached is None else cached
            # B x S x C, cast once for the products of every step (kept in the incremental state)
            values = cast_for_products(encoder_out["encoder_out"].transpose(0, 1))
            keys = self.attention.keys(values, padding_mask) if self.attention is not None else None
            if self.attention is not None and fp32_context(values):
                values = values.float()  # the context's per-step products in fp32 (once per batch)
        else:
            state = cached
            keys, values = self._follow_source_rows(cached, src_ids)
            if values is None:
                values = encoder_out["encoder_out"].transpose(0, 1)

        emb = self.dropout_in(self.embed_tokens(prev_output_tokens))
        emb = cast_for_products(emb).transpose(0, 1)  # T x B x E
        if self.placement == "none":
            fixed = cast_for_products(self._summary(encoder_out))  # B x C
            if groups > 1:
                fixed = fixed.repeat_interleave(groups, dim=0)  # (B * groups) x C
        else:
            fixed = None

        if self.placement == "before" or self.input_feeding or self.coverage:
            x, attn, state = self.run_steps(emb, state, keys, values, padding_mask)
        else:
            x, attn, state = self.run_parallel(emb, state, keys, values, padding_mask, fixed)

        if incremental_state is not None:
            state["keys"] = keys
            state["src_ids"] = src_ids
            # the cast copy only; without a cast the encoder output is read again at every step
            state["values"] = values if values.dtype != encoder_out["encoder_out"].dtype else None
            self.set_incremental_state(incremental_state, "state", state)
        return x, attn

    def run_steps(
        self, emb: Tensor, state: State, keys: Optional[Tensor], values: Tensor, padding_mask: Tensor
    ) -> Tuple[Tensor, Tensor, State]:
        """Step loop for decoders with a step-to-step dependency outside the RNN (Bahdanau, input
        feeding, coverage). emb: T x B x E.

        Work that does not depend on the previous step is hoisted out of the loop: the embedding
        part of the first layer's input product (for all steps in one matrix product) and, for
        Bahdanau, the readout. Returns (t: B x T x O, attention: B x T x S, final state).
        """
        cell = StackedCell(self.rnn, emb.size(-1), self.dropout_out)
        steps = emb.unbind(0)  # T x (B x E)
        # more steps: pre = the embedding part for all steps (made within the loop below), unbound
        # once (indexing pre[t] would make backward fill a T x B x G zero tensor per step); one
        # step (incremental decoding): one input product over [E y; x] is cheaper
        pre: List[Optional[Tensor]] = [None]
        hs = list(state["h"].unbind(0))
        cs = list(state["c"].unbind(0)) if state["c"] is not None else None
        feed = state.get("feed")
        if feed is None:  # Luong without input feeding: the RNN's input is E y_{t-1} alone
            feed = emb.new_zeros(emb.size(1), 0)
        cov, step = state.get("cov"), state["step"]  # B x S, B
        outs, contexts, attns = [], [], []
        # compiled in training only: a single incremental step gains nothing from it on CPU
        compiled = self.compile_step and self.training
        step_fn = self._compiled_step() if compiled else self._step
        # CPU training: the per-step weights' gradients once per batch (stepgrad.py), and the
        # source side's (keys, values) where the score is a product with the keys (dot,
        # general: rnn_luong 1.06-1.09x an update). Not for the additive and location scores:
        # there only the values' would be, 1.01x for rnn_bahdanau (within the noise), and that
        # sum in another order moved the demo's BLEU as another seed does (BENCHMARKS.md)
        sources = (keys, values) if self.attention is not None and \
            self.attention.score_name in PRODUCT_SCORES else ()
        loop = stepgrad.step_loop(self.step_weights(), emb, sources) \
            if len(steps) > 1 and not compiled else contextlib.nullcontext()
        with loop:
            if len(steps) > 1:
                pre = list(cell.embedding_part(emb).unbind(0))  # T x (B x G)
            for t in range(emb.size(0)):
                hs, cs, feed, cov, out, context, attn = step_fn(
                    cell, steps[t], pre[t], hs, cs, feed, cov, step + t if t else step, keys,
                    values, padding_mask)
                outs.append(out)
                if context is not None:
                    contexts.append(context)
                attns.append(attn)
        if self.placement == "before":  # t_i = R(W_o [s; c_i; E y_{i-1}]) for all i at once
            h = self.dropout_out(stack(outs, dim=1))  # B x T x H
            parts = [h, stack(contexts, dim=1), emb.transpose(0, 1)]
            readout = over_positions(self.readout, torch.cat(parts, dim=-1))  # B x T x O'
            x = self.dropout_out(self._activate(readout))
        else:
            x = stack(outs, dim=1)  # B x T x O
        new_state: State = {
            "h": stack(hs, dim=0),
            "c": stack(cs, dim=0) if cs is not None else None,
            "feed": feed if self.input_feeding else None,
            "step": step + emb.size(0),
            "cov": cov,
        }
        return x, stack(attns, dim=1), new_state

    def _step(self, cell: "StackedCell", emb: Tensor, pre: Optional[Tensor], hs: List[Tensor],
              cs: Optional[List[Tensor]], feed: Tensor, cov: Optional[Tensor], step: Tensor,
              keys: Tensor, values: Tensor, padding_mask: Tensor):
        """One target step of ``run_steps``. emb: B x E; pre: B x G or None; hs/cs: per-layer
        B x H; feed: B x O (h~_{t-1}) or B x 0; cov: B x S or None; step: B (target position).
        Returns (hs, cs, feed, cov, output B x H or B x O, context B x C or None, attention B x S)."""
        context = None
        if self.placement == "before":
            # Bahdanau eq. (5)-(6): score with the previous state s_{i-1}; c_i enters the RNN
            s_prev = hs[-1]
            context, attn = self.attention(s_prev, keys, values, padding_mask, step, cov)
            hs, cs = cell.step(self._cell_input(context, emb, pre), hs, cs, pre)
            out = s_prev if self.readout_previous else hs[-1]
        else:
            # Luong sec. 3.3: input feeding concatenates h~_{t-1} with the input
            hs, cs = cell.step(self._cell_input(feed, emb, pre), hs, cs, pre)
            h = self.dropout_out(hs[-1])
            attention_out, attn = self.attention(h, keys, values, padding_mask, step, cov)
            out = self.dropout_out(torch.tanh(self.readout(torch.cat([h, attention_out], dim=-1))))
            if self.input_feeding:
                feed = out
        if cov is not None:  # Tu et al. (2016): cov_i = cov_{i-1} + a_{i-1}
            cov = cov + attn
        return hs, cs, feed, cov, out, context, attn

    def _compiled_step(self):
        """``_step`` compiled by torch.compile (inductor, dynamic shapes), made once per decoder."""
        compiled = self.__dict__.get("_step_compiled")
        if compiled is None:
            compiled = torch.compile(self._step, dynamic=True)
            self.__dict__["_step_compiled"] = compiled
        return compiled

    @staticmethod
    def _cell_input(x: Tensor, emb: Tensor, pre: Optional[Tensor]) -> Tensor:
        """The first layer's input after its hoisted embedding part, or all of [E y; x]."""
        return x if pre is not None else torch.cat([emb, x], dim=-1)

    def run_parallel(
        self,
        emb: Tensor,
        state: State,
        keys: Optional[Tensor],
        values: Tensor,
        padding_mask: Tensor,
        fixed: Optional[Tensor],
    ) -> Tuple[Tensor, Optional[Tensor], State]:
        """All steps in one RNN call: vanilla, and Luong without input feeding or coverage.
        emb: T x B x E."""
        seqlen = emb.size(0)
        if fixed is not None:  # vanilla: the context vector enters every step
            rnn_in = torch.cat([emb, fixed.unsqueeze(0).expand(seqlen, -1, -1)], dim=-1)
        else:
            rnn_in = emb
        out, new_state = self._rnn(rnn_in, state)  # T x B x H
        new_state["step"] = state["step"] + seqlen
        if self.readout_previous:  # s_{i-1}: the state before each step (vanilla only)
            out = torch.cat([state["h"][-1:], out[:-1]], dim=0)
        h = self.dropout_out(out).transpose(0, 1)  # B x T x H
        emb = emb.transpose(0, 1)  # B x T x E
        if self.attention is None:
            context = fixed.unsqueeze(1).expand(-1, seqlen, -1)  # B x T x C
            attn = None
        else:  # B x T x C, B x T x S
            context, attn = self.attention(h, keys, values, padding_mask, state["step"])
        parts = [h, context] + ([emb] if self.readout_uses_embedding else [])
        readout = over_positions(self.readout, torch.cat(parts, dim=-1))  # B x T x O'
        out = self.dropout_out(self._activate(readout))
        return out, attn, new_state

    def _activate(self, x: Tensor) -> Tensor:
        """Readout nonlinearity: tanh, or maxout over adjacent pairs (Bahdanau A.2.2:
        t_i = [max{t~_{i,2j-1}, t~_{i,2j}}]_{j=1..l}). x: ... x (2l) -> ... x l."""
        if not self.maxout:
            return torch.tanh(x)
        return x.view(*x.shape[:-1], -1, 2).amax(dim=-1)

    def _rnn(self, x: Tensor, state: State) -> Tuple[Tensor, State]:
        """Runs the (multi-layer) RNN over x (T x B x I) from state; returns outputs T x B x H.

        One step outside training (incremental decoding) goes through the cell directly: a
        one-step nn.LSTM/GRU call pays the set-up of the fused sequence kernel (oneDNN, cuDNN)
        at every step of beam search."""
        if x.size(0) == 1 and not self.training:
            cell = StackedCell(self.rnn, x.size(-1), self.dropout_out)
            hs, cs = cell.step(x[0], list(state["h"].unbind(0)),
                               list(state["c"].unbind(0)) if state["c"] is not None else None)
            h = stack(hs, dim=0)
            c = stack(cs, dim=0) if cs is not None else None
            return hs[-1].unsqueeze(0), {"h": h, "c": c, "feed": state.get("feed"), "cov": state.get("cov")}
        if self.rnn_type == "lstm":
            out, (h, c) = self.rnn(x, (state["h"], state["c"]))
        else:
            out, h = self.rnn(x, state["h"])
            c = None
        return out, {"h": h, "c": c, "feed": state.get("feed"), "cov": state.get("cov")}

    def product_weights(self) -> List[Tensor]:
        """Parameters that enter matrix products only, which autocast casts to bf16 before each
        use: the RNN's weight matrices, every nn.Linear (attention projections, readout, output
        layer, initial state) and the target embeddings (cast once by cast_for_products; the
        tied output layer). Not the RNN's biases (``embedding_part`` sums the two in fp32), the
        learned scalars g, the additive score's v (``v_weight`` normalises it in fp32) or its
        coverage weight w_c: both meet the score's element-wise work, which runs in fp32 on a
        CPU (``attention.for_elementwise``); nor local-p's v_p, whose product with tanh(W_p h_t)
        runs in fp32 (``Attention.predict_position``)."""
        keep = {id(p) for m in self.modules() if isinstance(m, AdditiveScorer)
                for p in (m.v.weight, None if m.coverage_proj is None else m.coverage_proj.weight)}
        keep |= {id(m.position_v.weight) for m in self.modules() if hasattr(m, "position_v")}
        params = [p for name, p in self.rnn.named_parameters() if name.startswith("weight_")]
        params += [p for m in self.modules() if isinstance(m, nn.Linear)
                   for p in m.parameters() if id(p) not in keep]
        return params + [self.embed_tokens.weight]

    def step_weights(self) -> List[Tensor]:
        """The weight matrices of every decoding step's products (beam search packs them for
        oneDNN, ``packed.py``): the RNN's input and recurrent matrices (``StackedCell.step``),
        the per-step projections (``packed.Linear``: the query's, the readout) and the output
        layer (the target embeddings when tied). Not the products made once per sentence (the
        attention keys, the initial state)."""
        weights = [p for name, p in self.rnn.named_parameters() if name.startswith("weight_")]
        weights += [m.weight for m in self.modules() if isinstance(m, Linear)]
        if self.fc_out is None:
            weights.append(self.embed_tokens.weight)
        return weights

    def output_projection(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The output layer's weight (V x C: fc_out's, or the target embeddings when tied) and
        bias (V, or None when tied): output_layer(x) = x W^T + b. The fused criterions
        (``criterion.py``) apply it themselves, together with the loss."""
        if self.fc_out is None:
            return self.embed_tokens.weight, None
        return self.fc_out.weight, self.fc_out.bias

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        """fairseq's (``utils.log_softmax``: the logits cast to fp32, torch's log_softmax), but
        log-probabilities of CPU logits outside autograd (every step of beam search, validation)
        in one C loop over each row, which reads bf16 logits as they are
        (``native.log_softmax``: 195 against 330 us for 80 x 5,992 bf16 rows, batch 16 at beam
        5, on the AMD EPYC of BENCHMARKS.md 2026-12-07). The same values within a few ulp."""
        logits = net_output[0]
        if log_probs and native.log_softmax_usable(logits):
            return native.log_softmax(logits)
        return super().get_normalized_probs(net_output, log_probs, sample)

    def output_layer(self, features: Tensor) -> Tensor:
        weight, bias = self.output_projection()
        return padded_rows_linear(features, weight, bias)  # B x T x V

    # ------------------------------------------------------------------ state
    def _summary(self, encoder_out: Dict[str, Optional[Tensor]]) -> Tensor:
        """Vanilla context c: the encoder's top-layer final state, both directions (B x C)."""
        return encoder_out["final_hidden"][-1]

    def initial_state(self, encoder_out: Dict[str, Optional[Tensor]], groups: int = 1) -> State:
        """h, c (L x B x H), fed-back h~ (B x O), target step (B, long), coverage (B x S), for
        B = groups hypotheses per source row (consecutive), starting equal.

        New states take the dtype of the encoder's final state (its RNN's own output dtype), not
        of its outputs, which the encoder casts to bf16 in --cpu-bf16 inference."""
        values = encoder_out["encoder_out"]  # S x B x C
        like = encoder_out["final_hidden"]  # L x B x C
        shape = (values.size(1), self.hidden_size)
        rows = shape[0] * groups
        source = self.init_from  # final, or backward_first (Bahdanau's h<-_1)
        h = self.init_hidden(encoder_out[source + "_hidden"], self.num_layers, shape, like)
        c = None
        if self.init_cell is not None:
            c = self.init_cell(encoder_out.get(source + "_cell"), self.num_layers, shape, like)
        if groups > 1:
            h = h.repeat_interleave(groups, dim=1)
            c = None if c is None else c.repeat_interleave(groups, dim=1)
        feed = like.new_zeros(rows, self.out_embed_dim) if self.input_feeding else None
        step = torch.zeros(rows, dtype=torch.long, device=values.device)
        cov = like.new_zeros(rows, values.size(0)) if self.coverage else None
        return {"h": h, "c": c, "feed": feed, "step": step, "cov": cov}

    @staticmethod
    def _follow_source_rows(cached: State, src_ids: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The cached source side (attention keys, cast values: B x S x ...) for the source rows
        the encoder output holds now. reorder_incremental_state reorders the hypotheses only;
        reorder_encoder_out changes the source rows when a sentence is finished (src_ids: the
        sentence each row holds, B)."""
        keys, values, cached_ids = cached.get("keys"), cached.get("values"), cached["src_ids"]
        # unchanged rows hand over the same tensor: nothing to compare
        if src_ids is cached_ids:
            return keys, values
        # the cached row of each sentence (rows holding the same sentence are equal: any will
        # do; the first is taken)
        rows = rows_holding(src_ids, cached_ids)  # B'
        return tuple(None if v is None else v.index_select(0, rows) for v in (keys, values))

    def _get_cache(self, incremental_state) -> Optional[State]:
        if incremental_state is None:
            return None
        return self.get_incremental_state(incremental_state, "state")

    def reorder_incremental_state(
        self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor
    ):
        cached = self._get_cache(incremental_state)
        if cached is None:
            return
        # the hypotheses' own state; the source side (keys, values, src_ids) follows the encoder
        # output's rows at the next step (_follow_source_rows)
        batch_dim = {"h": 1, "c": 1, "feed": 0, "step": 0, "cov": 0}
        reordered = {
            k: (v if v is None or k not in batch_dim else v.index_select(batch_dim[k], new_order))
            for k, v in cached.items()
        }
        self.set_incremental_state(incremental_state, "state", reordered)

    def reorder_incremental_state_scripting(
        self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor
    ):
        """fairseq's search calls this at every step; fairseq's version walks every submodule
        looking for a ``reorder_incremental_state``: 40 against 9 us per call here (rnn_bahdanau,
        5 hypotheses), about 2% of a batch-1 beam step. Only the decoder itself keeps incremental
        state."""
        self.reorder_incremental_state(incremental_state, new_order)

    def max_positions(self) -> int:
        return self.max_target_positions
