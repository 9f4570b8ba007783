"""Load a trained model and translate raw strings from Python (fairseq's ``from_pretrained``).

    from fairseq_s2s_attn.hub import Translator
    t = Translator.from_pretrained("work/demo/checkpoints/rnn_bahdanau", data="work/demo/data-bin",
                                   spm_model="work/demo/spm/spm.model")
    t.translate("Open file")                          # 'Datei öffnen'
    r = t.translate("Open file", return_attention=True)
    r.translation, r.source_pieces, r.target_pieces, r.attention   # attention: T_out x S_in
    t.score("Open file", "Datei öffnen")             # mean log-probability of its tokens
    r = t.score("Open file", "Öffne die Datei", return_attention=True)  # where the model looked

``RNNS2SModel.from_pretrained`` (fairseq's own hub interface) works too; this wrapper adds the
attention matrix with the source and output pieces it is indexed by, the scores of given
translations (forced decoding, as ``fairseq-generate --score-reference``), and checks its arguments
first (missing or unreadable files, a beam below 1, sources over the model's length limit), each
failure one error naming what to change. An ensemble: checkpoint files joined by ``os.pathsep``
("a.pt:b.pt"), as fairseq's ``--path`` takes them.
"""

import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
from fairseq import utils

from .errors import CheckpointError, ConfigError
from .inputs import (InputError, check_data_bin, check_pieces_cover, holds_pieces, is_pieces,
                     is_text_not_pieces)
from .model import RNNS2SModel
from .runtime import has_attention
from .unk import replace_unks


@dataclass
class Translation:
    translation: str
    # fairseq's hypothesis score: the sum of the output tokens' log-probabilities (natural log)
    # divided by their number to the power lenpen (1 by default); fairseq-generate and
    # fairseq-interactive print it in base 2
    score: float
    source_pieces: List[str]  # the source as the model saw it (subwords), ending in </s>
    target_pieces: List[str]  # the output, ending in </s>
    attention: Optional[torch.Tensor]  # len(target_pieces) x len(source_pieces); None for vanilla
    # the log-probability (natural log) of each of target_pieces when it was written
    token_scores: Optional[List[float]] = None


