"""Load a trained model and translate raw strings from Python (fairseq's ``from_pretrained``).

    from fairseq_s2s_attn.hub import Translator
    t = Translator.from_pretrained("work/demo/checkpoints", data="work/demo/data-bin",
                                   spm_model="work/demo/spm/spm.model")
    t.translate("Open file")                          # 'Datei öffnen'
    r = t.translate("Open file", return_attention=True)
    r.translation, r.source_pieces, r.target_pieces, r.attention   # attention: T_out x S_in

``RNNS2SModel.from_pretrained`` (fairseq's own hub interface) works too; this wrapper adds the
attention matrix with the source and output pieces it is indexed by.
"""

import os
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from .errors import CheckpointError
from .model import RNNS2SModel


@dataclass
class Translation:
    translation: str
    score: float
    source_pieces: List[str]  # the source as the model saw it (subwords), ending in </s>
    target_pieces: List[str]  # the output, ending in </s>
    attention: Optional[torch.Tensor]  # len(target_pieces) x len(source_pieces); None for vanilla


class Translator:
    def __init__(self, hub):
        self.hub = hub
        self.hub.eval()

    @classmethod
    def from_pretrained(cls, model_dir: str, checkpoint_file: str = "checkpoint_best.pt",
                        data: Optional[str] = None, spm_model: Optional[str] = None, **overrides):
        """model_dir holds the checkpoint; data is the data-bin with the dictionaries;
        spm_model the sentencepiece model the data was encoded with (None: text is pre-tokenised)."""
        path = os.path.join(model_dir, checkpoint_file)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint not found: {path}")
        kwargs = dict(overrides)
        if spm_model is not None:
            if not os.path.isfile(spm_model):
                raise CheckpointError(f"sentencepiece model not found: {spm_model}")
            kwargs.update(bpe="sentencepiece", sentencepiece_model=spm_model)
        hub = RNNS2SModel.from_pretrained(model_dir, checkpoint_file=checkpoint_file,
                                          data_name_or_path=data or model_dir, **kwargs)
        return cls(hub)

    def translate(self, sentences: Union[str, List[str]], beam: int = 5, return_attention: bool = False,
                  **generate_args):
        single = isinstance(sentences, str)
        batch = [sentences] if single else list(sentences)
        encoded = [self.hub.encode(s) for s in batch]
        for model in self.hub.models:  # prepared for inference: attention only when asked for
            if hasattr(model.decoder, "need_attn"):
                model.decoder.need_attn = return_attention
        hypos = self.hub.generate(encoded, beam=beam, **generate_args)
        out = []
        for src, hyps in zip(encoded, hypos):
            best = hyps[0]
            text = self.hub.decode(best["tokens"])
            if not return_attention:
                out.append(text)
                continue
            attn = best.get("attention")  # S_batch x T_out: columns of the padded batch
            if attn is not None and attn.numel() > 0:
                n = len(src)
                extra = attn.size(0) - n  # padding positions (left by default) get zero weight
                attn = attn[extra:] if not attn[:extra].any() else attn[:n]
                attn = attn.t().float().cpu()  # T_out x S_in
            else:
                attn = None
            out.append(Translation(
                translation=text,
                score=float(best["score"]),
                source_pieces=self.hub.src_dict.string(src).split() + ["</s>"],
                target_pieces=self.hub.tgt_dict.string(best["tokens"]).split() + ["</s>"],
                attention=attn,
            ))
        return out[0] if single else out
