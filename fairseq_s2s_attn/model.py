"""The fairseq model ``rnn_s2s`` and its named architectures.

    rnn_vanilla         encoder-decoder with a fixed context vector (Sutskever et al. 2014,
                        Cho et al. 2014)
    rnn_bahdanau        additive attention before the RNN step (Bahdanau et al. 2014)
    rnn_luong           general attention after the RNN step, input feeding (Luong et al. 2015)
    rnn_bahdanau_paper  RNNsearch-50 as published (sizes, GRU, s_0 from h<-_1, maxout deep output)
    rnn_luong_paper     Luong et al.'s best single model (4 x 1000 LSTM, local-p general, input
                        feeding, reversed source)
    *_tiny              vanilla/Bahdanau/Luong, small enough for tests and smoke runs
"""

import argparse
import contextvars
import logging
import os
from dataclasses import fields

import torch
import torch.nn as nn
from fairseq import utils
from fairseq.models import (
    ARCH_CONFIG_REGISTRY,
    FairseqEncoderDecoderModel,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer import Embedding
from fairseq.utils import safe_getattr

from . import int8
from . import packed as packed_weights
from .attention import ADDITIVE_SCORES
from .config import RNNS2SConfig, add_bool_args, fill_defaults
from .decoder import RNNDecoder
from .encoder import RNNEncoder
from .errors import CheckpointError, ConfigError
from .precision import runs_cpu_bf16, store_in_bf16_

logger = logging.getLogger(__name__)


@register_model("rnn_s2s", dataclass=RNNS2SConfig)
class RNNS2SModel(FairseqEncoderDecoderModel):
    """RNN encoder-decoder: vanilla, Bahdanau or Luong, chosen by --attention-placement."""

    @classmethod
    def add_args(cls, parser):
        add_bool_args(parser)
        super().add_args(parser)

    @classmethod
    def build_model(cls, cfg, task):
        fill_defaults(cfg)
        check_config(cfg)
        if getattr(getattr(task, "cfg", None), "left_pad_target", False):
            # the decoders read the target from its first position: left padding would enter as
            # decoder steps before </s> (measured: up to 1.75 nats on a sentence's loss, silently)
            if not BUILDING_FOR_CHECKPOINT.get():
                raise ConfigError("--left-pad-target puts padding where the decoder starts "
                                  "reading; leave targets right-padded (the default)")
            # a checkpoint trained so by an earlier version still loads: beam search makes its
            # own targets; only given targets are read wrongly
            logger.warning("--left-pad-target: beam search is unaffected, but scores of given "
                           "targets (--score-reference, fairseq-validate) would count the "
                           "padding as decoder steps; leave targets right-padded")
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary

        encoder_embed = Embedding(len(src_dict), cfg.encoder_embed_dim, src_dict.pad())
        if cfg.share_all_embeddings:
            if src_dict != tgt_dict:
                raise ConfigError(
                    "--share-all-embeddings needs one joined dictionary for source and target "
                    "(fairseq-preprocess --joined-dictionary)"
                )
            if cfg.encoder_embed_dim != cfg.decoder_embed_dim:
                raise ConfigError(
                    f"--share-all-embeddings needs --encoder-embed-dim ({cfg.encoder_embed_dim}) "
                    f"== --decoder-embed-dim ({cfg.decoder_embed_dim})"
                )
            decoder_embed = encoder_embed
        else:
            decoder_embed = Embedding(len(tgt_dict), cfg.decoder_embed_dim, tgt_dict.pad())

        encoder = RNNEncoder(
            src_dict,
            encoder_embed,
            hidden_size=cfg.encoder_hidden_size,
            num_layers=cfg.encoder_layers,
            rnn_type=str(cfg.rnn_type),
            bidirectional=cfg.encoder_bidirectional,
            dropout_in=cfg.encoder_dropout_in,
            dropout_out=cfg.encoder_dropout_out,
            reverse_source=cfg.reverse_source,
            max_source_positions=cfg.max_source_positions,
            cpu_bf16=cfg.cpu_bf16,
        )
        decoder = RNNDecoder(
            tgt_dict,
            decoder_embed,
            hidden_size=cfg.decoder_hidden_size,
            num_layers=cfg.decoder_layers,
            encoder_output_dim=encoder.output_dim,
            rnn_type=str(cfg.rnn_type),
            attention=str(cfg.attention),
            attention_placement=str(cfg.attention_placement),
            attention_dim=cfg.attention_dim,
            input_feeding=cfg.input_feeding,
            out_embed_dim=cfg.decoder_out_embed_dim,
            dropout_in=cfg.decoder_dropout_in,
            dropout_out=cfg.decoder_dropout_out,
            init=str(cfg.decoder_init),
            share_input_output_embed=cfg.share_decoder_input_output_embed or cfg.share_all_embeddings,
            max_target_positions=cfg.max_target_positions,
            cpu_bf16=cfg.cpu_bf16,
            attention_mode=str(cfg.attention_mode),
            local_window=cfg.local_window,
            attention_scale=cfg.attention_scale,
            attention_normalize=cfg.attention_normalize,
            coverage=cfg.coverage,
            readout=str(cfg.readout),
            maxout_dim=cfg.maxout_dim,
            readout_state=str(cfg.readout_state),
            encoder_direction_dim=cfg.encoder_hidden_size,
            max_source_positions=cfg.max_source_positions,
            compile_step=cfg.compile_step,
            cpu_int8=cfg.cpu_int8,
        )
        model = cls(encoder, decoder)
        if cfg.init_range > 0:
            init_uniform(model, cfg.init_range)
        load_pretrained_embeddings(model, cfg)
        return model

    def max_positions(self):
        return (self.encoder.max_positions(), self.decoder.max_positions())

    def prepare_for_inference_(self, cfg):
        """Called once before decoding by fairseq-generate, fairseq-interactive and the hub.

        With --cpu-bf16 on CPU the weights that enter only matrix products (``product_weights``
        of the encoder and decoder: all but the decoder RNN's biases, the scalars g and v) are
        then stored in bf16. Autocast runs those products in bf16 anyway, so every output is
        bit-identical; but it casts an fp32 weight first and keeps that bf16 copy while the
        search runs, so a model with fp32 weights held both (beam-search tensor memory 1.2-1.3x
        fairseq's lstm in fp32; 0.6-0.8x stored). Training and validation never come here:
        their weights stay fp32. Moved off the CPU afterwards
        (``hub.cuda()``), where --cpu-bf16 does nothing, the model gets them back in fp32
        (``_apply``), holding the bf16-rounded values it decoded with.

        The decoder's per-step weight matrices are then packed for oneDNN (``packed.py``): the
        same products, without reordering the weight at every step. With --cpu-int8 they get int8
        copies instead, which their products use (``int8.py``: other numbers).
        """
        super().prepare_for_inference_(cfg)
        # not for a model fairseq converted to fp16 (--fp16): it runs in fp16
        enc_bf16, dec_bf16 = runs_cpu_bf16(self.encoder), runs_cpu_bf16(self.decoder)
        params = []
        if enc_bf16:
            params += self.encoder.product_weights()
        if dec_bf16:
            params += self.decoder.product_weights()
        source = self.encoder.embed_tokens.weight
        if any(p is source for p in params) and not enc_bf16:
            # shared (--share-all-embeddings) with an encoder that runs without autocast
            params = [p for p in params if p is not source]
        params = {id(p) for p in params if p.device.type == "cpu" and p.dtype != torch.bfloat16}
        stored = [(name, p) for name, p in self.named_parameters() if id(p) in params]
        if id(source) in params:
            self.encoder.rnn_input_dtype = source.dtype
        freed = store_in_bf16_([p for _, p in stored])
        self.__dict__["_stored_in_bf16"] = [name for name, _ in stored]
        if freed:
            logger.info(f"--cpu-bf16: weight matrices stored in bf16 for decoding "
                        f"({freed / 2 ** 20:.1f} MB less)")
        if getattr(self.decoder, "cpu_int8", False):
            made = int8.pack_for_decoding_(self.decoder.step_weights(),
                                           output=self.decoder.output_projection()[0])
            if made:
                logger.info(f"--cpu-int8: {made} weight matrices of the decoder's steps in int8")
        if dec_bf16:  # the weights without an int8 copy (all without --cpu-int8)
            packed = packed_weights.pack_for_decoding_(
                w for w in self.decoder.step_weights() if int8.int8_weight(w) is None)
            if packed:
                logger.info(f"--cpu-bf16: {packed} weight matrices of the decoder's steps "
                            f"packed for oneDNN")

    def _apply(self, fn, *args, **kwargs):
        """.cuda(), .to(...), .float(), ...: weights stored in bf16 for CPU decoding go back to
        fp32 once the model is off the CPU (there, bf16 weights would meet fp32 activations).
        The oneDNN copies of weights that changed are dropped, on any device (a move or a cast,
        e.g. ``.float()`` on the CPU, replaces the Parameter objects or only their data; either
        way the old copy could serve no product but stayed in memory)."""
        before = list(self.parameters())
        super()._apply(fn, *args, **kwargs)
        current = {id(p) for p in self.parameters()}
        packed_weights.unpack(w for w in before
                              if id(w) not in current or packed_weights.packed_weight(w) is None)
        int8.unpack(w for w in before if id(w) not in current or int8.int8_weight(w) is None)
        stored = self.__dict__.get("_stored_in_bf16")
        params = dict(self.named_parameters()) if stored else {}
        if stored and params[stored[0]].device.type != "cpu":
            with torch.no_grad():
                for name in stored:
                    if params[name].dtype == torch.bfloat16:
                        params[name].data = params[name].data.float()
            for m in self.modules():
                if isinstance(m, nn.RNNBase):
                    m.flatten_parameters()
            self.encoder.rnn_input_dtype = None
            self.__dict__["_stored_in_bf16"] = None
        return self

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_state_dict_fits(self, state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


# Set while fairseq builds models to load a checkpoint's weights over them (checkpoint.py):
# pretrained embedding files are not read there (the checkpoint holds the trained vectors).
BUILDING_FOR_CHECKPOINT = contextvars.ContextVar("building_for_checkpoint", default=False)


def load_pretrained_embeddings(model: "RNNS2SModel", cfg) -> None:
    """--encoder-embed-path / --decoder-embed-path (fairseq's lstm's options, its file format:
    ``utils.parse_embedding``), after the initialisation; --encoder/decoder-freeze-embed."""
    enc, dec = model.encoder.embed_tokens, model.decoder.embed_tokens
    if cfg.share_all_embeddings and cfg.decoder_embed_path not in (None, cfg.encoder_embed_path):
        raise ConfigError("--share-all-embeddings shares one embedding matrix: give its vectors "
                          "with --encoder-embed-path, not a different --decoder-embed-path")
    jobs = [(cfg.encoder_embed_path, enc, model.encoder.dictionary, "--encoder-embed-path")]
    if dec is not enc:
        jobs.append((cfg.decoder_embed_path, dec, model.decoder.dictionary, "--decoder-embed-path"))
    for path, embed, dictionary, option in jobs:
        if not path or BUILDING_FOR_CHECKPOINT.get():
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"{option} {path}: no such file")
        try:
            vectors = utils.parse_embedding(path)
        except (ValueError, UnicodeDecodeError, StopIteration) as e:
            raise ConfigError(f"{option} {path}: not a text file of 'word v_1 ... v_d' lines "
                              f"after a header line ({type(e).__name__}: {str(e)[:80]})") from None
        vectors.pop("", None)  # blank lines
        if not vectors:
            raise ConfigError(f"{option} {path}: no vectors after the header line")
        wrong = next((w for w, v in vectors.items() if v.numel() != embed.embedding_dim), None)
        if wrong is not None:
            raise ConfigError(f"{option} {path}: the vector of {wrong!r} has "
                              f"{vectors[wrong].numel()} values, the embeddings are "
                              f"{embed.embedding_dim} wide")
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline().split()
        if len(header) != 2 or not all(x.isdigit() for x in header):
            logger.warning(f"{option} {path}: the first line is not a 'count size' header; it "
                           f"was skipped as one (fairseq's format), so its word has no vector")
        with torch.no_grad():
            utils.load_embedding(vectors, dictionary, embed)
        found = sum(dictionary[i] in vectors for i in range(len(dictionary)))
        logger.info(f"{option}: {found} of {len(dictionary)} dictionary words from {path}")
    if cfg.encoder_freeze_embed:
        enc.weight.requires_grad = False
    if cfg.decoder_freeze_embed:
        dec.weight.requires_grad = False


def init_uniform(model: nn.Module, r: float) -> None:
    """Every parameter from U(-r, r) (Luong et al. 2015, sec. 4.1); padding embeddings zero.
    Learned scalar gains (attention scale/normalize g) keep their own initial values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 0:
                p.uniform_(-r, r)
        for m in model.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()


# parameters whose first dimension is the size of a dictionary
_DICT_PARAMS = {
    "encoder.embed_tokens.weight": "source",
    "decoder.embed_tokens.weight": "target",
    "decoder.fc_out.weight": "target",
    "decoder.fc_out.bias": "target",
}


def check_state_dict_fits(model, state_dict, strict: bool = True) -> None:
    """A checkpoint used with other dictionaries (another data-bin), with other options (another
    --arch in the same --save-dir, sizes changed by --model-overrides) would fail in torch with a
    long list of mismatches, or in fairseq with a bare "architectures must match". Say what differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameter(s) of this model are not in it (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} of its parameters are not in this model (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"the checkpoint holds another model: {' and '.join(parts)}; the options (--arch, "
            "attention, layers, sharing) differ from those it was trained with"
        )
    for name, side in _DICT_PARAMS.items():
        if name in state_dict and name in own and state_dict[name].shape[0] != own[name].shape[0]:
            raise CheckpointError(
                f"the checkpoint was trained with a {side} dictionary of {state_dict[name].shape[0]} "
                f"types, but the {side} dictionary loaded now has {own[name].shape[0]} types: use the "
                "data directory (dict.*.txt) the model was trained with"
            )
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                  if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    if mismatched:
        shown = "; ".join(f"{k} is {a} in the checkpoint, {b} in the model" for k, a, b in mismatched[:3])
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise CheckpointError(
            f"the checkpoint does not fit the model built from its options: {shown}{more}; "
            "the options (sizes, --model-overrides) differ from those it was trained with"
        )


def check_config(cfg) -> None:
    """Rejects sizes that cannot fit together, naming the options involved."""
    for name in (
        "encoder_embed_dim", "encoder_hidden_size", "encoder_layers", "decoder_embed_dim",
        "decoder_hidden_size", "decoder_layers", "decoder_out_embed_dim", "attention_dim",
        "max_source_positions", "max_target_positions",
    ):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    for name in ("encoder_dropout_in", "encoder_dropout_out", "decoder_dropout_in", "decoder_dropout_out"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {value!r}")
    if not cfg.init_range >= 0:  # a negative range silently meant PyTorch's initialisation
        raise ConfigError(f"--init-range must be 0 (PyTorch's own initialisation) or positive, "
                          f"got {cfg.init_range!r}")
    enc_out = cfg.encoder_hidden_size * (2 if cfg.encoder_bidirectional else 1)
    if str(cfg.attention) == "dot" and str(cfg.attention_placement) != "none" and enc_out != cfg.decoder_hidden_size:
        raise ConfigError(
            f"--attention dot needs --decoder-hidden-size ({cfg.decoder_hidden_size}) equal to the "
            f"encoder output size ({enc_out} = --encoder-hidden-size x directions); "
            "use --attention general or concat, or match the sizes"
        )
    share = cfg.share_decoder_input_output_embed or cfg.share_all_embeddings
    maxout_sized = str(cfg.readout) == "maxout" and cfg.maxout_dim
    if share and maxout_sized and cfg.maxout_dim != cfg.decoder_embed_dim:
        raise ConfigError(
            f"sharing decoder input/output embeddings needs --maxout-dim ({cfg.maxout_dim}) == "
            f"--decoder-embed-dim ({cfg.decoder_embed_dim}) (or --maxout-dim 0)"
        )
    if share and not maxout_sized and cfg.decoder_out_embed_dim != cfg.decoder_embed_dim:
        raise ConfigError(
            f"sharing decoder input/output embeddings needs --decoder-out-embed-dim "
            f"({cfg.decoder_out_embed_dim}) == --decoder-embed-dim ({cfg.decoder_embed_dim})"
        )
    check_variant(cfg)


def check_variant(cfg) -> None:
    """Rejects attention/readout/initialisation options that do not apply together."""
    placement, score, mode = str(cfg.attention_placement), str(cfg.attention), str(cfg.attention_mode)
    if not isinstance(cfg.local_window, int) or cfg.local_window < 1:
        raise ConfigError(f"--local-window must be a positive integer, got {cfg.local_window!r}")
    if not isinstance(cfg.maxout_dim, int) or cfg.maxout_dim < 0:
        raise ConfigError(f"--maxout-dim must be 0 or a positive integer, got {cfg.maxout_dim!r}")
    if placement == "none":  # options of the attention the vanilla decoder does not have
        for flag, on in (("--attention-mode " + mode, mode != "global"), ("--coverage", cfg.coverage),
                         ("--attention-scale", cfg.attention_scale),
                         ("--attention-normalize", cfg.attention_normalize)):
            if on:
                raise ConfigError(f"{flag} needs attention (--attention-placement before or after)")
    if cfg.attention_scale and score not in ("dot", "general"):
        raise ConfigError(f"--attention-scale (Luong's score times a learned g) needs --attention "
                          f"dot or general, not {score}")
    if cfg.attention_normalize and score not in ADDITIVE_SCORES:
        raise ConfigError(f"--attention-normalize (g v/||v||) needs --attention additive or concat, "
                          f"not {score}")
    if cfg.coverage and score not in ADDITIVE_SCORES:
        raise ConfigError(f"--coverage enters the additive score: needs --attention additive or "
                          f"concat, not {score}")
    if placement == "after" and str(cfg.readout) != "tanh":
        raise ConfigError("--readout maxout is the deep output of vanilla/Bahdanau decoders; with "
                          "--attention-placement after the readout is Luong's h~ = tanh(W_c[h;c])")
    if placement == "after" and str(cfg.readout_state) != "current":
        raise ConfigError("--readout-state previous applies to --attention-placement none/before; "
                          "Luong's h~_t uses the current state h_t")
    if str(cfg.decoder_init) == "backward_first" and not (cfg.encoder_bidirectional or cfg.reverse_source):
        raise ConfigError("--decoder-init backward_first needs an encoder direction that reads the "
                          "source right to left: --encoder-bidirectional true or --reverse-source")


# --------------------------------------------------------------------- architectures
# Each sets its own defaults for options the user did not give, then fills the rest from
# RNNS2SConfig, the one place where defaults live (``--arch rnn_s2s`` takes them all from there).


def _set_defaults(args, **defaults):
    given = _given_switches(args)
    for key, value in defaults.items():
        setattr(args, key, safe_getattr(args, key, value))
    fill_defaults(args)
    check_given_switches(args, given)


# switches that ask for a decoder the placement does not build; a value the user gave is refused
# where it would be silently unused. Sizes (--attention-dim, --local-window) stay accepted: sweeps
# pass one set of sizes to every variant.
_SWITCHES = ("attention", "input_feeding")


def _given_switches(args) -> dict:
    """The switches the user gave: in fairseq's argparse namespace, before the architecture and
    fill_defaults run, an option left out is None. A DictConfig (fairseq-hydra-train, build_model
    of a parsed config, a checkpoint's config) holds every value, given or not, and so does a
    namespace the architecture has filled already (fairseq's build_model runs it again on a
    namespace from parse_args_and_arch): nothing is taken as given there."""
    if not isinstance(args, argparse.Namespace):
        return {}
    if all(getattr(args, f.name, None) is not None for f in fields(RNNS2SConfig)
           if not f.name.startswith("_") and f.default is not None):
        return {}  # filled: the architecture ran on it before (or every option was given)
    return {k: v for k in _SWITCHES if (v := getattr(args, k, None)) is not None}


def check_given_switches(args, given: dict) -> None:
    """Refuses --attention SCORE for the vanilla decoder (it has no attention, so the score was
    silently unused) and --input-feeding true where the decoder has no h~ to feed (Luong's input
    feeding, sec. 3.3, exists only with --attention-placement after)."""
    placement = str(args.attention_placement)
    if placement == "none" and "attention" in given:
        raise ConfigError(f"--attention {given['attention']} needs attention (--attention-placement "
                          "before or after); the vanilla decoder sees the source only through a "
                          "fixed context vector")
    if placement != "after" and given.get("input_feeding") is True:
        raise ConfigError("--input-feeding true (Luong's h~_{t-1} fed into the next step) needs "
                          "--attention-placement after; "
                          + ("with before, the context c_i already enters every step"
                             if placement == "before" else "the vanilla decoder has no h~"))


def rnn_s2s(args):
    """``--arch rnn_s2s``: every default from RNNS2SConfig. fairseq registers a function that does
    nothing for the model's own name; this one fills the same defaults and judges the switches
    the user gave, as the named architectures do."""
    _set_defaults(args)


# replaces fairseq's no-op for the model's own name (register_model_architecture refuses a
# second registration of a name)
ARCH_CONFIG_REGISTRY["rnn_s2s"] = rnn_s2s


@register_model_architecture("rnn_s2s", "rnn_bahdanau")
def rnn_bahdanau(args, **sizes):
    """Bahdanau et al. (2014): additive attention from the previous state, the context fed into
    the step. GRU, the paper's gated unit (its Appendix A.1.1) in PyTorch's form (the reset gate
    applied to U h + b, not to h: see decoder.gru_from_gates): measured on en-de at an equal CPU
    budget (examples/comparison.md), it also learns faster per update and per second than the
    LSTM at the same sizes (valid loss 5.59 against 5.99 after 8 minutes). Coverage (Tu et al.
    2016) is on wherever the score takes it (additive or concat, with attention): it keeps the
    decoder from dropping source words, and at an equal CPU budget it won on every pair measured
    (examples/comparison.md). ``--coverage false`` gives the plain model of the paper."""
    score = safe_getattr(args, "attention", None) or "additive"
    placement = safe_getattr(args, "attention_placement", None) or "before"
    coverage = str(score) in ADDITIVE_SCORES and str(placement) != "none"
    _set_defaults(args, attention_placement="before", attention="additive", rnn_type="gru",
                  coverage=coverage, **sizes)


@register_model_architecture("rnn_s2s", "rnn_luong")
def rnn_luong(args, **sizes):
    """Luong et al. (2015)'s global attention model (sec. 3.1): attention from the current state
    h_t, h~_t = tanh(W_c [c_t; h_t]) (eq. 5), the general score. Input feeding (sec. 3.3) is off:
    without it the decoder RNN runs over the whole target in one call, and at an equal CPU budget
    on en-fr it reached valid loss 4.97 against 5.51 with feeding after 8 minutes
    (examples/comparison.md); ``--input-feeding true`` gives it back (rnn_luong_paper has it).
    The cell is a GRU, not the paper's LSTM (rnn_luong_paper keeps the LSTM): at an equal CPU
    budget on en-de it learns faster at the same speed (valid loss 5.62 against 5.92 after 8
    minutes)."""
    _set_defaults(args, attention_placement="after", attention="general", input_feeding=False,
                  rnn_type="gru", **sizes)


@register_model_architecture("rnn_s2s", "rnn_vanilla")
def rnn_vanilla(args, **sizes):
    _set_defaults(args, attention_placement="none", **sizes)


@register_model_architecture("rnn_s2s", "rnn_bahdanau_paper")
def rnn_bahdanau_paper(args):
    """RNNsearch-50 (Bahdanau et al. 2014, Appendix A.2 and B.1): GRU (the paper's gated unit in
    PyTorch's form, see decoder.gru_from_gates),
    bidirectional encoder of 1000 units per direction, embeddings 620, decoder 1000, alignment
    model 1000 (n' = 1000), maxout deep output of l = 500 units over U_o s_{i-1} + V_o E y_{i-1}
    + C_o c_i, s_0 = tanh(W_s h<-_1). The paper uses no dropout; one layer each side."""
    _set_defaults(
        args, attention_placement="before", attention="additive", rnn_type="gru",
        encoder_bidirectional=True, encoder_layers=1, decoder_layers=1,
        encoder_embed_dim=620, decoder_embed_dim=620, encoder_hidden_size=1000,
        decoder_hidden_size=1000, attention_dim=1000, readout="maxout", maxout_dim=500,
        decoder_out_embed_dim=500, readout_state="previous", decoder_init="backward_first",
        encoder_dropout_in=0.0, encoder_dropout_out=0.0, decoder_dropout_in=0.0,
        decoder_dropout_out=0.0,
    )


@register_model_architecture("rnn_s2s", "rnn_luong_paper")
def rnn_luong_paper(args):
    """Luong et al. (2015)'s best single system (Table 1, 'local-p (general)' + feed input): stacked
    4-layer LSTMs of 1000 cells, 1000-dimensional embeddings, unidirectional encoder reading the
    source reversed, decoder started from the encoder's last state, input feeding, local-p
    attention with the general score and D = 10, dropout 0.2 (sec. 4.1). h~_t has 1000 units."""
    _set_defaults(
        args, attention_placement="after", attention="general", attention_mode="local-p",
        local_window=10, input_feeding=True, rnn_type="lstm", encoder_bidirectional=False,
        reverse_source=True, encoder_layers=4, decoder_layers=4, encoder_embed_dim=1000,
        decoder_embed_dim=1000, encoder_hidden_size=1000, decoder_hidden_size=1000,
        decoder_out_embed_dim=1000, attention_dim=1000, decoder_init="final",
        encoder_dropout_in=0.2, encoder_dropout_out=0.2, decoder_dropout_in=0.2,
        decoder_dropout_out=0.2,
    )


TINY = dict(
    encoder_embed_dim=32, encoder_hidden_size=32, decoder_embed_dim=32, decoder_hidden_size=64,
    decoder_out_embed_dim=32, attention_dim=32, encoder_dropout_in=0.1, encoder_dropout_out=0.1,
    decoder_dropout_in=0.1, decoder_dropout_out=0.1,
)


@register_model_architecture("rnn_s2s", "rnn_bahdanau_tiny")
def rnn_bahdanau_tiny(args):
    rnn_bahdanau(args, **TINY)


@register_model_architecture("rnn_s2s", "rnn_luong_tiny")
def rnn_luong_tiny(args):
    rnn_luong(args, **TINY)


@register_model_architecture("rnn_s2s", "rnn_vanilla_tiny")
def rnn_vanilla_tiny(args):
    rnn_vanilla(args, **TINY)
