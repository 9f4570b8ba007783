"""How the plugin replaces a function of fairseq (or of torch, argparse, sys): ``replaces``
(``replaces_property`` for a property's getter), or a line of one: ``rewrite_lines``.

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

Where the change is one line inside a long fairseq function, ``rewrite_lines`` changes that line
in fairseq's own function (its source recompiled, one line for one) instead of a copy of the
whole function (``search.search_lines_in_one_pass``).
"""

import ast
import functools
import inspect
import textwrap
import types
from typing import Any, Callable, Dict

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


def replaces_property(owner: type, name: str) -> Callable[[Callable], Callable]:
    """``replaces`` for the getter of a property of class ``owner``: ``fn(original, self)``
    becomes the getter (the property's setter and deleter stay), installed once as by
    ``replaces``."""

    def install(fn: Callable) -> Callable:
        prop = owner.__dict__[name]
        holder = types.SimpleNamespace(get=prop.fget)
        getter = replaces(holder, "get")(fn)
        if getter is not prop.fget:
            setattr(owner, name, property(getter, prop.fset, prop.fdel, prop.__doc__))
        return getter

    return install


def innermost(owner: Any, name: str) -> Callable:
    """``owner.name`` beneath every replacement (the ``__wrapped__`` chain): fairseq's own
    function, which the replacements call as their ``original``."""
    fn = getattr(owner, name)
    while getattr(fn, "__wrapped__", None) is not None:
        fn = fn.__wrapped__
    return fn


# attribute of a rewritten function: (its own code, the new code, the lines)
_REWRITTEN = "_s2s_rewritten"


def rewrite_lines(fn: Callable, lines: Dict[str, str]) -> bool:
    """For a change of one line inside a long fairseq function, where a replacement would have
    to copy the whole function: ``fn``'s code becomes that of its own source with each line
    whose text (indentation aside) is a key of ``lines`` replaced by the value, at the same
    indentation. One line for one, so every other line keeps its number in tracebacks (which
    show the file's text, the old line). The function object stays the same: every reference to
    it, e.g. the ``original`` that replacements hold, runs the new code.

    Returns False and leaves ``fn`` as it is where a new line holds a line break, its source
    cannot be read, a line is not found exactly once (another fairseq), or the new code would
    not be the same function with the lines changed: other arguments, other closure variables
    (``super()`` without arguments) or global names it no longer reads (a private name mangled
    in its class), and where ``fn`` was rewritten with other lines. True where ``fn`` runs the
    new code, also when it did already. ``use_rewritten_lines`` switches between the two."""
    if hasattr(fn, _REWRITTEN):  # one rewrite per function, with all its lines
        return getattr(fn, _REWRITTEN)[2] == lines
    if any("\n" in new for new in lines.values()):
        return False  # one line for one
    try:
        source, first = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        return False
    found = {old: [i for i, line in enumerate(source) if line.strip() == old] for old in lines}
    if any(len(at) != 1 for at in found.values()):
        return False
    for old, (i,) in found.items():
        indent = source[i][: len(source[i]) - len(source[i].lstrip())]
        source[i] = indent + lines[old] + "\n"
    try:
        tree = ast.parse(textwrap.dedent("".join(source)))
    except SyntaxError:
        return False
    node = tree.body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != fn.__name__:
        return False
    node.decorator_list = []  # they made the function object, which stays
    ast.increment_lineno(tree, first - 1)
    module_code = compile(tree, fn.__code__.co_filename, "exec")
    codes = [c for c in module_code.co_consts if isinstance(c, types.CodeType)]
    old_code = fn.__code__
    if len(codes) != 1:
        return False
    code = codes[0].replace(co_name=old_code.co_name)
    if hasattr(old_code, "co_qualname"):  # Python 3.11+
        code = code.replace(co_qualname=old_code.co_qualname)
    removed = {n for old in lines for n in _names(old)}
    if (code.co_freevars != old_code.co_freevars
            or code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
            != old_code.co_varnames[:old_code.co_argcount + old_code.co_kwonlyargcount]
            or code.co_flags != old_code.co_flags
            or not set(old_code.co_names) - removed <= set(code.co_names)):
        return False
    setattr(fn, _REWRITTEN, (old_code, code, dict(lines)))
    fn.__code__ = code
    return True


def _names(line: str) -> set:
    """The names a line of code reads (globals, attributes) as ``co_names`` lists them; the line
    may also be a call's arguments (``len(sizes), dtype=np.compat.long``)."""
    line = line.rstrip(",")
    for code, wrapper in ((line, set()), (f"_s2s_call({line})", {"_s2s_call"})):
        try:
            return set(compile(code, "<line>", "exec").co_names) - wrapper
        except SyntaxError:
            continue
    return set()


def use_rewritten_lines(fn: Callable, on: bool) -> None:
    """Whether a function changed by ``rewrite_lines`` runs its new code (True) or its own."""
    if hasattr(fn, _REWRITTEN):
        fn.__code__ = getattr(fn, _REWRITTEN)[on]
