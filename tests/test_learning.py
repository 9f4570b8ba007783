"""Learning: reversing random token sequences of length 1..30, trained with fairseq-train.

Attention models must reach >= 90% exact match within a few CPU minutes; the vanilla model,
with the same sizes and budget, must be clearly worse on the longest sequences (its fixed
context vector is the bottleneck). Bahdanau and Luong train concurrently, one core each.
"""

import subprocess

import pytest

from clitools import BIN, REPO, env, make_reverse_data, parse_generate, run

pytestmark = pytest.mark.slow

SIZES = [
    "--encoder-embed-dim", 64, "--decoder-embed-dim", 64, "--encoder-hidden-size", 64,
    "--decoder-hidden-size", 128, "--decoder-out-embed-dim", 64, "--attention-dim", 64,
    "--encoder-dropout-in", 0, "--encoder-dropout-out", 0,
    "--decoder-dropout-in", 0, "--decoder-dropout-out", 0,
]
BUDGET = [
    "--optimizer", "adam", "--lr", 0.005, "--lr-scheduler", "polynomial_decay",
    "--warmup-updates", 70, "--total-num-update", 700, "--max-update", 700,
    "--end-learning-rate", 0.0001, "--max-tokens", 1500, "--clip-norm", 1.0, "--seed", 2,
]
# 700 updates at lr 0.005 (2026-12-06, AMD EPYC; exact match overall / on 25..30 tokens):
# seed 2 Bahdanau 1.00 / 1.00, Luong 0.987 / 0.983, vanilla 0.17 / 0.00; seed 3 1.00 / 1.00,
# 0.983 / 0.966, 0.18 / 0.00; 105-112 s for the three trainings. The 1,000 updates at lr 0.003
# used before: 1.00, 0.967, 0.13 (seed 2) in 152 s; 500 updates at 0.005 left Luong at 0.92,
# 600 at 0.004 at 0.91, too near the threshold.
# Seed 1 was a slow trajectory for Bahdanau at the earlier budget (valid loss 0.13-0.19 after 1,000
# updates, against 0.02 with seeds 2 and 3): it landed at 0.97 or 0.89 exact match depending on
# fp32 rounding in the additive score's tanh (torch.tanh or 2 sigmoid(2x) - 1), on both sides of
# the threshold. Seeds 2 and 3 reached 1.00 with either.
LONG = 25  # "longest sequences": 25..30 tokens


def train_cmd(data_bin, arch, save_dir):
    return [str(BIN / "fairseq-train"), str(data_bin), "--user-dir", str(REPO / "fairseq_s2s_attn"),
            "--arch", arch, *map(str, SIZES + BUDGET), "--save-dir", str(save_dir), "--cpu",
            "--no-progress-bar", "--log-interval", "200", "--no-epoch-checkpoints"]


def exact_match(data_bin, checkpoint):
    gen = run("fairseq-generate", data_bin, "--user-dir", REPO / "fairseq_s2s_attn",
              "--path", checkpoint, "--beam", 1, "--batch-size", 128, "--cpu")
    res = parse_generate(gen.stdout)
    ids = sorted(res["T"])
    assert sorted(res["H"]) == ids

    def accuracy(subset):
        return sum(res["H"][i] == res["T"][i] for i in subset) / len(subset)

    long_ids = [i for i in ids if len(res["T"][i].split()) >= LONG]
    assert len(long_ids) >= 30
    return accuracy(ids), accuracy(long_ids)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    data_bin = make_reverse_data(root, train=20000, max_len=30, vocab=100, valid=200, test=300)

    def train(archs):
        procs = {a: subprocess.Popen(train_cmd(data_bin, a, root / a), env=env(), cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for a in archs}
        for arch, proc in procs.items():
            log, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, log[-4000:]

    train(["rnn_bahdanau", "rnn_luong"])
    train(["rnn_vanilla"])
    return {a: exact_match(data_bin, root / a / "checkpoint_best.pt")
            for a in ("rnn_bahdanau", "rnn_luong", "rnn_vanilla")}


@pytest.mark.parametrize("arch", ["rnn_bahdanau", "rnn_luong"])
def test_attention_models_learn_reversal(results, arch):
    overall, _ = results[arch]
    assert overall >= 0.90, results


def test_vanilla_is_clearly_worse_on_long_sequences(results):
    vanilla_long = results["rnn_vanilla"][1]
    for arch in ("rnn_bahdanau", "rnn_luong"):
        assert results[arch][1] >= vanilla_long + 0.4, results
