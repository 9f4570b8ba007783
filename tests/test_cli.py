"""Command line, as a user runs it: fairseq-preprocess -> fairseq-train --user-dir -> fairseq-generate
(beam 5, --print-alignment) -> sacrebleu; fairseq-interactive; --help; bad input."""

import os
import re
import warnings

import pytest
import torch

from clitools import REPO, make_reverse_data, parse_generate, run

pytestmark = pytest.mark.slow

ARCHS = ["rnn_vanilla_tiny", "rnn_bahdanau_tiny", "rnn_luong_tiny"]
USER_DIR = ("--user-dir", REPO / "fairseq_s2s_attn")


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    # test sentences of many lengths, so every generate batch has left-padded sources
    return make_reverse_data(tmp_path_factory.mktemp("cli"), train=600, max_len=10, vocab=12, test=37)


@pytest.fixture(scope="module")
def checkpoints(data_bin, tmp_path_factory):
    out = {}
    for arch in ARCHS:
        save = tmp_path_factory.mktemp(arch)
        run("fairseq-train", data_bin, *USER_DIR, "--arch", arch, "--optimizer", "adam",
            "--lr", "0.005", "--max-tokens", 1000, "--max-epoch", 2, "--save-dir", save,
            "--no-progress-bar", "--cpu", "--seed", 3)
        out[arch] = save / "checkpoint_best.pt"
        assert out[arch].exists()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_train_generate_print_alignment(arch, data_bin, checkpoints, tmp_path):
    gen = run("fairseq-generate", data_bin, *USER_DIR, "--path", checkpoints[arch], "--beam", 5,
              "--print-alignment", "--cpu", "--batch-size", 16)
    res = parse_generate(gen.stdout)
    # every one of the 37 test sentences is translated (none dropped by batching)
    assert sorted(res["S"]) == list(range(37))
    assert sorted(res["H"]) == list(range(37))
    assert "Generate test with beam=5: BLEU4" in gen.stdout
    for sid, src in res["S"].items():
        n_src = len(src.split()) + 1  # + EOS
        pairs = [tuple(map(int, p.split("-"))) for p in res["A"].get(sid, "").split()]
        if arch == "rnn_vanilla_tiny":
            assert pairs == []  # no attention: an empty alignment, not a made-up one
            continue
        n_hyp = len(res["H"][sid].split())
        assert len(pairs) == n_hyp, (sid, pairs, res["H"][sid])
        assert all(0 <= s < n_src and 0 <= t < n_hyp for s, t in pairs), (sid, src, pairs)

    # sacrebleu on the hypotheses against the references, as users score
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("\n".join(res["H"][i] for i in range(37)) + "\n")
    ref.write_text("\n".join(res["T"][i] for i in range(37)) + "\n")
    score = run("sacrebleu", ref, "-i", hyp, "-m", "bleu", "chrf", "-b", "-f", "text")
    values = [float(x) for x in score.stdout.split()]
    assert len(values) == 2 and all(0.0 <= v <= 100.0 for v in values)


def test_print_alignment_with_a_model_without_attention(data_bin, checkpoints):
    """One rule for beam search and --score-reference, alone or in an ensemble: a model without
    attention (vanilla) makes the A- lines empty. With --score-reference fairseq-generate died on
    vanilla's alignment None, and fairseq's scorer added None to the attention of an ensemble
    whose attention model came first (with it second: half-weight alignments)."""
    vanilla, luong = str(checkpoints["rnn_vanilla_tiny"]), str(checkpoints["rnn_luong_tiny"])
    for paths in ([vanilla], [luong, vanilla], [vanilla, luong]):
        for mode in (["--score-reference"], ["--beam", 2])[:1 if len(paths) == 1 else 2]:
            gen = run("fairseq-generate", data_bin, *USER_DIR, "--path", os.pathsep.join(paths),
                      *mode, "--print-alignment", "--cpu", "--batch-size", 16, show_warnings=True)
            res = parse_generate(gen.stdout)
            assert sorted(res["H"]) == list(range(37)), (paths, mode)
            assert set(res["A"].values()) == {""}, (paths, mode)
            assert re.search(r"WARNING.*a model without attention \(rnn_vanilla\) has no alignment",
                             gen.stdout)  # fairseq-generate's log, with its output
            if mode == ["--score-reference"] and len(paths) == 2:
                # the scores are fairseq's: the same as without --print-alignment
                plain = run("fairseq-generate", data_bin, *USER_DIR, "--path", os.pathsep.join(paths),
                            *mode, "--cpu", "--batch-size", 16)
                assert parse_generate(plain.stdout)["P"] == res["P"]


@pytest.mark.parametrize("arch", ["rnn_bahdanau_tiny", "rnn_luong_tiny"])
def test_alignment_independent_of_padding(arch, data_bin, checkpoints):
    """fairseq left-pads sources; alignments must index the source as given, so a sentence gets
    the same alignment alone (no padding) as in a padded batch."""
    padded = parse_generate(run("fairseq-generate", data_bin, *USER_DIR, "--path", checkpoints[arch],
                                "--beam", 5, "--print-alignment", "--cpu", "--batch-size", 37).stdout)
    alone = parse_generate(run("fairseq-generate", data_bin, *USER_DIR, "--path", checkpoints[arch],
                               "--beam", 5, "--print-alignment", "--cpu", "--batch-size", 1).stdout)
    lengths = {len(s.split()) for s in padded["S"].values()}
    assert len(lengths) > 3  # the batch of 37 really mixes lengths, so most rows are padded
    same = [i for i in padded["H"] if padded["H"][i] == alone["H"][i]]
    assert len(same) >= 30
    assert all(padded["A"][i] == alone["A"][i] for i in same)


