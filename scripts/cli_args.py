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
