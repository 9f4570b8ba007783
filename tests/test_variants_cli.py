"""Every attention variant (issue #3) through fairseq's command line: fairseq-train (1 epoch of a
tiny reversal corpus), then fairseq-generate with beam 5 and --print-alignment.

The variants are grouped so that six runs cover every option: each group combines options that
apply together. About 11 s per variant on one CPU core (most of it fairseq's start-up).
"""

import pytest
import torch

from clitools import REPO, make_reverse_data, parse_generate, run

pytestmark = pytest.mark.slow

USER_DIR = ("--user-dir", REPO / "fairseq_s2s_attn")
N_TEST = 20
PAPER_SIZES = ["--encoder-embed-dim", 16, "--decoder-embed-dim", 16, "--encoder-hidden-size", 16,
               "--decoder-hidden-size", 32, "--attention-dim", 16]

# name -> (arch, options, what the saved config must say)
VARIANTS = {
    # RNNsearch: GRU, s_0 = tanh(W_s h<-_1), maxout over s_{i-1}; plus normed Bahdanau + coverage
    "bahdanau_paper_normed_coverage": (
        "rnn_bahdanau_paper",
        PAPER_SIZES + ["--maxout-dim", 16, "--attention-normalize", "--coverage"],
        dict(decoder_init="backward_first", readout="maxout", readout_state="previous",
             rnn_type="gru", attention_normalize=True, coverage=True),
    ),
    # Luong's best: local-p general, input feeding, reversed source; plus the scaled score
    "luong_paper_scaled": (
        "rnn_luong_paper",
        PAPER_SIZES + ["--decoder-out-embed-dim", 16, "--encoder-hidden-size", 32,
                       "--encoder-layers", 2, "--decoder-layers", 2, "--local-window", 3,
                       "--attention-scale"],
        dict(attention_mode="local-p", attention="general", attention_scale=True,
             reverse_source=True, input_feeding=True),
    ),
    # location score with local-m, no input feeding (all steps batched)
    "luong_location_local_m": (
        "rnn_luong_tiny",
        ["--attention", "location", "--attention-mode", "local-m", "--local-window", 2,
         "--input-feeding", "false"],
        dict(attention="location", attention_mode="local-m", input_feeding=False),
    ),
    # concat + normalised + coverage without input feeding (coverage forces the step loop)
    "luong_concat_normed_coverage": (
        "rnn_luong_tiny",
        ["--attention", "concat", "--attention-normalize", "--coverage", "--input-feeding", "false"],
        dict(attention="concat", attention_normalize=True, coverage=True),
    ),
    # local attention before the RNN step, scaled dot
    "bahdanau_dot_scaled_local_p": (
        "rnn_bahdanau_tiny",
        ["--attention", "dot", "--attention-scale", "--attention-mode", "local-p",
         "--local-window", 2, "--decoder-init", "backward_first"],
        dict(attention="dot", attention_mode="local-p", decoder_init="backward_first"),
    ),
    # vanilla with Cho et al.'s maxout deep output over s_{i-1}
    "vanilla_maxout_previous": (
        "rnn_vanilla_tiny",
        ["--readout", "maxout", "--maxout-dim", 16, "--readout-state", "previous"],
        dict(readout="maxout", maxout_dim=16, readout_state="previous"),
    ),
}


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return make_reverse_data(tmp_path_factory.mktemp("variants"), train=300, max_len=8, vocab=10,
                             valid=20, test=N_TEST)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_and_decodes_with_beam_search(name, data_bin, tmp_path):
    arch, options, expect = VARIANTS[name]
    run("fairseq-train", data_bin, *USER_DIR, "--arch", arch, *options, "--optimizer", "adam",
        "--lr", 0.005, "--max-tokens", 1000, "--max-epoch", 1, "--save-dir", tmp_path,
        "--no-progress-bar", "--cpu", "--seed", 1, "--no-epoch-checkpoints")
    checkpoint = tmp_path / "checkpoint_last.pt"
    saved = torch.load(checkpoint, weights_only=True)["cfg"]["model"]
    for key, value in expect.items():
        assert saved[key] == value, (key, saved[key])

    gen = run("fairseq-generate", data_bin, *USER_DIR, "--path", checkpoint, "--beam", 5,
              "--print-alignment", "--cpu", "--batch-size", 8)
    res = parse_generate(gen.stdout)
    assert sorted(res["H"]) == list(range(N_TEST))
    assert "Generate test with beam=5: BLEU4" in gen.stdout
    for sid, src in res["S"].items():
        n_src, n_hyp = len(src.split()) + 1, len(res["H"][sid].split())
        pairs = [tuple(map(int, p.split("-"))) for p in res["A"].get(sid, "").split()]
        if arch == "rnn_vanilla_tiny":
            assert pairs == []
        else:
            assert len(pairs) == n_hyp and all(0 <= s < n_src and 0 <= t < n_hyp for s, t in pairs)