def test_checkpoint_is_plain_data(checkpoints):
    """Our checkpoints load with torch's safe loader (weights_only=True) and nothing else."""
    state = torch.load(checkpoints["rnn_bahdanau_tiny"], weights_only=True)
    assert state["cfg"]["model"]["_name"] == "rnn_bahdanau_tiny"
    assert state["cfg"]["model"]["attention_placement"] == "before"


def test_interactive(data_bin, checkpoints):
    proc = run("fairseq-interactive", data_bin, *USER_DIR, "--path", checkpoints["rnn_luong_tiny"],
               "--beam", 5, "--source-lang", "src", "--target-lang", "tgt", "--cpu",
               "--print-alignment", input="w1 w2 w3\nw4\n")
    hyps = [line for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(hyps) == 2
    assert len([line for line in proc.stdout.splitlines() if line.startswith("A-")]) == 2


@pytest.mark.parametrize("arch", ["rnn_bahdanau_tiny", "rnn_luong_tiny"])
def test_interactive_with_lexical_constraints(arch, data_bin, checkpoints):
    """``fairseq-interactive --constraints`` (fairseq's LexicallyConstrainedBeamSearch, Post and
    Vilar 2018; constraints after a tab on each input line) drives our decoders like any beam
    search: every translation holds its constraints, words of none of the sources (the model
    reverses its input), whole and, with ``ordered``, in the order given; unconstrained, no
    translation holds them."""
    constraints = {0: [["w9"]], 1: [["w11", "w10"], ["w0"]]}
    sources = ["w1 w2 w3", "w4 w5 w6 w7"]

    def translate(*options, lines):
        proc = run("fairseq-interactive", data_bin, *USER_DIR, "--path", checkpoints[arch],
                   "--beam", 5, "--source-lang", "src", "--target-lang", "tgt", "--cpu",
                   *options, input="".join(line + "\n" for line in lines))
        hyps = parse_generate(proc.stdout)["H"]
        assert sorted(hyps) == [0, 1], proc.stdout[-2000:]
        return {i: hyp.split() for i, hyp in hyps.items()}

    def holds(words, phrase):
        return any(words[i:i + len(phrase)] == phrase for i in range(len(words)))

    def at(words, phrase):
        return next(i for i in range(len(words)) if words[i:i + len(phrase)] == phrase)

    lines = ["\t".join([src] + [" ".join(c) for c in constraints[i]])
             for i, src in enumerate(sources)]
    for kind in ("ordered", "unordered"):
        hyps = translate("--constraints", kind, lines=lines)
        for i, phrases in constraints.items():
            assert all(holds(hyps[i], p) for p in phrases), (kind, i, hyps[i])
        if kind == "ordered":
            assert at(hyps[1], ["w11", "w10"]) < at(hyps[1], ["w0"]), hyps[1]
    plain = translate(lines=sources)
    for i, phrases in constraints.items():
        assert not any(holds(plain[i], p) for p in phrases), (i, plain[i])


def test_help_documents_every_option():
    proc = run("fairseq-train", "--user-dir", REPO / "fairseq_s2s_attn", "--arch", "rnn_bahdanau",
               "--task", "translation", "--help")
    from dataclasses import fields

    from fairseq_s2s_attn.config import RNNS2SConfig

    assert "Model-specific configuration" in proc.stdout
    section = proc.stdout.split("Model-specific configuration", 1)[1]
    for f in fields(RNNS2SConfig):
        if f.name.startswith("_"):
            continue
        flag = "\n  --" + f.name.replace("_", "-") + " "
        assert flag in section, flag
        # the help text follows the flag (argparse may wrap it onto the next lines)
        block = section.split(flag, 1)[1][:400]
        words = f.metadata["help"].split()[:2]
        assert " ".join(words) in re.sub(r"\s+", " ", block), (flag, block)
    # each help ends with the architecture's value (it said "(default: false)" for --coverage,
    # which rnn_bahdanau turns on)
    flat = re.sub(r"\s+", " ", section)
    assert "(rnn_bahdanau: true; '--coverage' alone means true)" in flat.replace("'-- coverage'", "'--coverage'")
    assert "(default: false; '--coverage'" not in flat
    assert "(rnn_bahdanau: gru)" in flat and "(rnn_bahdanau: before)" in flat


def test_bool_option_can_be_switched_off(data_bin, tmp_path):
    """rnn_bahdanau defaults to a bidirectional encoder; '--encoder-bidirectional false' turns it off."""
    run("fairseq-train", data_bin, *USER_DIR, "--arch", "rnn_bahdanau_tiny",
        "--encoder-bidirectional", "false", "--optimizer", "adam", "--lr", "0.005",
        "--max-tokens", 1000, "--max-update", 1, "--save-dir", tmp_path, "--no-progress-bar", "--cpu",
        "--disable-validation")
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert state["cfg"]["model"]["encoder_bidirectional"] is False
    # the encoder LSTM then has no reverse-direction weights
    assert not any("reverse" in k for k in state["model"] if k.startswith("encoder.rnn"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention", "bilinear"], "invalid choice"),
        (["--attention", "dot", "--decoder-hidden-size", "48"], "--attention dot needs"),
        (["--encoder-layers", "0"], "--encoder-layers must be a positive integer"),
        (["--encoder-bidirectional", "maybe"], "expected a boolean"),
        (["--init-range", "-0.1"], "--init-range must be 0 (PyTorch's own initialisation) or positive"),
        pytest.param(["--fp16"], "--fp16 trains on a CUDA GPU, and none is available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="--fp16 works on CUDA")),
        (["--left-pad-target"], "--left-pad-target puts padding where the decoder starts reading"),
        # switches the decoder would not use (silently accepted before)
        (["--attention-placement", "none", "--attention", "dot"], "--attention dot needs attention"),
        (["--attention-placement", "before", "--input-feeding"], "--input-feeding true (Luong's"),
        pytest.param(["--amp"], "--amp is fp16 autocast on a CUDA GPU, and none is used here",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="--amp works on CUDA")),
    ],
)
def test_bad_options_clear_error(data_bin, tmp_path, args, message):
    proc = run("fairseq-train", data_bin, *USER_DIR, "--arch", "rnn_luong_tiny", *args,
               "--optimizer", "adam", "--max-update", 1, "--max-tokens", 1000, "--save-dir", tmp_path,
               "--cpu", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr  # one clear line, not a trace through fairseq


def test_data_bin_and_batch_size_errors(data_bin, checkpoints, tmp_path):
    """A missing data folder (fairseq: FileNotFoundError), one without dictionaries ("Could not
    infer language pair"), training or validating without a batch size (an AssertionError),
    with a batch size or --update-freq of 0 or less, validating without --task, translating
    with a --beam or --nbest below 1, --bpe sentencepiece without its model, and paths the
    system refuses each end with one error line."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "afile").write_text("")
    train = [*USER_DIR, "--arch", "rnn_luong_tiny", "--optimizer", "adam", "--max-update", 1,
             "--save-dir", tmp_path / "ck", "--cpu"]
    for tool, args, message in [
        ("fairseq-train", [tmp_path / "missing", *train, "--max-tokens", 1000], "missing not found"),
        ("fairseq-train", [tmp_path / "raw", *train, "--max-tokens", 1000], "raw is not a data-bin"),
        ("fairseq-train", [data_bin, *train], "give the batch size: --max-tokens N"),
        # fairseq: an IndexError in its batching, a ZeroDivisionError in its iterator
        ("fairseq-train", [data_bin, *train, "--max-tokens", -5], "--max-tokens must be a positive"),
        ("fairseq-train", [data_bin, *train, "--max-tokens", 1000, "--update-freq", "2,0"],
         "--update-freq must be positive"),
        ("fairseq-generate", [tmp_path / "missing", *USER_DIR, "--path", checkpoints["rnn_luong_tiny"],
                              "--cpu"], "missing not found"),
        ("fairseq-validate", [data_bin, *USER_DIR, "--path", checkpoints["rnn_luong_tiny"], "--task",
                              "translation", "--cpu"], "give the batch size: --max-tokens N"),
        # fairseq-validate has no default task (fairseq: KeyError: None under a traceback)
        ("fairseq-validate", [data_bin, *USER_DIR, "--path", checkpoints["rnn_luong_tiny"],
                              "--max-tokens", 1000, "--cpu"], "no --task given"),
        # fairseq: ZeroDivisionErrors in the model and in fairseq's scoring, a RuntimeError in torch
        ("fairseq-generate", [data_bin, *USER_DIR, "--path", checkpoints["rnn_luong_tiny"],
                              "--beam", 0, "--cpu"], "--beam must be at least 1 (got 0)"),
        ("fairseq-generate", [data_bin, *USER_DIR, "--path", checkpoints["rnn_luong_tiny"],
                              "--nbest", 0, "--cpu"], "--nbest must be at least 1 (got 0)"),
        ("fairseq-interactive", [data_bin, *USER_DIR, "--path", checkpoints["rnn_luong_tiny"],
                                 "--beam", -2, "--cpu"], "--beam must be at least 1 (got -2)"),
        # an option required by the others and not given (omegaconf: MissingMandatoryValue)
        ("fairseq-generate", [data_bin, *USER_DIR, "--path", checkpoints["rnn_luong_tiny"],
                              "--bpe", "sentencepiece", "--cpu"],
         "--sentencepiece-model is required with these options and has no value"),
        # paths the system refuses (fairseq: tracebacks through fileinput and os.makedirs)
        ("fairseq-interactive", [data_bin, *USER_DIR, "--path", checkpoints["rnn_luong_tiny"],
                                 "--input", tmp_path / "none.txt", "--cpu"],
         f"{tmp_path / 'none.txt'}: No such file or directory"),
        ("fairseq-train", [data_bin, *train, "--max-tokens", 1000, "--save-dir", tmp_path / "afile" / "ck"],
         f"{tmp_path / 'afile' / 'ck'}: Not a directory"),
    ]:
        proc = run(tool, *args, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], (tool, proc.stderr[-2000:])
    assert not list(tmp_path.glob("ck/*.pt"))


def test_user_dir_printed_by_module():
    """``python -m fairseq_s2s_attn`` gives the --user-dir path for a pip-installed package."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fairseq_s2s_attn"], capture_output=True, text=True,
                         cwd="/", check=True).stdout.strip()
    assert (REPO / "fairseq_s2s_attn").resolve() == __import__("pathlib").Path(out).resolve()


