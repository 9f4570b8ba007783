"""Shared small fixtures: a tiny dictionary, a fake task and a model builder.

Models are built the way fairseq builds them: a namespace filled by one of the architecture
functions registered in ``fairseq_s2s_attn.model``, then ``RNNS2SModel.build_model(cfg, task)``.
"""

import argparse
import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402

import fairseq_s2s_attn  # noqa: E402,F401  (registers the model and architectures)
from fairseq_s2s_attn import model as s2s_model  # noqa: E402
from fairseq_s2s_attn.model import RNNS2SModel  # noqa: E402

torch.set_num_threads(1)

ARCH_FNS = {
    "rnn_vanilla": s2s_model.rnn_vanilla,
    "rnn_bahdanau": s2s_model.rnn_bahdanau,
    "rnn_luong": s2s_model.rnn_luong,
    "rnn_vanilla_tiny": s2s_model.rnn_vanilla_tiny,
    "rnn_bahdanau_tiny": s2s_model.rnn_bahdanau_tiny,
    "rnn_luong_tiny": s2s_model.rnn_luong_tiny,
    "rnn_bahdanau_paper": s2s_model.rnn_bahdanau_paper,
    "rnn_luong_paper": s2s_model.rnn_luong_paper,
}

# the paper architectures at sizes small enough for unit tests (their other settings unchanged)
PAPER_TINY = {
    "rnn_bahdanau_paper": dict(encoder_embed_dim=12, decoder_embed_dim=10, encoder_hidden_size=16,
                               decoder_hidden_size=20, attention_dim=14, maxout_dim=9),
    "rnn_luong_paper": dict(encoder_embed_dim=12, decoder_embed_dim=10, encoder_hidden_size=20,
                            decoder_hidden_size=20, decoder_out_embed_dim=11, attention_dim=14,
                            encoder_layers=2, decoder_layers=2, local_window=2),
}

# dropout off: outputs are deterministic and every parameter gets a gradient
NO_DROPOUT = dict(
    encoder_dropout_in=0.0, encoder_dropout_out=0.0, decoder_dropout_in=0.0, decoder_dropout_out=0.0
)


def make_dict(n_words: int = 12, prefix: str = "w") -> Dictionary:
    d = Dictionary()
    for i in range(n_words):
        d.add_symbol(f"{prefix}{i}")
    d.finalize(padding_factor=1)
    return d


class FakeTask:
    """What build_model needs from a task: the two dictionaries."""

    def __init__(self, src_dict: Dictionary, tgt_dict: Dictionary):
        self._src, self._tgt = src_dict, tgt_dict

    @property
    def source_dictionary(self):
        return self._src

    @property
    def target_dictionary(self):
        return self._tgt


def make_args(arch: str = "rnn_bahdanau_tiny", dropout: bool = False, **overrides):
    """Namespace as fairseq would hand it to build_model: user options, then the architecture."""
    values = dict(overrides)
    if not dropout:
        for k, v in NO_DROPOUT.items():
            values.setdefault(k, v)
    args = argparse.Namespace(arch=arch, **values)
    ARCH_FNS[arch](args)
    return args


# Weights drawn from U(-INIT_RANGE, INIT_RANGE): with the default initialisation a tiny untrained
# model attends almost uniformly (weights within 1e-3 of 1/S), which would hide errors in which
# state or key the attention uses. Larger weights give peaked attention and distinct logits.
INIT_RANGE = 0.7


def build_model(arch: str = "rnn_bahdanau_tiny", task=None, seed: int = 0, dropout: bool = False,
                init_range: float = INIT_RANGE, dtype: torch.dtype = torch.float32, **overrides):
    """RNNS2SModel as fairseq builds it (architecture function, then build_model).

    Dropout is off unless ``dropout`` (then the architecture's own values apply); weights start
    from U(-init_range, init_range) (the model option --init-range; 0: PyTorch's defaults).
    Equality checks between code paths (incremental vs full, fused step vs nn.LSTM) build fp64
    models, so they test the math, not fp32 rounding of differently blocked products.
    """
    torch.manual_seed(seed)
    if task is None:
        d = make_dict()
        task = FakeTask(d, d)
    args = make_args(arch, dropout=dropout, init_range=init_range, **overrides)
    return RNNS2SModel.build_model(args, task).to(dtype)


