"""fairseq_s2s_attn/unk.py: --replace-unk replaces each <unk> of a translation by the source word
the attention points at (or its alignment-dictionary entry), in fairseq-interactive and in
fairseq-generate on a raw-text data-bin; each fairseq failure it fixes is asserted here."""

import random

import pytest
import torch
from fairseq.data import Dictionary

from clitools import REPO, parse_generate, run
from fairseq_s2s_attn import unk
from fairseq_s2s_attn.patching import innermost

USER_DIR = ("--user-dir", REPO / "fairseq_s2s_attn")


# --- the replacement itself --------------------------------------------------------------------

def test_source_positions_of_each_alignment_form():
    pairs = [(2, 0), (0, 1), (1, 2)]  # fairseq's hard alignment: (source, output)
    assert unk._source_positions(pairs, 3) == {0: 2, 1: 0, 2: 1}
    soft = [["0.1", "0.7", "0.2"], ["0.6", "0.3", "0.1"]]  # weights over source tokens + EOS
    assert unk._source_positions(soft, 2) == {0: 1, 1: 0}
    assert unk._source_positions([1, 0], 2) == {0: 1, 1: 0}  # source positions
    assert unk._source_positions(torch.empty(0), 2) == {}  # no alignment computed
    assert unk._source_positions(None, 2) == {}


def test_replace_unks():
    source = ["das", "Haus", "Zürich"]
    tokens = ["<unk>", "house", "<unk>", "<unk>"]
    out = unk.replace_unks(tokens, source, [(2, 0), (1, 1), (0, 2)], {"das": "the"}, "<unk>")
    # aligned: copied or looked up; an <unk> without an aligned source token stays
    assert out == ["Zürich", "house", "the", "<unk>"]


def pieces_dictionary():
    d = Dictionary()
    for piece in ["\u2581Der", "\u2581Name", "\u2581ist", "\u2581the", "\u2581name", "\u2581is"]:
        d.add_symbol(piece)
    return d


def test_replacement_before_post_processing_pieces():
    """fairseq replaced after --post-process had joined the pieces: output position i was not
    output token i any more, so the wrong word (or none) was replaced."""
    from fairseq import utils

    d = pieces_dictionary()
    ids = [d.index("\u2581Der"), d.index("\u2581Name"), d.unk(), d.unk(), d.index("\u2581ist"), d.eos()]
    source = ["\u2581The", "\u2581name", "\u2581Zü", "rich", "\u2581is"]
    alignment = unk.SourceAlignment([(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)], source)
    tokens, text, _ = utils.post_process_prediction(
        torch.tensor(ids), "unused", alignment, {}, d, remove_bpe="sentencepiece",
        extra_symbols_to_ignore={d.eos()})
    assert text == "Der Name Zürich ist"
    assert d.string(tokens) == "Der Name Zürich ist"
    # fairseq's own: the pieces joined first, "Name<unk><unk>" is no "<unk>", nothing replaced
    fairseqs = innermost(utils, "post_process_prediction")
    _, text, _ = fairseqs(torch.tensor(ids), "unused", alignment, {}, d, remove_bpe="sentencepiece",
                          extra_symbols_to_ignore={d.eos()})
    assert text == "Der Name<unk><unk> ist"
    # without --replace-unk: fairseq's own path
    _, plain, _ = utils.post_process_prediction(torch.tensor(ids), "unused", alignment, None, d,
                                                remove_bpe="sentencepiece",
                                                extra_symbols_to_ignore={d.eos()})
    assert plain == "Der Name<unk><unk> ist"


def test_alignment_dictionary_file(tmp_path):
    from fairseq import utils

    assert utils.load_align_dict(None) is None
    assert utils.load_align_dict(unk.BARE_OPTION) == {}  # fairseq opened a file named "@@ "
    (tmp_path / "a.txt").write_text("Haus house\n\nZürich Zurich\n")
    assert utils.load_align_dict(str(tmp_path / "a.txt")) == {"Haus": "house", "Zürich": "Zurich"}
    (tmp_path / "b.txt").write_text("Haus house\nZürich\n")
    with pytest.raises(unk.ConfigError, match=r"line 2 is not 'SOURCE TARGET'"):
        utils.load_align_dict(str(tmp_path / "b.txt"))


