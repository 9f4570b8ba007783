"""fairseq_s2s_attn/fusion.py: shallow fusion (--lm-path LM --lm-weight W) in fairseq-generate,
fairseq-interactive and the hub, with a language model trained as a user would on the target
side of a data-bin of fairseq-preprocess (which holds no dict.txt)."""

import math
import shutil

import pytest
import torch

from clitools import REPO, one_error_line, parse_generate, run

pytestmark = pytest.mark.slow

USER_DIR = ("--user-dir", REPO / "fairseq_s2s_attn")
SENTENCES = ["w1 w2 w3", "w4 w5", "w6 w1 w7 w2 w3", "w8", "w2 w2 w9 w4"]
WEIGHT = 1.5  # large: the language model changes hypotheses, not only scores


@pytest.fixture(scope="module")
def trained(small_data_bin, tmp_path_factory):
    """(translation checkpoint, language model checkpoint): rnn_bahdanau_tiny on the small
    reversal corpus, and a one-layer transformer_lm on its target side, binarized with the
    translation's target dictionary as the README says."""
    root = tmp_path_factory.mktemp("fusion")
    raw = small_data_bin.parent / "raw"
    run("fairseq-train", small_data_bin, *USER_DIR, "--arch", "rnn_bahdanau_tiny", "--optimizer",
        "adam", "--lr", "0.01", "--max-tokens", 1000, "--max-epoch", 30, "--save-dir",
        root / "mt", "--no-progress-bar", "--cpu", "--seed", 3)
    run("fairseq-preprocess", "--only-source", "--srcdict", small_data_bin / "dict.tgt.txt",
        "--trainpref", raw / "train.tgt", "--validpref", raw / "valid.tgt", "--destdir",
        root / "lm-bin", "--workers", 1)
    run("fairseq-train", root / "lm-bin", *USER_DIR, "--task", "language_modeling", "--arch",
        "transformer_lm", "--decoder-layers", 1, "--decoder-embed-dim", 16,
        "--decoder-ffn-embed-dim", 32, "--decoder-attention-heads", 2, "--tokens-per-sample", 16,
        "--sample-break-mode", "eos", "--optimizer", "adam", "--lr", "0.01", "--max-tokens", 400,
        "--max-update", 40, "--save-dir", root / "lm", "--no-progress-bar", "--cpu", "--seed", 3)
    assert not (small_data_bin / "dict.txt").exists()
    return root / "mt" / "checkpoint_best.pt", root / "lm" / "checkpoint_best.pt"


def generate(data_bin, mt, *args, check=True):
    return run("fairseq-generate", data_bin, *USER_DIR, "--path", mt, "--beam", 4, "--cpu",
               "--batch-size", 8, *args, check=check)


def interactive(data_bin, mt, *args, check=True):
    return run("fairseq-interactive", data_bin, *USER_DIR, "--path", mt, "--beam", 4, "--cpu",
               "--source-lang", "src", "--target-lang", "tgt", *args,
               input="\n".join(SENTENCES) + "\n", check=check)


