"""argparse types and argument checks shared by the scripts in this folder."""

import argparse
import os


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
