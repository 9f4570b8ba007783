"""RNN encoder: embeddings + (bi)LSTM/GRU over the source, with packed sequences."""

import contextlib
import contextvars
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from fairseq.models import FairseqEncoder

from .dropout import Dropout
from .precision import cast_for_products, cpu_autocast, runs_cpu_bf16

RNN_TYPES = {"lstm": nn.LSTM, "gru": nn.GRU}

# set by ``sentence_runs()``: the caller's reorders keep each sentence's hypotheses in consecutive
# runs and its sentences in their order (fairseq's SequenceGenerator, see runtime.py)
_SENTENCE_RUNS = contextvars.ContextVar("s2s_sentence_runs", default=False)


@contextlib.contextmanager
def sentence_runs() -> Iterator[None]:
    """Within this block, ``reorder_encoder_out`` trusts the order it is given to be beam search's:
    each sentence's hypotheses in one run (``hyps_per_source`` long), sentences in their order,
    finished ones left out. It then decides which source rows to keep from the order's size
    alone and never reads its values, which on a GPU would wait for the device (two host
    synchronisations per decoding step). Outside it, the order is checked (``source_order``)."""
    token = _SENTENCE_RUNS.set(True)
    try:
        yield
    finally:
        _SENTENCE_RUNS.reset(token)


def compact_left(padding_mask: Tensor) -> Optional[Tensor]:
    """Permutation (B x T) that moves each row's tokens to the front, keeping their order.

    fairseq pads sources on the left by default; packed RNNs need right padding. Returns None when
    nothing needs to move (no padding, or padding already on the right).
    """
    if not padding_mask.any():
        return None
    order = torch.argsort(padding_mask.to(torch.uint8), dim=1, stable=True)
    if bool((order == torch.arange(order.size(1), device=order.device)).all()):
        return None
    return order


