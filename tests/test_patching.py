"""fairseq_s2s_attn.patching: how the plugin replaces fairseq's functions, or a line of one."""

import inspect
import types

import numpy as np
import pytest

import fairseq_s2s_attn  # noqa: F401  (installs the plugin's replacements)
from fairseq_s2s_attn.patching import (innermost, replaces, replaces_property, rewrite_lines,
                                       use_rewritten_lines)


def _chain(fn):
    """The replacements' keys from the outermost function to the replaced original (None)."""
    keys = []
    while fn is not None:
        keys.append(getattr(fn, "_s2s_replacement", None))
        fn = getattr(fn, "__wrapped__", None)
    return keys


def _owner():
    def greet(name, punctuation="."):
        """Greets."""
        return f"hello {name}{punctuation}"

    return types.SimpleNamespace(greet=greet)


def _install_shout(owner):
    @replaces(owner, "greet")
    def greet(original, name, punctuation="."):
        return original(name, punctuation).upper()

    return greet


def _install_exclaim(owner):
    @replaces(owner, "greet")
    def greet(original, name, punctuation="."):
        return original(name, "!")

    return greet


def test_replacement_receives_the_original_and_keeps_its_name():
    owner = _owner()
    installed_fn = _install_shout(owner)
    assert owner.greet is installed_fn
    assert owner.greet("ann", punctuation="?") == "HELLO ANN?"
    assert owner.greet.__name__ == "greet" and owner.greet.__doc__ == "Greets."


def test_installing_twice_changes_nothing():
    owner = _owner()
    first = _install_shout(owner)
    assert _install_shout(owner) is first
    assert owner.greet("ann") == "HELLO ANN."


def test_a_replacement_under_another_is_not_installed_again():
    # the idiom this replaces looked at the outermost function only: shout, exclaim, shout
    # again gave shout(exclaim(shout(...)))
    owner = _owner()
    _install_shout(owner)
    outer = _install_exclaim(owner)
    assert owner.greet("ann") == "HELLO ANN!"
    assert _install_shout(owner) is outer
    assert owner.greet is outer and len(_chain(owner.greet)) == 3  # exclaim, shout, original
    assert owner.greet("ann") == "HELLO ANN!"


def test_the_plugins_replacements_are_each_installed_once():
    from fairseq.sequence_generator import SequenceGenerator

    from fairseq_s2s_attn import inputs, precision, runtime, search

    before = _chain(SequenceGenerator._generate)
    # four of the plugin's changes wrap fairseq's _generate; installing them again is a no-op
    inputs.empty_sources_translate_to_empty()
    precision.generate_in_one_autocast_region()
    runtime.beam_search_keeps_sentence_runs()
    search.lm_steps_incremental()
    after = _chain(SequenceGenerator._generate)
    assert after == before
    ours = [name for name in after if name]
    assert len(ours) == len(set(ours)) == 4
    assert after[-1] is None  # fairseq's own, at the end of the chain


def _count(words):
    """Counts."""
    total = 0
    for word in words:
        total += len(word)
    return total


def _lengths(words):
    total = 0
    for word in words:
        total += len(word)
    return total


def _count_twice(words):
    total = 0
    for word in words:
        total += len(word)
    for word in words:
        total += len(word)
    return total


class _Base:
    def size(self):
        return 1


class _Sized(_Base):
    def size(self):
        total = 0
        total += super().size()
        return total


class _Private:
    def __init__(self):
        self.__n = 2

    def n(self):
        value = self.__n
        return value


def _zeros(words):
    return np.zeros(
        len(words), dtype=np.compat.long
    )


def _raises(word):
    value = len(word)
    raise ValueError(value)


