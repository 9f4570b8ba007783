"""fairseq_s2s_attn.patching: how the plugin replaces fairseq's functions."""

import types

import fairseq_s2s_attn  # noqa: F401  (installs the plugin's replacements)
from fairseq_s2s_attn.patching import replaces


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

    from fairseq_s2s_attn import inputs, precision, runtime

    before = _chain(SequenceGenerator._generate)
    # three of the plugin's changes wrap fairseq's _generate; installing them again is a no-op
    inputs.empty_sources_translate_to_empty()
    precision.generate_in_one_autocast_region()
    runtime.beam_search_keeps_sentence_runs()
    after = _chain(SequenceGenerator._generate)
    assert after == before
    ours = [name for name in after if name]
    assert len(ours) == len(set(ours)) == 3
    assert after[-1] is None  # fairseq's own, at the end of the chain