def test_hard_alignment_equals_fairseqs():
    """The tensor-op extract_hard_alignment against fairseq's loop: padded and EOS positions on
    both sides, ties, half-precision weights, nothing valid."""
    from fairseq import utils

    fairseqs = innermost(utils, "extract_hard_alignment")
    assert utils.extract_hard_alignment is not fairseqs  # installed
    g, rng = torch.Generator().manual_seed(0), random.Random(0)
    pad, eos, found = 1, 2, 0
    for trial in range(2000):
        src = torch.randint(0, 8, (rng.randint(1, 9),), generator=g)
        tgt = torch.randint(0, 8, (rng.randint(1, 9),), generator=g)
        attn = torch.rand(len(tgt), len(src), generator=g)
        if trial % 3 == 0:
            attn = (attn * 3).round()  # ties: the same (first) source token
        if trial % 7 == 0:
            attn = attn.half()
        expected = fairseqs(attn.clone(), src, tgt, pad, eos)
        assert utils.extract_hard_alignment(attn.clone(), src, tgt, pad, eos) == expected
        found += bool(expected)
    assert 1500 < found < 2000  # both: alignments and empty ones


def test_installed_once():
    from fairseq import utils
    from fairseq.tasks.fairseq_task import FairseqTask

    def installed():
        return (utils.load_align_dict, utils.post_process_prediction, FairseqTask.build_generator,
                FairseqTask.inference_step, utils.extract_hard_alignment)

    before = installed()
    unk.install()  # again (a second --user-dir import): nothing wrapped twice
    assert installed() == before


# --- as users run it ---------------------------------------------------------------------------

def write_rare_word_corpus(root, seed=1):
    """Reversal of 2-8 words w0-w9; half the sentences hold a word seen once (rareN), which
    fairseq-preprocess's --threshold maps to <unk> on both sides: the model learns to put <unk>
    where the source has one."""
    r, n = random.Random(seed), 0
    for split, count in (("train", 600), ("valid", 50), ("test", 40)):
        with open(root / f"{split}.src", "w") as s, open(root / f"{split}.tgt", "w") as t:
            for _ in range(count):
                words = [f"w{r.randrange(10)}" for _ in range(r.randint(2, 8))]
                if r.random() < 0.5:
                    words[r.randrange(len(words))] = f"rare{n}"
                    n += 1
                s.write(" ".join(words) + "\n")
                t.write(" ".join(reversed(words)) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("unk")
    write_rare_word_corpus(root)
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref",
        root / "train", "--validpref", root / "valid", "--destdir", root / "bin",
        "--thresholdsrc", 2, "--thresholdtgt", 2, "--workers", 1)
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--testpref",
        root / "test", "--destdir", root / "raw", "--dataset-impl", "raw", "--srcdict",
        root / "bin" / "dict.src.txt", "--tgtdict", root / "bin" / "dict.tgt.txt", "--workers", 1)
    models = {}
    lstm = ["--encoder-embed-dim", 32, "--encoder-hidden-size", 32, "--decoder-embed-dim", 32,
            "--decoder-hidden-size", 32, "--decoder-out-embed-dim", 32]  # fairseq's own
    for arch, epochs, sizes in (("rnn_bahdanau_tiny", 40, []), ("rnn_vanilla_tiny", 1, []),
                                ("lstm", 30, lstm)):
        save = root / arch
        run("fairseq-train", root / "bin", *USER_DIR, "--arch", arch, *sizes, "--optimizer", "adam",
            "--lr", "0.01", "--max-tokens", 500, "--max-epoch", epochs, "--save-dir", save,
            "--no-epoch-checkpoints", "--no-progress-bar", "--cpu", "--seed", 3)
        models[arch] = save / "checkpoint_best.pt"
    return root, models