def test_hub_translate_with_attention(data_bin, checkpoints):
    from fairseq_s2s_attn.hub import Translator

    t = Translator.from_pretrained(str(checkpoints["rnn_bahdanau_tiny"].parent), data=str(data_bin))
    with warnings.catch_warnings(record=True) as caught:  # torch's pin_memory warning, once a call
        warnings.simplefilter("always")
        text = t.translate("w1 w2 w3 w4", beam=3)
    assert isinstance(text, str) and text
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    res = t.translate(["w1 w2 w3 w4", "w5"], beam=3, return_attention=True)
    assert [r.source_pieces for r in res] == [["w1", "w2", "w3", "w4", "</s>"], ["w5", "</s>"]]
    for r in res:
        assert r.attention.shape == (len(r.target_pieces), len(r.source_pieces))
        torch.testing.assert_close(r.attention.sum(-1), torch.ones(len(r.target_pieces)))
        assert r.translation.split() == r.target_pieces[:-1]
    # nbest (ignored before: one hypothesis whatever was asked): best first, the first as nbest=1
    best = t.translate(["w1 w2 w3 w4", "w5"], beam=3, nbest=3, return_attention=True)
    assert [len(b) for b in best] == [3, 3]
    for b, r in zip(best, res):
        assert (b[0].translation, b[0].score) == (r.translation, r.score)
        assert torch.equal(b[0].attention, r.attention) and len({h.translation for h in b}) == 3
        assert [h.score for h in b] == sorted((h.score for h in b), reverse=True)
    assert t.translate("w1 w2 w3 w4", beam=3, nbest=2) == [text, best[0][1].translation]