def inference_cfg(bf16: bool = False, fp16: bool = False, print_alignment: bool = False):
    """The parts of fairseq-generate's config that ``prepare_for_inference_`` reads."""
    return argparse.Namespace(common=argparse.Namespace(bf16=bf16, fp16=fp16),
                              generation=argparse.Namespace(beam=3, print_alignment=print_alignment))


def count_calls(monkeypatch, module, name: str) -> list:
    """Replaces ``module.name`` (an operator the code looks up there at each call) by a wrapper
    that counts its calls; returns the count, a one-element list the tests read and reset."""
    count = [0]
    op = getattr(module, name)

    def counted(*args):
        count[0] += 1
        return op(*args)

    monkeypatch.setattr(module, name, counted)
    return count


def random_tokens(d: Dictionary, lengths, left_pad: bool, generator=None, with_eos: bool = True):
    """B x max(lengths) tokens of d (no special symbols except a final eos), padded left or right."""
    bsz, width = len(lengths), max(lengths)
    out = torch.full((bsz, width), d.pad(), dtype=torch.long)
    for b, n in enumerate(lengths):
        words = torch.randint(d.nspecial, len(d), (n,), generator=generator)
        if with_eos:
            words[-1] = d.eos()
        if left_pad:
            out[b, width - n:] = words
        else:
            out[b, :n] = words
    return out


class Scale(torch.nn.Module):
    """Deterministic stand-in for a FairseqDropout module in training: multiplies by a constant,
    so a missing (or extra) application of dropout changes the output exactly, where real
    dropout would only change a random draw."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x, inplace: bool = False):
        return x * self.factor


# Test files that take longest, longest first (seconds in one `make test` on 2 workers, AMD EPYC,
# 2026-12-06: test_cli 258, test_learning 157, test_benchmark 157, test_reliability 145,
# test_distributed 118, test_hydra 110, test_compare 91, test_variants_cli 84, test_precision 74,
# test_runtime 60; every other file 35 or less). `make test` hands whole files to its 2 workers in
# collection order (--dist loadfile --no-loadscope-reorder), so running these first leaves short
# files for the end. pytest-xdist's own order (files with the most tests first) started the
# reversal-learning file (3 tests, one 157 s fixture) late, and one worker idled while the other
# finished it.
LONGEST_FIRST = ("test_cli.py", "test_learning.py", "test_benchmark.py", "test_reliability.py",
                 "test_distributed.py", "test_hydra.py", "test_compare.py", "test_variants_cli.py",
                 "test_precision.py", "test_runtime.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


@pytest.fixture
def tiny_dict():
    return make_dict()


@pytest.fixture
def tiny_task(tiny_dict):
    return FakeTask(tiny_dict, tiny_dict)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def small_data_bin(tmp_path_factory):
    """A small binarised reversal corpus (200 training pairs, up to 8 words, 10 words + specials)
    for command-line tests that train a few updates."""
    from clitools import make_reverse_data

    return make_reverse_data(tmp_path_factory.mktemp("small"), train=200, max_len=8, vocab=10,
                             valid=20, test=20)


def padding_mask(lengths, width: int, left: bool) -> torch.Tensor:
    """B x width padding masks (True at padding) for rows of the given lengths, padded left or right."""
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            mask[b, : width - n] = True
        else:
            mask[b, n:] = True
    return mask


def enabled_in_a_fresh_process(module: str, variable: str, value) -> str:
    """``fairseq_s2s_attn.<module>.ENABLED`` as a fresh interpreter sees it, with the environment
    variable set to value (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != variable}
    if value is not None:
        env[variable] = value
    code = f"import fairseq_s2s_attn.{module} as m; print(m.ENABLED)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()