class Translator:
    def __init__(self, hub, spm_model: Optional[str] = None, target_spm_model: Optional[str] = None):
        self.hub = hub
        self.hub.eval()
        # whether the dictionaries hold sentencepiece pieces (input checks), read once
        self.reads_pieces = holds_pieces(hub.src_dict)
        self.writes_pieces = holds_pieces(hub.tgt_dict)
        # the sentencepiece models (paths): the hub's bpe (spm_model) encodes sources, and
        # translations too (Translator.score) unless the target side has its own
        self.spm_model, self.target_spm_model = spm_model, target_spm_model
        self._target_spm = None  # the target side's SentencePieceProcessor, made at first use
        self._target_checked = False  # the source's model checked for the target side

    @classmethod
    def from_pretrained(cls, model_dir: str, checkpoint_file: str = "checkpoint_best.pt",
                        data: Optional[str] = None, spm_model: Optional[str] = None,
                        target_spm_model: Optional[str] = None, **overrides):
        """model_dir holds the checkpoint; data is the data-bin with the dictionaries;
        spm_model the sentencepiece model the data was encoded with (None: sentences are given in
        the dictionary's units, e.g. pieces as spm_encode writes them); target_spm_model the
        target side's own model where it has one (prepare_data --separate: spm.<tgt>.model),
        with which ``score`` encodes translations."""
        for name in checkpoint_file.split(os.pathsep):
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"checkpoint not found: {path}")
        data = data or model_dir
        check_data_bin(data)  # fairseq's hub would take a file for an archive to unpack
        kwargs = dict(overrides)
        if spm_model is not None:
            check_sentencepiece_model(spm_model)
            kwargs.update(bpe="sentencepiece", sentencepiece_model=spm_model)
        hub = RNNS2SModel.from_pretrained(model_dir, checkpoint_file=checkpoint_file,
                                          data_name_or_path=data, **kwargs)
        if spm_model is not None:
            check_pieces_cover(hub.src_dict, hub.tgt_dict, spm_model)
        if target_spm_model is not None:
            if spm_model is None:
                raise ConfigError("target_spm_model is the target side's sentencepiece model: "
                                  "give the source side's as spm_model too")
            check_sentencepiece_model(target_spm_model)
            check_pieces_cover(hub.tgt_dict, None, target_spm_model, side="target")
        return cls(hub, spm_model, target_spm_model)

    def translate(self, sentences: Union[str, List[str]], beam: int = 5, return_attention: bool = False,
                  nbest: int = 1, replace_unk: Union[bool, Dict[str, str]] = False, **generate_args):
        """One sentence per string (any whitespace in it, newlines too, separates words): its
        translation, or a ``Translation`` with the attention; a list gives a list. With nbest > 1
        each sentence gives a list of its nbest best hypotheses, best first (nbest <= beam).
        replace_unk (fairseq's --replace-unk): True replaces each <unk> of the output by the
        source token (word or piece) most attended when it was written, a dict by that token's
        entry where it has one (Luong et al., 2015b). generate_args are fairseq's generation
        options, e.g. ``lm_path=``, ``lm_weight=`` for shallow fusion with a target-side language
        model (loaded once, ``fusion.py``), ``lenpen=``, ``sampling=True``."""
        if beam < 1:
            raise ConfigError(f"beam must be at least 1, got {beam}")
        if not 1 <= nbest <= beam:  # beam search keeps beam hypotheses; nbest was ignored before
            raise ConfigError(f"nbest must be between 1 and beam ({beam}), got {nbest}")
        if generate_args.get("score_reference"):  # fairseq's scorer needs the translations
            raise ConfigError("score_reference: give the translations to Translator.score("
                              "sources, translations)")
        single = isinstance(sentences, str)
        batch = [sentences] if single else list(sentences)
        encoded = self._encode(batch, "source")
        if replace_unk and not all(has_attention(m) for m in self.hub.models):
            warnings.warn("replace_unk: a model without attention (rnn_vanilla) has no alignment; "
                          "its <unk> stay")
        self._ask_attention(return_attention or bool(replace_unk))
        with warnings.catch_warnings():  # fairseq's batch iterator asks to pin memory, even on CPU
            warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true")
            hypos = self.hub.generate(encoded, beam=beam, **generate_args)
        lookup = replace_unk if isinstance(replace_unk, dict) else {}
        out = []
        for sentence, src, hyps in zip(batch, encoded, hypos):
            source = self._source_tokens(sentence) if replace_unk else None
            results = [self._result(src, h, return_attention, source, lookup) for h in hyps[:nbest]]
            out.append(results if nbest > 1 else results[0])
        return out[0] if single else out

    def score(self, sources: Union[str, List[str]], translations: Union[str, List[str]],
              return_attention: bool = False, batch_size: int = 64, max_tokens: int = 6000):
        """Forced decoding: how the model scores a given translation of each source, as
        ``fairseq-generate --score-reference`` does for a data-bin's references: the mean
        log-probability (natural log) of the translation's tokens, </s> included (a translation's
        ``score`` from ``translate``, whose hypotheses this reproduces; for an ensemble, of the
        models' mean probabilities). A pair of strings gives a float, lists a list. With
        return_attention, a ``Translation`` of the given translation with ``token_scores`` (where
        the model disagrees with it) and ``attention``: where the model looked while writing each
        given token, an alignment of the pair (None for rnn_vanilla). Texts are read as by
        ``translate`` (the same checks); a translation is scored in the pieces sentencepiece
        makes of it, which can differ from the pieces a model wrote for the same text.

        Pairs go through the model in batches of similar lengths, as fairseq-generate batches
        them: at most ``batch_size`` pairs and ``max_tokens`` target positions (rows times the
        longest translation), whose B x T x V log-probabilities are the largest tensor made;
        one longer pair goes alone. In input order, a 659-piece source with 127 short ones (128
        pairs) made 662 steps of a 128 x 659 attention."""
        from fairseq.data import LanguagePairDataset
        from fairseq.sequence_scorer import SequenceScorer

        for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        single = isinstance(sources, str)
        if single != isinstance(translations, str):
            raise ConfigError("sources and translations: two strings, or two lists")
        src_batch = [sources] if single else list(sources)
        tgt_batch = [translations] if single else list(translations)
        if len(src_batch) != len(tgt_batch):
            raise ConfigError(f"{len(src_batch)} sources and {len(tgt_batch)} translations: give "
                              "one translation per source")
        src, tgt = self._encode(src_batch, "source"), self._encode(tgt_batch, "translation")
        task = self.hub.task.cfg
        dataset = LanguagePairDataset(
            src, [len(s) for s in src], self.hub.src_dict, tgt, [len(t) for t in tgt],
            self.hub.tgt_dict, left_pad_source=task.left_pad_source, left_pad_target=False)
        scorer = SequenceScorer(self.hub.tgt_dict)
        self._ask_attention(return_attention)
        scored: List[Optional[dict]] = [None] * len(src)
        for ids in length_batches([len(t) for t in tgt], [len(s) for s in src], batch_size, max_tokens):
            sample = dataset.collater([dataset[i] for i in ids])
            sample = utils.apply_to_sample(lambda t: t.to(self.hub.device), sample)
            with torch.no_grad():
                hypos = scorer.generate(self.hub.models, sample)
            for i, hypo in zip(sample["id"].tolist(), hypos):  # the batch is sorted by length
                scored[i] = hypo[0]
        out = []
        for text, s, t, hyp in zip(tgt_batch, src, tgt, scored):
            if not return_attention:
                out.append(float(hyp["score"]))
                continue
            attn = hyp["attention"]  # T_batch x S_batch: the padded batch's rows and columns
            if attn is not None:
                attn = attn[:len(t)]
                attn = attn[:, attn.size(1) - len(s):] if task.left_pad_source else attn[:, :len(s)]
                attn = attn.float().cpu()
            out.append(Translation(
                translation=" ".join(text.split()), score=float(hyp["score"]),
                source_pieces=self.hub.src_dict.string(s).split() + ["</s>"],
                target_pieces=self.hub.tgt_dict.string(t).split() + ["</s>"],
                attention=attn, token_scores=hyp["positional_scores"].float().tolist()))
        return out[0] if single else out

    def _ask_attention(self, need: bool) -> None:
        """The models (prepared for inference) return attention only when asked for."""
        for model in self.hub.models:
            if hasattr(model.decoder, "need_attn"):
                model.decoder.need_attn = need

    def _encode(self, texts: List[str], side: str) -> List[torch.Tensor]:
        """Token ids of each text on one side ("source", or "translation" for the target), read
        as fairseq-interactive reads a line (tokenizer, bpe, the side's dictionary, </s>), or one
        error for a text the model cannot read (text for a model of pieces without spm_model, or
        pieces with it) or one over the model's length limit for that side."""
        what = "sentence" if side == "source" else side
        pieces_model = self.reads_pieces if side == "source" else self.writes_pieces
        if self.hub.bpe is None and pieces_model:  # no spm_model given
            text = [i for i, s in enumerate(texts) if is_text_not_pieces(s)]
            if text:  # its words would be read as <unk>s or other words' pieces
                raise InputError(
                    f"{what} {text[0]} is text, but the model reads sentencepiece pieces (its "
                    "dictionary's): load it with Translator.from_pretrained(..., spm_model=SPM), "
                    "the model the data-bin was made with, or give pieces")
        elif type(self.hub.bpe).__name__ == "SentencepieceBPE":  # pieces would be encoded again
            pieces = [i for i, s in enumerate(texts) if is_pieces(s)]
            if pieces:
                raise InputError(
                    f"{what} {pieces[0]} is in sentencepiece pieces already (it begins with "
                    "\u2581), and the translator's spm_model would encode them again: give text")
        # sentencepiece takes a newline or tab for a character of the word, not a word boundary
        if side == "source":
            encoded = [self.hub.encode(" ".join(s.split())) for s in texts]
        else:
            encode = self._target_encoder()
            encoded = [self.hub.tgt_dict.encode_line(encode(" ".join(s.split())),
                                                     add_if_not_exist=False).long() for s in texts]
        limit = self.hub.max_positions  # (source, target) limits, or one number
        limit = limit[0 if side == "source" else 1] if isinstance(limit, tuple) else limit
        too_long = [i for i, ids in enumerate(encoded) if limit is not None and len(ids) > limit]
        if too_long:
            i = too_long[0]
            # the location score (Luong sec. 3.1) has one weight row per source position: its
            # limit is the trained model's size, and a larger max_source_positions cannot load
            fixed = side == "source" and any(
                getattr(getattr(getattr(m, "decoder", None), "attention", None), "score_name",
                        None) == "location" for m in self.hub.models)
            option = "max_source_positions" if side == "source" else "max_target_positions"
            advice = ("the model's location attention has one weight per source position, so "
                      "split the sentence" if fixed else "load the model with "
                      f"Translator.from_pretrained(..., {option}=N) to raise it, or split the "
                      "sentence")
            raise InputError(
                f"{len(too_long)} {what}(s) longer than the model's limit: {what} {i} has "
                f"{len(encoded[i])} tokens (counting </s>), the limit is {limit}; {advice}")
        return encoded

    def _target_encoder(self):
        """text -> the target dictionary's units: the target side's sentencepiece model where
        one was given, else the translator's tokenizer and bpe (as sources are read). Separate
        dictionaries (prepare_data --separate) whose target side the source's model does not
        cover are one error naming target_spm_model (German encoded with an English model gave
        pieces the target dictionary lacks, read as <unk>)."""
        if self.target_spm_model is not None:
            if self._target_spm is None:
                import sentencepiece
                self._target_spm = sentencepiece.SentencePieceProcessor(model_file=self.target_spm_model)
            return lambda text: " ".join(self._target_spm.encode(text, out_type=str))
        if self.spm_model is not None and self.hub.tgt_dict.symbols != self.hub.src_dict.symbols \
                and not self._target_checked:
            try:
                check_pieces_cover(self.hub.tgt_dict, None, self.spm_model, side="target")
            except ConfigError as e:
                raise ConfigError(f"{e}; load the translator with "
                                  "Translator.from_pretrained(..., target_spm_model=SPM)") from None
            self._target_checked = True
        return lambda text: self.hub.apply_bpe(self.hub.tokenize(text))

    def _source_tokens(self, sentence: str) -> List[str]:
        """The source tokens as ``hub.encode`` reads them (after tokenizer and bpe), as strings:
        an unknown one is itself here, ``<unk>`` in the dictionary."""
        return self.hub.apply_bpe(self.hub.tokenize(" ".join(sentence.split()))).split()

    def _result(self, src: torch.Tensor, hyp: dict, return_attention: bool,
                source: Optional[List[str]] = None, lookup: Optional[Dict[str, str]] = None):
        """One hypothesis of fairseq's search as text, or as a Translation with its attention;
        with ``source``, its <unk> replaced through the attention."""
        attn = hyp.get("attention")  # S_batch x T_out: columns of the padded batch
        if attn is not None and attn.numel() > 0:
            n = len(src)
            extra = attn.size(0) - n  # padding positions (left by default) get zero weight
            attn = attn[extra:] if not attn[:extra].any() else attn[:n]
            attn = attn.t().float().cpu()  # T_out x S_in
        else:
            attn = None
        if source is not None:
            pieces = self.hub.tgt_dict.string(hyp["tokens"]).split()
            # fairseq's hard alignment (the most attended source token of each output token, </s>
            # aside; none for an empty source), as fairseq-interactive's --replace-unk reads it
            d = self.hub.tgt_dict
            aligned = [] if attn is None else utils.extract_hard_alignment(
                attn, src.cpu(), hyp["tokens"].cpu(), d.pad(), d.eos())
            pieces = replace_unks(pieces, source, aligned, lookup or {}, self.hub.tgt_dict.unk_string())
            text = self.hub.detokenize(self.hub.remove_bpe(" ".join(pieces)))
        else:
            text = self.hub.decode(hyp["tokens"])
        if not return_attention:
            return text
        return Translation(
            translation=text,
            score=float(hyp["score"]),
            source_pieces=self.hub.src_dict.string(src).split() + ["</s>"],
            target_pieces=self.hub.tgt_dict.string(hyp["tokens"]).split() + ["</s>"],
            attention=attn,
            token_scores=hyp["positional_scores"].float().tolist(),
        )


def length_batches(lengths: List[int], second: List[int], batch_size: int,
                   max_tokens: int) -> List[List[int]]:
    """Indices in batches of similar length: sorted by ``lengths`` (then ``second``), each batch
    at most ``batch_size`` indices and ``max_tokens`` = indices x the batch's longest length (an
    index longer than that alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], second[i]))
    batches: List[List[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if last is None or len(last) >= batch_size or (len(last) + 1) * lengths[i] > max_tokens:
            batches.append([i])
        else:
            last.append(i)
    return batches


def check_sentencepiece_model(path: str) -> None:
    """A readable sentencepiece model at path, or one error naming the file."""
    import sentencepiece

    if not os.path.isfile(path):
        raise CheckpointError(f"sentencepiece model not found: {path}")
    try:
        sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot read sentencepiece model {path}: {str(e).strip()[:160]}") from None