@pytest.mark.parametrize("arch", ["rnn_bahdanau_tiny", "rnn_vanilla_tiny"])
def test_hub_scores_given_translations(arch, data_bin, checkpoints):
    """Translator.score: forced decoding of given translations (the hub's score_reference=True
    was a TypeError; fairseq's hub scores the source as a language model would). Beam search's
    own hypotheses, scored in batches of several lengths (sorted and padded), one at a time and
    in batches bounded by max_tokens,
    score as the search scored them, token by token, with the same attention (an alignment of
    the pair; None without attention); the test set's references score as fairseq-generate
    --score-reference scores them (base 2 there); bad arguments are one error each."""
    import math

    from fairseq_s2s_attn.errors import ConfigError
    from fairseq_s2s_attn.hub import Translator
    from fairseq_s2s_attn.inputs import InputError

    t = Translator.from_pretrained(str(checkpoints[arch].parent), data=str(data_bin))
    sources = ["w1 w2 w3 w4", "w5", "w6 w7 w8 w9 w10 w11 w1 w2", "w3 w3"]
    own = t.translate(sources, beam=3, return_attention=True)
    translations = [r.translation for r in own]
    for batching in (dict(), dict(batch_size=1), dict(max_tokens=10)):
        scored = t.score(sources, translations, return_attention=True, **batching)
        for r, s in zip(own, scored):
            assert (s.source_pieces, s.target_pieces) == (r.source_pieces, r.target_pieces)
            assert s.translation == r.translation and len(s.token_scores) == len(s.target_pieces)
            assert s.score == pytest.approx(r.score, abs=1e-5)
            assert s.score == pytest.approx(sum(s.token_scores) / len(s.token_scores), abs=1e-6)
            torch.testing.assert_close(torch.tensor(s.token_scores), torch.tensor(r.token_scores),
                                       atol=1e-5, rtol=0)
            if arch == "rnn_vanilla_tiny":
                assert s.attention is None and r.attention is None
            else:
                assert s.attention.shape == (len(s.target_pieces), len(s.source_pieces))
                torch.testing.assert_close(s.attention, r.attention, atol=1e-5, rtol=0)
        assert t.score(sources, translations, **batching) == \
            pytest.approx([s.score for s in scored], abs=1e-6)
    assert t.score(sources[0], translations[0]) == pytest.approx(own[0].score, abs=1e-5)
    assert t.score(sources[0], "w0 " * 8) < own[0].score  # a worse translation scores lower

    gen = run("fairseq-generate", data_bin, *USER_DIR, "--path", checkpoints[arch],
              "--score-reference", "--cpu", "--batch-size", 16).stdout
    lines = parse_generate(gen)
    expected = {int(ln.split("\t")[0][2:]): float(ln.split("\t")[1])
                for ln in gen.splitlines() if ln.startswith("H-")}
    ids = sorted(expected)[:20]
    mine = t.score([lines["S"][i] for i in ids], [lines["T"][i] for i in ids])
    assert [m / math.log(2) for m in mine] == pytest.approx([expected[i] for i in ids], abs=1e-4)

    with pytest.raises(ConfigError, match="score_reference: give the translations to Translator.score"):
        t.translate("w1 w2", score_reference=True)
    with pytest.raises(ConfigError, match="2 sources and 1 translations"):
        t.score(["w1", "w2"], ["w1"])
    with pytest.raises(ConfigError, match="two strings, or two lists"):
        t.score("w1", ["w1"])
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        t.score("w1", "w1", batch_size=0)
    with pytest.raises(ConfigError, match="max_tokens must be at least 1"):
        t.score("w1", "w1", max_tokens=0)
    with pytest.raises(InputError, match=r"translation 1 has 1101 tokens .* max_target_positions"):
        t.score(["w1", "w2"], ["w1", "w1 " * 1100])


def test_hub_checks_its_arguments(data_bin, checkpoints, tmp_path):
    """Each bad argument is one error naming what to change (were: TypeError, tarfile and
    sentencepiece errors, ZeroDivisionError, fairseq's command-line advice for long sources);
    an ensemble is checkpoint files joined by os.pathsep, as fairseq's --path."""
    from fairseq_s2s_attn.errors import CheckpointError, ConfigError
    from fairseq_s2s_attn.hub import Translator
    from fairseq_s2s_attn.inputs import InputError

    model_dir = str(checkpoints["rnn_bahdanau_tiny"].parent)
    with pytest.raises(ConfigError, match="data-bin .*missing not found"):
        Translator.from_pretrained(model_dir, data=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="data-bin .*dict.src.txt is a file, not a folder"):
        Translator.from_pretrained(model_dir, data=str(data_bin / "dict.src.txt"))
    with pytest.raises(ConfigError, match=r"tmp_path.* is not a data-bin|is not a data-bin: it holds no dict"):
        Translator.from_pretrained(model_dir, data=str(tmp_path))
    with pytest.raises(CheckpointError, match="cannot read sentencepiece model .*dict.src.txt"):
        Translator.from_pretrained(model_dir, data=str(data_bin), spm_model=str(data_bin / "dict.src.txt"))
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        Translator.from_pretrained(model_dir, checkpoint_file=f"checkpoint_best.pt{os.pathsep}nope.pt",
                                   data=str(data_bin))
    ensemble = Translator.from_pretrained(
        model_dir, checkpoint_file=f"checkpoint_best.pt{os.pathsep}checkpoint_last.pt", data=str(data_bin))
    assert len(ensemble.hub.models) == 2 and ensemble.translate("w1 w2 w3", beam=2)

    t = Translator.from_pretrained(model_dir, data=str(data_bin))
    for beam in (0, -1):
        with pytest.raises(ConfigError, match=f"beam must be at least 1, got {beam}"):
            t.translate("w1 w2", beam=beam)
    for nbest in (0, 3):
        with pytest.raises(ConfigError, match=rf"nbest must be between 1 and beam \(2\), got {nbest}"):
            t.translate("w1 w2", beam=2, nbest=nbest)
    with pytest.raises(InputError, match=r"sentence 1 has 1101 tokens .* max_source_positions"):
        t.translate(["w1", "w1 " * 1100])
    # one sentence per string: a newline inside it separates words (sentencepiece would take it
    # for a character of the word before it)
    seen = []
    encode = t.hub.encode
    t.hub.encode = lambda text: (seen.append(text), encode(text))[1]
    assert t.translate("w1 w2\nw3\t w4 ", beam=2) == t.translate("w1 w2 w3 w4", beam=2)
    assert seen == ["w1 w2 w3 w4", "w1 w2 w3 w4"]