class RNNEncoder(FairseqEncoder):
    """Embeds source tokens and runs a (bidirectional) LSTM or GRU over them.

    Returns, for ``src_tokens`` as the caller gave them (left or right padded):
      - encoder_out:          T x B x C   outputs, zero at padding (C = hidden x directions)
      - encoder_padding_mask: B x T       True at padding
      - final_hidden:         L x B x C   last state of every layer, directions concatenated
      - final_cell:           L x B x C   LSTM cell state (None for GRU)
      - backward_first_hidden: L x B x H  state of the direction that reads the source right to
                                          left, at the first real token (= that direction's final
                                          state): Bahdanau's h<-_1 (Appendix A.2.2). With
                                          --reverse-source the RNN's forward direction reads the
                                          source as given right to left, so it is that one's state
                                          (unidirectional encoders have it only then); else None
      - backward_first_cell:  L x B x H  its LSTM cell state (None for GRU or when absent)
    Outputs stay at the positions of ``src_tokens``, so attention weights index the caller's
    tokens (fairseq's own ``lstm`` returns them shifted for left-padded sentences).
      - src_ids:              B           the sentence each row holds (its index in the batch)
    In beam search (``reorder_encoder_out``) the rows stay one per sentence, each serving
    ``hyps_per_source`` consecutive hypotheses (an int, absent when 1): fairseq's search would
    otherwise keep beam copies of every source-side tensor.
    """

    def __init__(
        self,
        dictionary,
        embed_tokens: nn.Embedding,
        hidden_size: int,
        num_layers: int,
        rnn_type: str = "lstm",
        bidirectional: bool = False,
        dropout_in: float = 0.0,
        dropout_out: float = 0.0,
        reverse_source: bool = False,
        max_source_positions: int = 100000,
        cpu_bf16: bool = False,
    ):
        super().__init__(dictionary)
        self.cpu_bf16 = cpu_bf16
        # the dtype the RNN takes its input in where the embeddings are stored narrower (bf16
        # for --cpu-bf16 decoding, see product_weights); None: the embeddings' own dtype
        self.rnn_input_dtype: Optional[torch.dtype] = None
        self.embed_tokens = embed_tokens
        self.padding_idx = embed_tokens.padding_idx
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.rnn_type = rnn_type
        self.bidirectional = bidirectional
        self.reverse_source = reverse_source
        self.max_source_positions = max_source_positions
        self.num_directions = 2 if bidirectional else 1
        self.output_dim = hidden_size * self.num_directions
        self.dropout_in = Dropout(dropout_in, module_name=self.__class__.__name__)
        self.dropout_out = Dropout(dropout_out, module_name=self.__class__.__name__)
        self.rnn = RNN_TYPES[rnn_type](
            input_size=embed_tokens.embedding_dim,
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout_out if num_layers > 1 else 0.0,
            bidirectional=bidirectional,
        )

    def forward(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None, **unused):
        """src_tokens: B x T (left or right padded). src_lengths are recomputed from padding."""
        with cpu_autocast(runs_cpu_bf16(self), src_tokens):
            return self._forward(src_tokens)

    def _forward(self, src_tokens: Tensor):
        bsz, seqlen = src_tokens.size()
        padding_mask = src_tokens.eq(self.padding_idx)  # B x T
        lengths = (~padding_mask).long().sum(dim=1).clamp(min=1)  # B

        order = compact_left(padding_mask)
        tokens = src_tokens if order is None else src_tokens.gather(1, order)  # right padded
        if self.reverse_source:  # Luong et al.'s baseline feeds the source reversed
            tokens = _reverse_padded(tokens, lengths)

        x = self.embed_tokens(tokens)  # B x T x E
        if self.rnn_input_dtype is not None:
            x = x.to(self.rnn_input_dtype)
        x = self.dropout_in(x)
        x = x.transpose(0, 1)  # T x B x E
        if bool((lengths == seqlen).all()):
            out, state = self.rnn(x)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
            out, state = self.rnn(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, total_length=seqlen)  # T x B x C
        out = self.dropout_out(out)

        if self.reverse_source:
            out = _reverse_padded(out.transpose(0, 1), lengths).transpose(0, 1)
        if order is not None:  # back to the caller's positions
            inverse = torch.argsort(order, dim=1)  # B x T
            out = out.gather(0, inverse.t().unsqueeze(-1).expand(-1, -1, out.size(2)))

        # inference under --cpu-bf16: the decoder uses the outputs in bf16 products only (it would
        # cast them itself); one bf16 copy instead of the fp32 one and its cast, and fairseq's
        # search keeps and reorders it once per hypothesis
        out = cast_for_products(out)
        hidden, cell = state if isinstance(state, tuple) else (state, None)
        result: Dict[str, Optional[Tensor]] = {
            "encoder_out": out,  # T x B x C
            "encoder_padding_mask": padding_mask,  # B x T
            "final_hidden": self._combine_directions(hidden),  # L x B x C
            "final_cell": None if cell is None else self._combine_directions(cell),
            "backward_first_hidden": self._right_to_left(hidden),  # L x B x H
            "backward_first_cell": None if cell is None else self._right_to_left(cell),
            # which source sentence each row holds (B); see same_sources
            "src_ids": torch.arange(bsz, device=src_tokens.device),
        }
        return result

    def _right_to_left(self, state: Tensor) -> Optional[Tensor]:
        """(L*D) x B x H final states -> L x B x H of the direction reading the source right to
        left (None when no direction does: unidirectional without --reverse-source)."""
        if not self.bidirectional:
            return state if self.reverse_source else None
        state = state.view(self.num_layers, 2, state.size(1), self.hidden_size)
        return state[:, 0 if self.reverse_source else 1]

    @property
    def has_right_to_left(self) -> bool:
        return self.bidirectional or self.reverse_source

    def _combine_directions(self, state: Tensor) -> Tensor:
        # (L*D) x B x H -> L x B x (D*H)
        if not self.bidirectional:
            return state
        layers, bsz = self.num_layers, state.size(1)
        state = state.view(layers, 2, bsz, self.hidden_size)
        return torch.cat([state[:, 0], state[:, 1]], dim=-1)

    def reorder_encoder_out(self, encoder_out: Dict[str, Optional[Tensor]], new_order: Tensor):
        """Rows for the hypotheses ``new_order`` selects, as fairseq's beam search asks at its
        start (each sentence repeated beam times) and after every step.

        The source side stays one row per sentence while the hypotheses come in consecutive runs
        of one sentence (fairseq's SequenceGenerator keeps them so): the rows then serve
        ``hyps_per_source`` hypotheses each, hypothesis r reading row r // hyps_per_source, and
        only a finished sentence's removal copies rows. Any other order gets one row per
        hypothesis. See ``source_order``, and ``sentence_runs`` for fairseq's search, whose
        orders are not read."""
        groups = encoder_out.get("hyps_per_source") or 1
        rows = encoder_out["encoder_padding_mask"].size(0)
        if _SENTENCE_RUNS.get():
            order, new_groups = source_runs(new_order, groups, rows)
            same = order is None
        else:
            order, new_groups = source_order(new_order, groups, rows)
            same = same_sources(encoder_out.get("src_ids"), order)
        if same:
            reordered = dict(encoder_out)  # the same sentences in the same rows: no copy
        else:
            batch_dim = {"encoder_out": 1, "encoder_padding_mask": 0, "final_hidden": 1, "final_cell": 1,
                         "backward_first_hidden": 1, "backward_first_cell": 1, "src_ids": 0}
            reordered = {k: (None if v is None else v.index_select(batch_dim[k], order))
                         for k, v in encoder_out.items() if k in batch_dim}
        reordered.pop("hyps_per_source", None)
        if new_groups > 1:
            reordered["hyps_per_source"] = new_groups
        return reordered

    def product_weights(self) -> List[Tensor]:
        """Parameters whose values reach matrix products only in bf16 under autocast: all of the
        RNN's (its kernel casts them) and the source embeddings (the kernel rounds its fp32
        input to bf16 itself). Stored in bf16, the embeddings must reach the RNN as fp32 again
        (``rnn_input_dtype``): a bf16 input would make the kernel keep its state in bf16."""
        return list(self.rnn.parameters()) + [self.embed_tokens.weight]

    def max_positions(self) -> int:
        return self.max_source_positions