LINES = ["w1 w2 zzz w3", "foo w5 w6", "w1 w3 w4 w5 Zürich", "w7 w8"]


def interactive(corpus, *args, arch="rnn_bahdanau_tiny", lines=LINES, check=True):
    root, models = corpus
    return run("fairseq-interactive", root / "bin", *USER_DIR, "--path", models[arch], "--beam", 5,
               "--cpu", "-s", "src", "-t", "tgt", *args, input="\n".join(lines) + "\n", check=check,
               show_warnings=True)


def hypotheses(stdout):
    return [text for _, text in sorted(parse_generate(stdout)["H"].items())]


@pytest.mark.slow
def test_interactive_copies_the_attended_source_word(corpus):
    plain = hypotheses(interactive(corpus).stdout)
    # the model writes <unk> where the source word is unknown (the case --replace-unk is for)
    assert [h.count("<unk>") for h in plain] == [1, 1, 1, 0], plain
    # fairseq: "@@ : No such file or directory"; then an IndexError (no alignment), a TypeError
    # with --print-alignment (pairs), and with those mended, the dictionary's "<unk>" copied
    replaced = hypotheses(interactive(corpus, "--replace-unk").stdout)
    assert replaced == [" ".join(reversed(line.split())) for line in LINES], replaced
    lines = interactive(corpus, "--replace-unk", "--print-alignment", "--nbest", 2).stdout.splitlines()
    assert [ln.split("\t")[2] for ln in lines if ln.startswith("H-")][::2] == replaced
    # the A- lines are fairseq's (source-output pairs), as without --replace-unk
    without = interactive(corpus, "--print-alignment", "--nbest", 2).stdout.splitlines()
    assert [ln for ln in lines if ln.startswith("A-")] == [ln for ln in without if ln.startswith("A-")]
    assert len([ln for ln in lines if ln.startswith("A-")]) == 8


