"""fairseq_s2s_attn/hub.py's helpers (the Translator itself: tests/test_cli.py, trained models)."""

import random

import pytest

from fairseq_s2s_attn.hub import length_batches


def test_length_batches_group_similar_lengths_within_both_limits():
    """Forced decoding's batches (Translator.score): every index once, batches sorted by length
    (then by the second length), at most batch_size indices and max_tokens = indices x the
    longest length, a longer index alone. In input order one long pair made every pair of its
    batch run its length in steps."""
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(300)] + [659]
    second = [rng.randint(1, 60) for _ in lengths]
    for batch_size, max_tokens in ((64, 6000), (8, 10 ** 9), (1000, 100), (5, 1)):
        batches = length_batches(lengths, second, batch_size, max_tokens)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))
        keys = [(lengths[i], second[i]) for i in flat]
        assert keys == sorted(keys)
        for b in batches:
            longest = max(lengths[i] for i in b)
            assert len(b) <= batch_size
            assert len(b) * longest <= max_tokens or len(b) == 1
        # full batches: a batch ends only where the next index would break a limit
        for b, nxt in zip(batches, batches[1:]):
            assert len(b) == batch_size or (len(b) + 1) * lengths[nxt[0]] > max_tokens
    assert length_batches([], [], 4, 10) == []


@pytest.mark.parametrize("lengths", [[5, 5, 5], [3, 1, 2]])
def test_length_batches_keep_ties_in_input_order(lengths):
    assert [i for b in length_batches(lengths, [0] * len(lengths), 2, 100) for i in b] == \
        sorted(range(len(lengths)), key=lambda i: lengths[i])