def test_sentencepiece_model_of_another_corpus(tmp_path):
    """The hub and fairseq-interactive with a sentencepiece model the source side was not encoded
    with, or with none and text for input, read words as <unk> and translated them without a
    word; now one error, as for pieces given with the model (encoded again). The model the
    data-bin was made with (prepare_data, joint and --separate) translates text, and without one
    so does input in pieces."""
    import sentencepiece
    from clitools import make_spm_model

    from fairseq_s2s_attn.errors import ConfigError
    from fairseq_s2s_attn.hub import Translator
    from fairseq_s2s_attn.inputs import InputError

    corpus = [(f"open the file number {i} in folder {i % 7}", f"öffne die Datei Nummer {i} im Ordner {i % 7}")
              for i in range(150)]
    for lang, side in (("en", 0), ("de", 1)):
        (tmp_path / f"c.{lang}").write_text("".join(p[side] + "\n" for p in corpus))
    other = make_spm_model(tmp_path / "other.model")
    for layout in ("--joint", "--separate"):
        work = tmp_path / layout.strip("-")
        run("prepare_data.py", "all", "--src", tmp_path / "c.en", "--tgt", tmp_path / "c.de", "--work", work,
            "--valid-size", 5, "--test-size", 5, "--vocab-size", 40, layout)
        run("fairseq-train", work / "data-bin", *USER_DIR, "--arch", "rnn_luong_tiny", "--optimizer", "adam",
            "--lr", "0.005", "--max-tokens", 1000, "--max-update", 2, "--save-dir", work / "ck",
            "--no-progress-bar", "--cpu")
        model = work / "spm" / ("spm.model" if layout == "--joint" else "spm.en.model")
        args = (work / "data-bin", *USER_DIR, "--path", work / "ck" / "checkpoint_last.pt", "--beam", 2,
                "--cpu", "--bpe", "sentencepiece", "--sentencepiece-model")
        proc = run("fairseq-interactive", *args, model, input="open the file number 3\n")
        assert sorted(parse_generate(proc.stdout)["H"]) == [0]
        proc = run("fairseq-interactive", *args, other, input="open the file number 3\n", check=False)
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
        assert f"sentencepiece model {other} is not the one the source side was encoded with" in errors[0]
        assert "H-0" not in proc.stdout
        if layout == "--joint":  # fairseq-generate reads binarized sources: the model only joins pieces
            gen = run("fairseq-generate", work / "data-bin", *USER_DIR, "--path", work / "ck" / "checkpoint_last.pt",
                      "--beam", 2, "--cpu", "--bpe", "sentencepiece", "--sentencepiece-model", other,
                      show_warnings=True)
            assert len(parse_generate(gen.stdout)["H"]) == 5 and "warning:" not in gen.stderr
            # without --post-process or --bpe its output is pieces: a warning says so
            gen = run("fairseq-generate", work / "data-bin", *USER_DIR, "--path",
                      work / "ck" / "checkpoint_last.pt", "--beam", 2, "--cpu", show_warnings=True)
            warned = [line for line in gen.stderr.splitlines() if "warning:" in line]
            assert len(warned) == 1 and "--post-process sentencepiece writes text" in warned[0], gen.stderr
            assert any("\u2581" in t for t in parse_generate(gen.stdout)["T"].values())
        assert Translator.from_pretrained(str(work / "ck"), "checkpoint_last.pt", data=str(work / "data-bin"),
                                          spm_model=str(model)).translate("open the file")
        with pytest.raises(ConfigError, match="other.model is not the one the source side was encoded"):
            Translator.from_pretrained(str(work / "ck"), "checkpoint_last.pt", data=str(work / "data-bin"),
                                       spm_model=str(other))
        # Translator.score encodes translations with the target side's model: the joint one, or
        # with --separate spm.de.model (the English model gave pieces the German dictionary
        # lacks: one error naming target_spm_model)
        target_model = work / "spm" / ("spm.model" if layout == "--joint" else "spm.de.model")
        own = {} if layout == "--joint" else {"target_spm_model": str(target_model)}
        scorer = Translator.from_pretrained(str(work / "ck"), "checkpoint_last.pt", data=str(work / "data-bin"),
                                            spm_model=str(model), **own)
        r = scorer.score("open the file number 3", "öffne die Datei Nummer 3", return_attention=True)
        assert r.target_pieces[:-1] == sentencepiece.SentencePieceProcessor(model_file=str(target_model)).encode(
            "öffne die Datei Nummer 3", out_type=str) and "<unk>" not in r.target_pieces
        if layout == "--separate":
            scorer = Translator.from_pretrained(str(work / "ck"), "checkpoint_last.pt",
                                                data=str(work / "data-bin"), spm_model=str(model))
            with pytest.raises(ConfigError, match=r"not the one the target side was encoded with.*"
                                                  r"spm\.<tgt>\.model.*target_spm_model=SPM"):
                scorer.score("open the file number 3", "öffne die Datei Nummer 3")
            with pytest.raises(ConfigError, match="other.model is not the one the target side was encoded"):
                Translator.from_pretrained(str(work / "ck"), "checkpoint_last.pt", data=str(work / "data-bin"),
                                           spm_model=str(model), target_spm_model=str(other))
        # without the model, text (read as <unk>s and word-inner pieces) is one error; pieces,
        # as spm_encode writes them, translate
        pieces = " ".join(sentencepiece.SentencePieceProcessor(model_file=str(model))
                          .encode("open the file number 3", out_type=str))
        proc = run("fairseq-interactive", *args[:-3], input=f"{pieces}\nopen the file number 3\n",
                   check=False)
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
        assert "standard input: line 2 is text, but the model reads sentencepiece pieces" in errors[0]
        assert "--bpe sentencepiece --sentencepiece-model" in errors[0]
        assert sorted(parse_generate(proc.stdout)["H"]) == [0]  # line 1, before it
        plain = Translator.from_pretrained(str(work / "ck"), "checkpoint_last.pt", data=str(work / "data-bin"))
        with pytest.raises(InputError, match="sentence 1 is text, but the model reads sentencepiece"):
            plain.translate([pieces, "open the file"])
        assert plain.translate(pieces)
        # and pieces given with the model would be encoded again: one error too
        proc = run("fairseq-interactive", *args, model, input=f"open the file\n{pieces}\n", check=False)
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "line 2 is in sentencepiece pieces already" in errors[0]
        assert sorted(parse_generate(proc.stdout)["H"]) == [0]
        with pytest.raises(InputError, match="sentence 0 is in sentencepiece pieces already"):
            Translator.from_pretrained(str(work / "ck"), "checkpoint_last.pt", data=str(work / "data-bin"),
                                       spm_model=str(model)).translate(pieces)


