"""How the plugin replaces a function of fairseq (or of torch, argparse, sys): ``replaces``.

Every change to fairseq's behaviour (see ``runtime``, ``inputs``, ``precision``,
``distributed``) is a function that receives what it replaces as its first argument and calls it
where fairseq's behaviour stays::

    @replaces(SequenceGenerator, "_generate")
    def _generate(original, self, *args, **kwargs):
        with encoder.sentence_runs():
            return original(self, *args, **kwargs)

Installing the same replacement again (the plugin imported twice, a test calling an install
function) does nothing, also when other replacements of the same attribute were installed on top
of it since: the chain of replacements (``__wrapped__``) is searched, not only the outermost.
"""

import functools
from typing import Any, Callable

_KEY = "_s2s_replacement"


def _key(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def installed(owner: Any, name: str, fn: Callable) -> bool:
    """Whether ``fn`` (by module and qualified name) is among the replacements of owner.name."""
    current, key = getattr(owner, name, None), _key(fn)
    while current is not None:
        if getattr(current, _KEY, None) == key:
            return True
        current = getattr(current, "__wrapped__", None)
    return False


def replaces(owner: Any, name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``owner.name`` becomes ``lambda *a, **k: fn(original, *a, **k)``, where
    ``original`` is what ``owner.name`` was; the decorator returns what is installed (or, if
    ``fn`` is installed already, what ``owner.name`` is)."""

    def install(fn: Callable) -> Callable:
        if installed(owner, name, fn):
            return getattr(owner, name)
        original = getattr(owner, name)

        def replacement(*args, **kwargs):
            return fn(original, *args, **kwargs)

        # the name and docstring of the replaced function (help, tracebacks), and __wrapped__
        functools.update_wrapper(replacement, original, updated=())
        setattr(replacement, _KEY, _key(fn))
        setattr(owner, name, replacement)
        return replacement

    return install
