"""argparse types and argument checks shared by the scripts in this folder."""

import argparse
import os
import sys


def _number(text, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def at_least(low, kind=int):
    """argparse type: a number (kind: int or float) >= low, or one error line naming it."""
    def parse(text):
        v = _number(text, kind)
        if not v >= low:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text!r}")
        return v
    return parse


def above(low, kind=float):
    """argparse type: a number (kind: int or float) > low, or one error line naming it."""
    def parse(text):
        v = _number(text, kind)
        if not v > low:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be above {low}, got {text!r}")
        return v
    return parse


def folder_problem(path):
    """Why the folder `path` could not be made or written into, as words to follow the path in an
    error line, or None when it looks fine. Makes nothing, so that a script can check its output
    folder before any slow work; root can still be refused by a virtual or read-only file system
    (/proc), so the writes themselves must be checked too."""
    target = os.path.abspath(path)
    probe = target
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return "is a file, not a folder" if probe == target else f"cannot be made: {probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return "is not writable" if probe == target else f"cannot be made: {probe} is not writable"
    return None


def read_text_lines(parser, option, path):
    """The lines of a UTF-8 text file given as ``option`` (stripped), or one ``parser.error`` line
    naming the option: a missing file, a folder, bytes that are not UTF-8, a read error."""
    if os.path.isdir(path):
        parser.error(f"{option} {path}: a folder, not a file")
    if not os.path.isfile(path):
        parser.error(f"{option} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.strip() for ln in f]
    except UnicodeDecodeError as e:
        parser.error(f"{option} {path}: not UTF-8 text (byte {e.start}); give UTF-8 text")
    except OSError as e:
        parser.error(f"{option} {path}: cannot read ({e.strerror or e})")


def load_translator(parser, model_dir, checkpoint, data, spm_model=None, **kwargs):
    """fairseq_s2s_attn.hub.Translator.from_pretrained for a script, quietly (fairseq logs its
    whole training config, one line of ~8,000 characters, and its data loading at INFO; torch
    warns that fairseq's batch iterator asks for pinned memory on a machine without a GPU), or
    one ``parser.error`` line: a file given as --spm-model that is not a sentencepiece model, a
    missing checkpoint or model, a data-bin or model the translator refuses."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import logging
    import warnings

    logging.getLogger("fairseq").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true")
    from fairseq_s2s_attn.errors import S2SError
    from fairseq_s2s_attn.hub import Translator, check_sentencepiece_model

    # a missing --spm-model (or checkpoint) is the translator's error, below
    if spm_model is not None and os.path.isfile(spm_model):
        try:
            check_sentencepiece_model(spm_model)
        except S2SError:
            parser.error(f"--spm-model {spm_model} is not a sentencepiece model")
    try:
        return Translator.from_pretrained(model_dir, checkpoint, data=data, spm_model=spm_model,
                                          **kwargs)
    except S2SError as e:
        parser.error(str(e))