def test_hub_over_length_advice_for_the_location_score(data_bin, tmp_path):
    """The location score's W_a has one row per source position: the advice to load with a
    larger max_source_positions ended in a checkpoint size mismatch for such a model."""
    from fairseq_s2s_attn.errors import CheckpointError
    from fairseq_s2s_attn.hub import Translator
    from fairseq_s2s_attn.inputs import InputError

    run("fairseq-train", data_bin, *USER_DIR, "--arch", "rnn_luong_tiny", "--attention", "location",
        "--max-source-positions", 12, "--optimizer", "adam", "--lr", "0.005", "--max-tokens", 1000,
        "--max-update", 1, "--save-dir", tmp_path, "--no-progress-bar", "--cpu")
    t = Translator.from_pretrained(str(tmp_path), data=str(data_bin))
    assert t.translate("w1 w2 w3", beam=2) is not None
    with pytest.raises(InputError) as e:
        t.translate("w1 " * 20)
    assert "the limit is 12" in str(e.value) and "split the sentence" in str(e.value)
    assert "max_source_positions=N" not in str(e.value)
    with pytest.raises(CheckpointError, match="decoder.attention.scorer"):  # what it advised
        Translator.from_pretrained(str(tmp_path), data=str(data_bin), max_source_positions=40)


def test_pretrained_frozen_embeddings_train_and_translate_without_the_file(data_bin, tmp_path):
    """--encoder-embed-path and --encoder-freeze-embed (fairseq's lstm's options; ours refused
    them): the checkpoint holds the file's vectors, unchanged by training, and fairseq-generate
    needs no file (fairseq's lstm read it again when loading the checkpoint)."""
    from fairseq_s2s_attn.checkpoint import safe_load
    vectors = {f"w{i}": [round(0.01 * i * (j + 1), 4) for j in range(32)] for i in (1, 2, 3)}
    vec = tmp_path / "src.vec"
    vec.write_text("3 32\n" + "".join(w + " " + " ".join(map(str, v)) + "\n" for w, v in vectors.items()))
    save = tmp_path / "ck"
    run("fairseq-train", data_bin, *USER_DIR, "--arch", "rnn_luong_tiny", "--encoder-embed-dim", 32,
        "--encoder-embed-path", vec, "--encoder-freeze-embed", "--optimizer", "adam", "--lr", "0.005",
        "--max-tokens", 1000, "--max-update", 3, "--save-dir", save, "--no-progress-bar", "--cpu")
    state = safe_load(str(save / "checkpoint_last.pt"))
    emb = state["model"]["encoder.embed_tokens.weight"]
    src_dict = [line.split()[0] for line in (data_bin / "dict.src.txt").read_text().splitlines()]
    for w, v in vectors.items():
        row = 4 + src_dict.index(w)  # after <s>, <pad>, </s>, <unk>
        torch.testing.assert_close(emb[row], torch.tensor(v), rtol=0, atol=1e-6)
    vec.unlink()
    gen = run("fairseq-generate", data_bin, *USER_DIR, "--path", save / "checkpoint_last.pt",
              "--beam", 2, "--cpu", "--batch-size", 16)
    assert len(parse_generate(gen.stdout)["H"]) == 37


LOG_LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| INFO \| fairseq_cli\.%s \| "