def scored(stdout):
    """{id: (hypothesis, score in base 2)} of fairseq's H- lines."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("H-"):
            head, score, text = line.split("\t")
            out[int(head[2:])] = (text, float(score))
    return out


def test_generate_fuses_with_the_target_dictionary(small_data_bin, trained):
    """fairseq-generate --lm-path died on a data-bin of fairseq-preprocess ("dict.txt: No such
    file or directory"): the language model now reads dict.tgt.txt there, and fusion changes
    the translations."""
    mt, lm = trained
    plain = parse_generate(generate(small_data_bin, mt).stdout)
    proc = generate(small_data_bin, mt, "--lm-path", lm, "--lm-weight", WEIGHT)
    fused = parse_generate(proc.stdout)
    assert fused["H"].keys() == plain["H"].keys() and len(fused["H"]) == 20
    assert sum(fused["H"][i] != plain["H"][i] for i in plain["H"]) >= 2
    assert "dict.tgt.txt (" in proc.stdout  # the info line naming the dictionary taken


def test_interactive_and_the_hub_fuse_as_generate(small_data_bin, trained, tmp_path):
    """fairseq-interactive --lm-path and the hub's translate(lm_path=) translated without the
    language model (only fairseq-generate's main loads it); now they fuse as fairseq-generate
    does: the same hypotheses and scores for the same sentences."""
    from fairseq_s2s_attn.hub import Translator

    mt, lm = trained
    # the same sentences as a data-bin for fairseq-generate (one batch, in the input order)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "test.src").write_text("\n".join(SENTENCES) + "\n")
    (raw / "test.tgt").write_text("\n".join(SENTENCES) + "\n")
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--testpref",
        raw / "test", "--destdir", tmp_path / "bin", "--srcdict", small_data_bin / "dict.src.txt",
        "--tgtdict", small_data_bin / "dict.tgt.txt", "--workers", 1)
    want = scored(generate(tmp_path / "bin", mt, "--lm-path", lm, "--lm-weight", WEIGHT).stdout)
    plain = scored(interactive(small_data_bin, mt).stdout)
    got = scored(interactive(small_data_bin, mt, "--lm-path", lm, "--lm-weight", WEIGHT).stdout)
    assert [got[i][0] for i in range(5)] == [want[i][0] for i in range(5)]
    for i in range(5):
        assert got[i][1] == pytest.approx(want[i][1], abs=1e-3)
    assert [got[i] for i in range(5)] != [plain[i] for i in range(5)]

    t = Translator.from_pretrained(str(mt.parent), data=str(small_data_bin))
    hub = t.translate(SENTENCES, beam=4, return_attention=True, lm_path=str(lm), lm_weight=WEIGHT)
    assert [h.translation for h in hub] == [want[i][0] for i in range(5)]
    for i, h in enumerate(hub):
        assert h.score / math.log(2) == pytest.approx(want[i][1], abs=1e-3)
    loaded = t.hub.task._s2s_fusion_lm[1]
    again = t.translate(SENTENCES, beam=4, lm_path=str(lm), lm_weight=WEIGHT)
    assert again == [h.translation for h in hub] and t.hub.task._s2s_fusion_lm[1] is loaded
    assert t.translate(SENTENCES, beam=4) == [plain[i][0] for i in range(5)]


def test_language_model_errors_are_one_line(small_data_bin, trained, tmp_path):
    """A language model that does not fit the target dictionary, a weight of 0 (fairseq's
    default, which ran the language model for nothing), or --score-reference, whose scorer
    ignored it: one error line, in each command."""
    mt, lm = trained
    for command in (generate, interactive):
        proc = command(small_data_bin, mt, "--lm-path", lm, check=False)
        one_error_line(proc, "--lm-path needs --lm-weight")
    proc = interactive(small_data_bin, mt, "--lm-path", tmp_path / "none.pt", "--lm-weight", 1,
                       check=False)
    one_error_line(proc, "no such file", "none.pt")
    proc = generate(small_data_bin, mt, "--lm-path", lm, "--lm-weight", 1, "--score-reference",
                    check=False)  # fairseq's scorer ignored the language model
    one_error_line(proc, "--lm-path with --score-reference")

    # a data-bin whose dict.txt (which fairseq's language model reads first) is not the target's,
    # with a language model trained without the plugin (no record of its dictionaries) and with
    other = tmp_path / "bin"
    shutil.copytree(small_data_bin, other)
    lines = (small_data_bin / "dict.tgt.txt").read_text().splitlines()
    (other / "dict.txt").write_text("\n".join(lines[1::-1] + lines[2:]) + "\n")  # two swapped
    state = torch.load(lm, weights_only=True)
    del state["extra_state"]["dictionaries"]
    torch.save(state, tmp_path / "bare.pt")
    for command in (generate, interactive):
        proc = command(other, mt, "--lm-path", tmp_path / "bare.pt", "--lm-weight", 1, check=False)
        one_error_line(proc, "the language model's dictionary", "is not the target dictionary")
        proc = command(other, mt, "--lm-path", lm, "--lm-weight", 1, check=False)
        one_error_line(proc, "was trained with another dictionary than the data-bin's")
    # of another size: torch's traceback of mismatched weights before
    (other / "dict.txt").write_text("\n".join(lines[:-1]) + "\n")
    proc = generate(other, mt, "--lm-path", lm, "--lm-weight", 1, check=False)
    one_error_line(proc, f"was trained with a dictionary of {len(lines) + 4} types",
                   f"has {len(lines) + 3} types")


def test_language_model_trained_on_another_dictionary_of_the_same_size(small_data_bin, trained,
                                                                        tmp_path):
    """The plugin records the dictionaries a model was trained with (its checkpoint's extra
    state); a language model whose record is not the target dictionary is refused where it
    loads, not fused with scores of other words (checked for our models only before)."""
    mt, lm = trained
    state = torch.load(lm, weights_only=True)
    recorded = state["extra_state"]["dictionaries"]
    assert set(recorded) == {"source", "target"}
    state["extra_state"]["dictionaries"] = {side: "0" * 16 for side in recorded}
    other = tmp_path / "lm.pt"
    torch.save(state, other)
    for command in (generate, interactive):
        proc = command(small_data_bin, mt, "--lm-path", other, "--lm-weight", 1, check=False)
        one_error_line(proc, "was trained with another dictionary than the data-bin's")
