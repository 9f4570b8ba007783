"""Configuration of the RNN encoder-decoder family (one dataclass, every field documented)."""

import argparse
from dataclasses import dataclass, field, fields
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

RNN_TYPE_CHOICES = ChoiceEnum(["lstm", "gru"])
ATTENTION_CHOICES = ChoiceEnum(["additive", "dot", "general", "concat", "location"])
ATTENTION_MODE_CHOICES = ChoiceEnum(["global", "local-m", "local-p"])
PLACEMENT_CHOICES = ChoiceEnum(["none", "before", "after"])
INIT_CHOICES = ChoiceEnum(["zeros", "final", "bridge", "backward_first"])
READOUT_CHOICES = ChoiceEnum(["tanh", "maxout"])
READOUT_STATE_CHOICES = ChoiceEnum(["current", "previous"])


@dataclass
class RNNS2SConfig(FairseqDataclass):
    """Every model option with its default. The defaults (256 units everywhere, a bidirectional
    256+256 encoder, dropout only on the decoder's output, as fairseq's lstm_wiseman_iwslt_de_en)
    are the setting measured in examples/comparison.md against fairseq's lstm_wiseman_iwslt_de_en
    at its fastest (--bf16) at an equal CPU budget; rnn_bahdanau's and rnn_luong's cell is a GRU
    (their architectures set it: Bahdanau's own unit; on en-de it learned faster than the LSTM
    for both, on en-fr Luong's two cells tied), rnn_vanilla's an LSTM.
    The earlier 512-wide decoder with dropout 0.2 lost to fairseq's lstm. The *_paper
    architectures set the papers' own sizes."""

    # ---------------------------------------------------------------- encoder
    encoder_embed_dim: int = field(default=256, metadata={"help": "encoder embedding dimension"})
    encoder_hidden_size: int = field(
        default=256, metadata={"help": "encoder RNN hidden size (per direction)"}
    )
    encoder_layers: int = field(default=1, metadata={"help": "number of encoder RNN layers"})
    encoder_bidirectional: bool = field(
        default=True,
        metadata={"help": "bidirectional encoder; outputs concatenate both directions"},
    )
    encoder_dropout_in: float = field(
        default=0.0, metadata={"help": "dropout on the encoder's input embeddings"}
    )
    encoder_dropout_out: float = field(
        default=0.0, metadata={"help": "dropout on the encoder's outputs and between its layers"}
    )
    reverse_source: bool = field(
        default=False,
        metadata={"help": "feed the source to the encoder reversed (Luong et al.'s baseline); "
                  "attention weights still index the source as given"},
    )
    # ---------------------------------------------------------------- decoder
    decoder_embed_dim: int = field(default=256, metadata={"help": "decoder embedding dimension"})
    decoder_hidden_size: int = field(default=256, metadata={"help": "decoder RNN hidden size"})
    decoder_layers: int = field(default=1, metadata={"help": "number of decoder RNN layers"})
    decoder_out_embed_dim: int = field(
        default=256,
        metadata={"help": "size of the readout layer (Luong's attentional state h~, Bahdanau's t_i) "
                  "that feeds the output projection"},
    )
    decoder_dropout_in: float = field(
        default=0.0, metadata={"help": "dropout on the decoder's input embeddings"}
    )
    decoder_dropout_out: float = field(
        default=0.1,
        metadata={"help": "dropout on the decoder RNN's outputs, between its layers and on the readout"},
    )
    readout: READOUT_CHOICES = field(
        default="tanh",
        metadata={"help": "readout before the output projection (vanilla and Bahdanau): "
                  "tanh = tanh(W_o [s; c; E y_{i-1}]); maxout = Bahdanau's deep output "
                  "(Appendix A.2.2): t_i = max over pairs of U_o s + V_o E y_{i-1} + C_o c_i, "
                  "--maxout-dim units. Luong's h~ = tanh(W_c [h_t; c_t]) is always tanh"},
    )
    maxout_dim: int = field(
        default=0,
        metadata={"help": "number of maxout units l (each the max of 2 linear pieces) with "
                  "--readout maxout; 0 = --decoder-out-embed-dim"},
    )
    readout_state: READOUT_STATE_CHOICES = field(
        default="current",
        metadata={"help": "decoder state in the readout (vanilla and Bahdanau): current = s_i, "
                  "after the step; previous = s_{i-1}, as in Bahdanau et al.'s RNNsearch "
                  "(eq. A.2.2: t~_i = U_o s_{i-1} + V_o E y_{i-1} + C_o c_i)"},
    )
    decoder_init: INIT_CHOICES = field(
        default="final",
        metadata={"help": "decoder initial state: zeros; final = the encoder's last state (each "
                  "direction's, concatenated; linearly projected when sizes differ); "
                  "bridge = tanh(W h_final + b); backward_first = Bahdanau's "
                  "s_0 = tanh(W_s h<-_1 + b) from the right-to-left encoder direction's state at "
                  "the first source word (needs --encoder-bidirectional or --reverse-source)"},
    )
    rnn_type: RNN_TYPE_CHOICES = field(
        default="lstm",
        metadata={"help": "recurrent cell for encoder and decoder (rnn_bahdanau and rnn_luong: gru, "
                  "faster to learn in examples/comparison.md; rnn_luong_paper: lstm, as the paper)"}
    )
    # ---------------------------------------------------------------- attention
    attention_placement: PLACEMENT_CHOICES = field(
        default="before",
        metadata={"help": "none = vanilla seq2seq (fixed context vector, Cho et al. 2014); "
                  "before = Bahdanau (query is the previous decoder state, context enters the "
                  "RNN step); after = Luong (query is the current state, h~ = tanh(W_c[h;c]), "
                  "Luong's eq. 5 with the columns of W_c in the other order)"},
    )
    attention: ATTENTION_CHOICES = field(
        default="additive",
        metadata={"help": "score function: additive v^T tanh(W s + U h + b) (Bahdanau), "
                  "dot s^T h, general s^T W h, concat v^T tanh(W [s;h]) (Luong eq. 8), "
                  "location a = softmax(W_a s) (Luong sec. 3.1: one score per source position up to "
                  "--max-source-positions, positions counted from the first real token); "
                  "refused with --attention-placement none (the vanilla decoder has no score)"},
    )
    attention_dim: int = field(
        default=256,
        metadata={"help": "hidden size of the additive/concat score and of local-p's "
                  "position network W_p (the dot, general and location scores have none)"},
    )
    attention_mode: ATTENTION_MODE_CHOICES = field(
        default="global",
        metadata={"help": "global = attend to every source word; local-m = only the window "
                  "[p_t - D, p_t + D] with p_t = t (Luong sec. 3.2); local-p = the window around "
                  "p_t = S sigmoid(v_p^T tanh(W_p h_t)), weights times exp(-(s - p_t)^2 / "
                  "(2 sigma^2)), sigma = D/2 (Luong eq. 9-10); S = real source length"},
    )
    local_window: int = field(
        default=10, metadata={"help": "half-width D of the local attention window (Luong: 10); "
                              "used by --attention-mode local-m and local-p only"}
    )
    attention_scale: bool = field(
        default=False,
        metadata={"help": "scaled Luong: multiply the dot/general score by a learned scalar g "
                  "(initialised to 1; tf-nmt's scaled_luong)"},
    )
    attention_normalize: bool = field(
        default=False,
        metadata={"help": "normalised Bahdanau: additive/concat score with v replaced by "
                  "g v/||v|| (weight normalisation, g learned, initialised to sqrt(1/A)); "
                  "tf-nmt's normed_bahdanau"},
    )
    coverage: bool = field(
        default=False,
        metadata={"help": "coverage (Tu et al. 2016): the sum of previous attention weights "
                  "cov_j = sum_{k<i} a_kj enters the additive/concat score, "
                  "e_ij = v^T tanh(W s + U h_j + b + w_c cov_j); rnn_bahdanau turns it on "
                  "when the score is additive or concat"},
    )
    input_feeding: bool = field(
        default=True,
        metadata={"help": "Luong's input feeding (sec. 3.3): feed h~_{t-1} into the next RNN "
                  "step (only with --attention-placement after: 'true' is refused with before "
                  "or none); rnn_luong turns it off, "
                  "rnn_luong_paper keeps it"},
    )
    # ---------------------------------------------------------------- embeddings
    share_decoder_input_output_embed: bool = field(
        default=False,
        metadata={"help": "share the decoder's input embeddings and output projection "
                  "(needs decoder_out_embed_dim == decoder_embed_dim)"},
    )
    share_all_embeddings: bool = field(
        default=False,
        metadata={"help": "share encoder, decoder and output embeddings (needs a joined "
                  "dictionary and equal embedding sizes)"},
    )
    encoder_embed_path: Optional[str] = field(
        default=None,
        metadata={"help": "pretrained source embeddings, as fairseq's lstm and transformer take "
                  "them: a text file whose first line (count and size) is skipped, then one "
                  "'word v_1 ... v_d' per line with d = --encoder-embed-dim; the dictionary's "
                  "words found there start from their vectors, the others from --init-range. "
                  "Read whenever fairseq-train builds the model (a resumed run too); "
                  "fairseq-generate, -interactive and the hub take the trained vectors from "
                  "the checkpoint"},
    )
    decoder_embed_path: Optional[str] = field(
        default=None,
        metadata={"help": "pretrained target embeddings (the format of --encoder-embed-path); "
                  "with --share-all-embeddings give --encoder-embed-path only"},
    )
    encoder_freeze_embed: bool = field(
        default=False, metadata={"help": "keep the source embeddings fixed in training (with "
                                 "--share-all-embeddings, the one shared matrix)"},
    )
    decoder_freeze_embed: bool = field(
        default=False,
        metadata={"help": "keep the target embeddings fixed in training (with a shared output "
                  "layer, that too)"},
    )
    cpu_bf16: bool = field(
        default=False,
        metadata={"help": "run the model's matrix products in bfloat16 on CPU (torch autocast; "
                  "in training weights, gradients and loss stay fp32; for decoding the weight "
                  "matrices are stored in bf16, with the same outputs); for generation pass "
                  "--model-overrides \"{'cpu_bf16': True}\". On GPU use fairseq's --fp16/--bf16/--amp"},
    )
    cpu_int8: bool = field(
        default=False,
        metadata={"help": "decoding on CPU (fairseq-generate, fairseq-interactive, the hub): the "
                  "decoder's per-step weight matrices in int8, one scale per row, multiplied by "
                  "fbgemm's dynamic int8 kernel (inputs quantized at each call); with or without "
                  "--cpu-bf16. Faster beam search where int8 products beat the model's own "
                  "(AVX512-VNNI), at a small cost in scores (README: Speed and precision on "
                  "CPU); pass --model-overrides \"{'cpu_int8': True}\". Training ignores it; "
                  "on GPU it does nothing"},
    )
    compile_step: bool = field(
        default=False,
        metadata={"help": "training: compile the per-step work of the step-loop decoders "
                  "(Bahdanau, input feeding, coverage) with torch.compile (inductor, dynamic "
                  "shapes): fused element-wise kernels, fewer launches per step, meant for GPUs, "
                  "where the step loop is bound by kernel launches (not yet measured there). "
                  "Compiles at the start (about 10 s on CPU) and again for each new kind of "
                  "input in the first updates (one took 3 s at the 8th update). Equal to the "
                  "eager step up to rounding; generation runs the eager step (compiled, it was "
                  "no faster on CPU). On CPU, once compiled: 1.00-1.09x eager's training speed "
                  "in fp32 and with --cpu-bf16, not worth its compile time in short runs "
                  "(BENCHMARKS.md)"},
    )
    init_range: float = field(
        default=0.1,
        metadata={"help": "initialise every parameter from U(-r, r), as Luong et al. (2015, sec. "
                  "4.1) and fairseq's lstm do (0.1); padding embeddings stay zero. 0 keeps "
                  "PyTorch's per-layer defaults, which learn far slower at the start"},
    )
    max_source_positions: int = field(
        default=1024, metadata={"help": "maximum source length the model accepts (with "
                                "--attention location also the size of its weight W_a, one row "
                                "per position: fixed once trained)"}
    )
    max_target_positions: int = field(
        default=1024, metadata={"help": "maximum target length the model generates"}
    )


BOOL_FIELDS = [f.name for f in fields(RNNS2SConfig) if f.type is bool]


def str2bool(value: str) -> bool:
    low = str(value).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def add_bool_args(parser) -> None:
    """Boolean options as ``--flag`` (true) or ``--flag false``.

    fairseq turns a bool field into a store_true/store_false switch, so a value an architecture
    sets (say a bidirectional encoder) could never be switched off. Added before fairseq adds the
    dataclass fields, these win (fairseq skips an option that already exists).
    """
    for name in BOOL_FIELDS:
        f = RNNS2SConfig.__dataclass_fields__[name]
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=str2bool,
            nargs="?",
            const=True,
            metavar="BOOL",
            help=f"{f.metadata['help']} (default: {str(f.default).lower()}; "
            f"'--{name.replace('_', '-')}' alone means true)",
        )


def fill_defaults(args) -> None:
    """Sets every field the user and the architecture left unset to the dataclass default."""
    for f in fields(RNNS2SConfig):
        if f.name.startswith("_"):
            continue
        if _get(args, f.name) is None:
            setattr(args, f.name, f.default)


def _get(args, name):
    try:
        return getattr(args, name, None)
    except Exception:  # omegaconf raises for missing keys in struct mode
        return None