def test_commands_log_as_fairseq_configures_them(data_bin, checkpoints, tmp_path, monkeypatch):
    """fairseq-generate and -interactive import fairseq before they configure logging, and
    fairseq's import configured it first (basicConfig(level=DEBUG) in one of its model modules):
    their logs came on stderr in Python's default format, with hydra's DEBUG lines, after twenty
    lines of hydra's warnings about fairseq's use of its API. With the plugin, as the commands
    configure it: fairseq's format on stdout (generate: in its --results-path file), LOGLEVEL
    honoured; on stderr nothing, under Python's default warning filters."""
    ck = checkpoints["rnn_luong_tiny"]
    gen = run("fairseq-generate", data_bin, *USER_DIR, "--path", ck, "--beam", 2, "--cpu",
              "--batch-size", 16, show_warnings=True)
    assert gen.stderr == ""
    assert re.search(LOG_LINE % "generate" + r"Translated 37 sentences", gen.stdout, re.M)
    assert "DEBUG" not in gen.stdout and len(parse_generate(gen.stdout)["H"]) == 37
    # --results-path: fairseq-generate logs into that file, with the hypotheses
    res = run("fairseq-generate", data_bin, *USER_DIR, "--path", ck, "--beam", 2, "--cpu",
              "--batch-size", 16, "--results-path", tmp_path / "res", show_warnings=True)
    text = (tmp_path / "res" / "generate-test.txt").read_text()
    assert re.search(LOG_LINE % "generate" + r"Translated 37 sentences", text, re.M)
    assert "Translated" not in res.stdout and res.stderr == ""
    inter = run("fairseq-interactive", data_bin, *USER_DIR, "--path", ck, "--beam", 2, "--cpu",
                input="w1 w2 w3\nw4 w5\n", show_warnings=True)
    assert inter.stderr == "" and re.search(LOG_LINE % "interactive" + "Total time", inter.stdout, re.M)
    assert len(parse_generate(inter.stdout)["H"]) == 2
    monkeypatch.setenv("LOGLEVEL", "WARNING")
    quiet = run("fairseq-generate", data_bin, *USER_DIR, "--path", ck, "--beam", 2, "--cpu",
                "--batch-size", 16)
    assert "| INFO |" not in quiet.stdout + quiet.stderr
    assert len(parse_generate(quiet.stdout)["H"]) == 37


def test_model_overrides_that_change_the_computation_are_named(data_bin, checkpoints):
    """--model-overrides "{'reverse_source': True}" (or attention_mode, ...) changes nothing in
    the parameters, so fairseq took it silently and translated with a model never trained so."""
    gen = run("fairseq-generate", data_bin, *USER_DIR, "--path", checkpoints["rnn_luong_tiny"],
              "--beam", 2, "--cpu", "--batch-size", 16, "--model-overrides",
              "{'reverse_source': True, 'attention_mode': 'local-m', 'cpu_bf16': True}",
              show_warnings=True)
    warned = [line for line in gen.stdout.splitlines() if "--model-overrides sets" in line]
    assert len(warned) == 2, gen.stdout[-3000:]
    assert "reverse_source to True; the model was trained with False" in warned[0]
    assert "attention_mode to 'local-m'; the model was trained with 'global'" in warned[1]
    same = run("fairseq-generate", data_bin, *USER_DIR, "--path", checkpoints["rnn_luong_tiny"],
               "--beam", 2, "--cpu", "--batch-size", 16, "--model-overrides",
               "{'attention_mode': 'global', 'reverse_source': False}", show_warnings=True)
    assert "--model-overrides sets" not in same.stdout + same.stderr
    # a string is not the bool it spells: the model takes 'False' for true
    typed = run("fairseq-generate", data_bin, *USER_DIR, "--path", checkpoints["rnn_luong_tiny"],
                "--beam", 2, "--cpu", "--batch-size", 16, "--model-overrides",
                "{'reverse_source': 'False'}", show_warnings=True, check=False)
    assert "sets reverse_source to 'False'; the model was trained with False" in typed.stdout


def test_model_overrides_of_settings_the_checkpoint_lacks(data_bin, checkpoints, tmp_path):
    """fairseq overrode only the settings a checkpoint's config holds and dropped the others
    silently: a setting added to our models after a checkpoint was trained (cpu_int8) could not
    be switched on for it, and a misspelt name did nothing."""
    from fairseq import checkpoint_utils

    from fairseq_s2s_attn.checkpoint import safe_load
    state = safe_load(str(checkpoints["rnn_luong_tiny"]))
    del state["cfg"]["model"]["cpu_int8"]  # as trained before the setting existed
    old = tmp_path / "old.pt"
    torch.save(state, old)
    for given, want in (({"cpu_int8": True}, True), ({}, False)):
        models, _, _ = checkpoint_utils.load_model_ensemble_and_task(
            [str(old)], arg_overrides=dict(given, data=str(data_bin)))
        assert models[0].decoder.cpu_int8 is want
    gen = run("fairseq-generate", data_bin, *USER_DIR, "--path", old, "--beam", 2, "--cpu",
              "--batch-size", 16, "--model-overrides", "{'cpu_int8': True, 'cpu_int9': True}",
              show_warnings=True)
    warned = [line for line in gen.stdout.splitlines() if "| WARNING |" in line]
    assert len(warned) == 1 and warned[0].endswith(
        "--model-overrides: 'cpu_int9' is no setting of this model or its task; ignored"), warned
    assert len(parse_generate(gen.stdout)["H"]) == 37


def test_cpu_int8_translates_through_the_hub(data_bin, checkpoints, monkeypatch):
    """--cpu-int8 given as the hub's keyword (fairseq-generate's --model-overrides): the decoder's
    step weights get int8 copies and the translations stay those of the plain products for a
    trained model (the tiny model's margins are wide)."""
    from fairseq_s2s_attn import int8
    from fairseq_s2s_attn.hub import Translator
    if not int8.available():
        pytest.skip("no fbgemm int8 product in this torch")
    monkeypatch.setattr(int8, "MIN_ELEMENTS", 0)  # the tiny model's weights are small
    ck = checkpoints["rnn_luong_tiny"]
    sentences = ["w1 w2 w3", "w4 w5 w6 w7 w8", "w9 w3 w1 w2"]
    fast = Translator.from_pretrained(str(ck.parent), data=str(data_bin), cpu_int8=True)
    plain = Translator.from_pretrained(str(ck.parent), data=str(data_bin))
    assert all(int8.int8_weight(w) is not None for w in fast.hub.models[0].decoder.step_weights())
    assert not any(int8.int8_weight(w) for w in plain.hub.models[0].decoder.step_weights())
    assert fast.translate(sentences, beam=2) == plain.translate(sentences, beam=2)