@pytest.mark.slow
def test_interactive_with_an_alignment_dictionary(corpus, tmp_path):
    (tmp_path / "align.txt").write_text("zzz Zug\nfoo bar\n")
    replaced = hypotheses(interactive(corpus, "--replace-unk", tmp_path / "align.txt").stdout)
    assert replaced == ["w3 Zug w2 w1", "w6 w5 bar", "Zürich w5 w4 w3 w1", "w8 w7"], replaced
    (tmp_path / "bad.txt").write_text("zzz\n")
    proc = interactive(corpus, "--replace-unk", tmp_path / "bad.txt", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "bad.txt: line 1 is not 'SOURCE TARGET' (two words), got 'zzz'" in proc.stderr.splitlines()[-1]


@pytest.mark.slow
def test_generate_on_a_raw_text_data_bin(corpus):
    root, models = corpus
    gen = run("fairseq-generate", root / "raw", "--dataset-impl", "raw", *USER_DIR, "--path",
              models["rnn_bahdanau_tiny"], "--beam", 5, "--cpu", "--batch-size", 8, "--replace-unk")
    res = parse_generate(gen.stdout)
    rare = [i for i, t in res["T"].items() if "rare" in t]
    assert len(res["H"]) == 40 and len(rare) >= 10
    assert not any("<unk>" in h for h in res["H"].values())
    # the rare words are back where the references have them
    assert sum(res["H"][i] == res["T"][i] for i in rare) >= 0.9 * len(rare)
    # a binarised data-bin has no source text to copy: fairseq's check, one line
    proc = run("fairseq-generate", root / "bin", *USER_DIR, "--path", models["rnn_bahdanau_tiny"],
               "--cpu", "--replace-unk", "--gen-subset", "valid", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--replace-unk requires a raw text dataset (--dataset-impl=raw)" in proc.stderr


@pytest.mark.slow
def test_a_model_without_attention_keeps_its_unks(corpus):
    proc = interactive(corpus, "--replace-unk", arch="rnn_vanilla_tiny")
    assert "--replace-unk: a model without attention (rnn_vanilla) has no alignment" in proc.stdout + proc.stderr
    assert len(hypotheses(proc.stdout)) == 4


@pytest.mark.slow
def test_fairseqs_own_model_needs_print_alignment(corpus):
    """fairseq's generator aligns its own models only with --print-alignment: without it their
    <unk> stay, and a warning says what to give; with it the words come back (one sentence a
    batch here: fairseq's lstm aligns padded sources wrongly)."""
    lines = LINES[:2]
    proc = interactive(corpus, "--replace-unk", arch="lstm", lines=lines)
    assert "--replace-unk: give --print-alignment too with this model" in proc.stdout + proc.stderr
    plain = hypotheses(proc.stdout)
    assert any("<unk>" in h for h in plain), plain
    replaced = hypotheses(interactive(corpus, "--replace-unk", "--print-alignment", arch="lstm",
                                      lines=lines).stdout)
    for before, after, line in zip(plain, replaced, lines):  # each <unk> became an unknown word
        unknown = {w for w in line.split() if not w.startswith("w")}
        pairs = list(zip(before.split(), after.split()))
        assert len(pairs) == len(after.split()), (before, after)
        assert all(a == b or (b == "<unk>" and a in unknown) for b, a in pairs), (before, after)
        assert "<unk>" not in after, after


@pytest.mark.slow
def test_the_hub_replaces_unknown_words(corpus):
    from fairseq_s2s_attn.hub import Translator

    root, models = corpus
    t = Translator.from_pretrained(str(models["rnn_bahdanau_tiny"].parent), data=str(root / "bin"),
                                   source_lang="src", target_lang="tgt")
    expected = [" ".join(reversed(line.split())) for line in LINES]
    assert [t.translate(s).count("<unk>") for s in LINES] == [1, 1, 1, 0]
    # in one batch (padded sources), one at a time, and with an alignment dictionary
    assert t.translate(LINES, replace_unk=True) == expected
    assert [t.translate(s, replace_unk=True) for s in LINES] == expected
    assert t.translate(LINES[:2], replace_unk={"zzz": "Zug"}) == ["w3 Zug w2 w1", "w6 w5 foo"]
    best = t.translate(LINES[0], replace_unk=True, beam=5, nbest=2)
    assert best[0] == expected[0] and "<unk>" not in best[1]
    assert t.translate(["", LINES[1]], replace_unk=True)[1] == expected[1]  # an empty source too
    r = t.translate(LINES[0], replace_unk=True, return_attention=True)
    assert r.translation == expected[0] and r.target_pieces[1] == "<unk>"  # the model's own output

    vanilla = Translator.from_pretrained(str(models["rnn_vanilla_tiny"].parent), data=str(root / "bin"),
                                         source_lang="src", target_lang="tgt")
    with pytest.warns(UserWarning, match="replace_unk: a model without attention"):
        vanilla.translate(LINES[0], replace_unk=True)


@pytest.mark.slow
def test_interactive_prints_soft_alignments(corpus):
    """fairseq-interactive --print-alignment soft died (ValueError: too many values to unpack);
    its A- lines are now fairseq-generate's: per output token (and </s>) the weights over the
    source tokens and </s>."""
    proc = interactive(corpus, "--print-alignment", "soft", "--replace-unk")
    res = parse_generate(proc.stdout)
    assert [res["H"][i] for i in range(4)] == [" ".join(reversed(ln.split())) for ln in LINES]
    for i, line in enumerate(LINES):
        rows = [[float(w) for w in row.split(",")] for row in res["A"][i].split()]
        assert len(rows) == len(res["H"][i].split()) + 1
        assert all(len(r) == len(line.split()) + 1 and abs(sum(r) - 1) < 1e-3 for r in rows)
