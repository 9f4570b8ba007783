"""argparse types shared by the scripts in this folder."""

import argparse


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