def same_sources(src_ids: Optional[Tensor], order: Tensor) -> bool:
    """Whether taking rows in ``order`` keeps the source sentence of every row (then nothing
    needs a copy). src_ids (B, long) says which sentence each row holds."""
    if src_ids is None or order.numel() != src_ids.numel():
        return False
    return torch.equal(src_ids.index_select(0, order), src_ids)


def rows_holding(ids: Tensor, held: Tensor) -> Tensor:
    """For each id in ``ids`` (B'), the first row of ``held`` (B: the id each row holds) that
    holds it, found on the device: no value is read on the host, which on a GPU would wait for
    it. B' x B comparisons (a batch's sentences)."""
    return ids.unsqueeze(1).eq(held.unsqueeze(0)).int().argmax(dim=1)  # B'


def source_order(new_order: Tensor, groups: int, rows: int) -> Tuple[Tensor, int]:
    """Source rows for hypotheses reordered by ``new_order``: (order, hypotheses per row).

    Before, ``rows`` source rows served ``groups`` consecutive hypotheses each (hypothesis r read
    row r // groups) and new_order indexed those rows * groups hypotheses. Beam search keeps the
    hypotheses of a sentence together: at its start it repeats each sentence beam times
    (new_order = [0]*beam + [1]*beam + ..., groups 1), then shuffles hypotheses within
    sentences and drops finished sentences. When the new hypotheses again come in runs of one
    row (of the current group size, or at the start of new_order.numel() / rows), the result
    keeps one row per sentence: (the rows' order, run length). Otherwise (any other caller's
    order) one row per hypothesis: (source row of each hypothesis, 1).
    """
    src = new_order // groups if groups > 1 else new_order  # source row of each new hypothesis
    n = src.numel()
    run = groups if groups > 1 else (n // rows if rows and n % rows == 0 else 1)
    if run > 1 and n % run == 0:
        runs = src.view(-1, run)
        if torch.equal(runs, runs[:, :1].expand_as(runs)):
            return runs[:, 0], run
    return src, 1


def source_runs(new_order: Tensor, groups: int, rows: int) -> Tuple[Optional[Tensor], int]:
    """``source_order`` for beam search's orders (see ``sentence_runs``), from their size alone:
    (None, run) when every row keeps its sentence (the order's values are not read), else (the
    kept rows, run) when finished sentences leave. ``rows`` rows served ``groups`` hypotheses
    each; new_order (n hypotheses) either repeats each row n / rows times (the search's first
    order: groups 1), shuffles hypotheses within their sentences (n = rows * groups) or, when
    sentences finish, keeps the others' runs of ``groups`` (n < rows * groups)."""
    n = new_order.numel()
    if n >= rows * groups:  # no sentence left: the same rows, in runs of n / rows
        if n % rows:
            raise ValueError(f"beam search order of {n} hypotheses for {rows} source rows")
        return None, n // rows
    if n % groups:
        raise ValueError(f"beam search order of {n} hypotheses in runs of {groups}")
    first = new_order.reshape(-1, groups)[:, 0]  # the first hypothesis of each run
    return (first // groups if groups > 1 else first), groups


def _reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each right-padded row of x (B x T [x C]) within its length; padding stays last."""
    bsz, seqlen = x.shape[:2]
    pos = torch.arange(seqlen, device=x.device).unsqueeze(0)  # 1 x T
    idx = (lengths.unsqueeze(1) - 1 - pos).where(pos < lengths.unsqueeze(1), pos)  # B x T
    if x.dim() == 3:
        idx = idx.unsqueeze(-1).expand(-1, -1, x.size(2))
    return x.gather(1, idx)