def test_checkpoint_trained_with_left_padded_targets_still_loads(data_bin, checkpoints, tmp_path):
    """Training with --left-pad-target is refused; a checkpoint an earlier version trained so
    (its task settings say so) still loads for translation, with a warning."""
    from fairseq_s2s_attn.checkpoint import safe_load
    from fairseq_s2s_attn.hub import Translator
    state = safe_load(str(checkpoints["rnn_luong_tiny"]))
    state["cfg"]["task"]["left_pad_target"] = True
    (tmp_path / "ck").mkdir()
    torch.save(state, tmp_path / "ck" / "checkpoint_best.pt")
    t = Translator.from_pretrained(str(tmp_path / "ck"), data=str(data_bin))
    assert t.translate("w1 w2 w3", beam=2)


@pytest.mark.parametrize("arch", ["rnn_bahdanau_tiny", "rnn_luong_tiny"])
def test_score_pairs_script(arch, data_bin, checkpoints, tmp_path):
    """scripts/score_pairs.py: forced decoding of text files of pairs, one line per pair, the same
    scores and hard alignments as fairseq-generate --score-reference --print-alignment gives for
    the same pairs from the data-bin (its scores in base 2); a short --tgt is one error before
    the model is loaded."""
    import math

    gen = run("fairseq-generate", data_bin, *USER_DIR, "--path", checkpoints[arch], "--score-reference",
              "--print-alignment", "--cpu", "--batch-size", 16).stdout
    lines = parse_generate(gen)
    scores = {int(ln.split("\t")[0][2:]): float(ln.split("\t")[1])
              for ln in gen.splitlines() if ln.startswith("H-")}
    ids = sorted(scores)
    (tmp_path / "src.txt").write_text("".join(lines["S"][i] + "\n" for i in ids))
    (tmp_path / "tgt.txt").write_text("".join(lines["T"][i] + "\n" for i in ids))
    proc = run("score_pairs.py", "--model-dir", checkpoints[arch].parent, "--data", data_bin,
               "--src", tmp_path / "src.txt", "--tgt", tmp_path / "tgt.txt", "--print-alignment",
               "--batch-size", 7)
    out = [ln.split("\t") for ln in proc.stdout.splitlines()]
    assert len(out) == len(ids) == 37
    for (score, tokens, alignment), i in zip(out, ids):
        assert float(score) / math.log(2) == pytest.approx(scores[i], abs=1e-4), i
        assert int(tokens) == len(lines["T"][i].split()) + 1
        assert alignment == lines["A"][i], (i, alignment, lines["A"][i])
    assert proc.stderr.startswith(f"scored {len(ids)} pairs: mean score "), proc.stderr[-2000:]
    plain = run("score_pairs.py", "--model-dir", checkpoints[arch].parent, "--data", data_bin,
                "--src", tmp_path / "src.txt", "--tgt", tmp_path / "tgt.txt", "--out", tmp_path / "s.tsv")
    assert plain.stdout == "" and [ln.split("\t") for ln in
                                   (tmp_path / "s.tsv").read_text().splitlines()] == [o[:2] for o in out]
    (tmp_path / "short.txt").write_text("w1 w2\n")
    proc = run("score_pairs.py", "--model-dir", tmp_path / "no-model", "--data", data_bin, "--src",
               tmp_path / "src.txt", "--tgt", tmp_path / "short.txt", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--tgt {tmp_path / 'short.txt'} has 1 lines and --src" in proc.stderr.splitlines()[-1]


def test_plot_attention_script(data_bin, checkpoints, tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("w1 w2 w3 w4 w5\nw2\nw3 w4 w5 w6 w7 w8\n")
    proc = run("plot_attention.py", "--model-dir", checkpoints["rnn_luong_tiny"].parent, "--data", data_bin,
               "--input", src, "--num", 2, "--min-words", 3, "--out", tmp_path / "plots",
               show_warnings=True)
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["attention_0.png", "attention_1.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert len(proc.stdout.splitlines()) == 2
    # make demo prints this script's output: fairseq's loading chatter (its whole config on one
    # INFO line) and torch's pin_memory warning stay out of it
    assert "INFO" not in proc.stderr and "pin_memory" not in proc.stderr, proc.stderr[-2000:]
    # --reference: the attention while the model reads the given translations (forced decoding)
    ref = tmp_path / "ref.txt"
    ref.write_text("w5 w4 w3 w2 w1\nw2\nw8 w7 w6 w5 w4 w3\n")
    proc = run("plot_attention.py", "--model-dir", checkpoints["rnn_luong_tiny"].parent, "--data", data_bin,
               "--input", src, "--reference", ref, "--num", 2, "--min-words", 3, "--out",
               tmp_path / "forced")
    assert [ln.split("\t")[1:] for ln in proc.stdout.splitlines()] == [
        ["w1 w2 w3 w4 w5", "w5 w4 w3 w2 w1"], ["w3 w4 w5 w6 w7 w8", "w8 w7 w6 w5 w4 w3"]]
    assert sorted(p.name for p in (tmp_path / "forced").glob("*.png")) == ["attention_0.png", "attention_1.png"]
    # a sentence the model cannot take is the translator's one error line (was a traceback)
    (tmp_path / "long.txt").write_text("w1 " * 1100 + "\n")
    proc = run("plot_attention.py", "--model-dir", checkpoints["rnn_luong_tiny"].parent, "--data",
               data_bin, "--input", tmp_path / "long.txt", "--num", 1, "--max-words", 2000, "--out",
               tmp_path / "long", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: 1 sentence(s) longer than the model's limit" in proc.stderr.splitlines()[-1]