def test_rewrite_lines_changes_a_line_of_the_function_in_place():
    owner = types.SimpleNamespace(count=_count)
    outer = _install_count_words(owner)  # a replacement holds the original
    assert owner.count(["ab", "c"]) == 3
    assert rewrite_lines(_count, {"total += len(word)": "total += 1"})
    assert owner.count is outer and innermost(owner, "count") is _count  # the same objects
    assert owner.count(["ab", "c"]) == 2 and _count(["ab", "c"]) == 2
    assert _count.__name__ == "_count" and _count.__doc__ == "Counts."
    assert rewrite_lines(_count, {"total += len(word)": "total += 1"})  # again: nothing more
    assert not rewrite_lines(_count, {"total = 0": "total = 1"})  # other lines: refused
    assert _count(["ab", "c"]) == 2
    use_rewritten_lines(_count, False)
    assert _count(["ab", "c"]) == 3
    use_rewritten_lines(_count, True)
    assert _count(["ab", "c"]) == 2
    use_rewritten_lines(_count, False)


def _install_count_words(owner):
    @replaces(owner, "count")
    def count(original, words):
        return original(list(words))

    return count


def test_replaces_property_wraps_the_getter_once():
    class Box:
        def __init__(self):
            self._v = 2

        @property
        def value(self):
            """The value."""
            return self._v

        @value.setter
        def value(self, v):
            self._v = v

    def doubled(original, self):
        return 2 * original(self)

    getter = replaces_property(Box, "value")(doubled)
    assert replaces_property(Box, "value")(doubled) is getter  # again: nothing more
    box = Box()
    assert box.value == 4
    box.value = 5  # the setter stays
    assert box.value == 10 and Box.value.__doc__ == "The value."
    assert innermost(types.SimpleNamespace(get=Box.value.fget), "get")(box) == 5


def test_rewrite_lines_of_a_call_s_arguments():
    """A line that is part of a call (fairseq's ``len(sizes), dtype=np.compat.long``, numpy 1's
    name): the names it stops reading (compat, long) are the line's, not names the new function
    lost elsewhere, so the line is rewritten (it was refused: the line alone is no statement)."""
    old = set(_zeros.__code__.co_names)
    assert {"compat", "long"} <= old
    assert rewrite_lines(_zeros, {"len(words), dtype=np.compat.long": "len(words), dtype=int"})
    try:
        assert not {"compat", "long"} & set(_zeros.__code__.co_names)
        assert _zeros(["a", "b"]).tolist() == [0, 0]  # numpy 2: np.compat is gone
    finally:
        use_rewritten_lines(_zeros, False)


def test_rewritten_lines_keep_their_numbers_in_tracebacks():
    line = inspect.getsourcelines(_raises)[1] + 2  # the raise
    assert rewrite_lines(_raises, {"value = len(word)": "value = word.upper()"})
    try:
        with pytest.raises(ValueError, match="AB") as info:
            _raises("ab")
        assert info.traceback[-1].lineno + 1 == line  # pytest counts from 0
        assert info.traceback[-1].path.samefile(__file__)
    finally:
        use_rewritten_lines(_raises, False)


@pytest.mark.parametrize("fn,lines", [
    (_lengths, {"total = len(words)": "total = 0"}),  # not in the function
    (_count_twice, {"total += len(word)": "total += 1"}),  # twice
    (_Sized.size, {"total = 0": "total = 1"}),  # super() needs the class's cell
    (_Private.n, {"return value": "return value + 1"}),  # self.__n is mangled in the class
    (_lengths, {"total = 0": "total = len(words"}),  # not Python
    (_lengths, {"total = 0": "total = 0\n    total += 1"}),  # two lines for one
    (len, {"a": "b"}),  # no source
])
def test_rewrite_lines_leaves_what_it_cannot_change_as_it_is(fn, lines):
    code = getattr(fn, "__code__", None)
    assert not rewrite_lines(fn, lines)
    assert getattr(fn, "__code__", None) is code
    use_rewritten_lines(fn, True)  # nothing to switch to
    assert getattr(fn, "__code__", None) is code
    assert _lengths(["ab"]) == 2 and _count_twice(["ab"]) == 4 and _Sized().size() == 1
    assert _Private().n() == 2
