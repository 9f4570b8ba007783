"""examples/alignment_accuracy.py: scores a fairseq-generate output against the test.align of
scripts/make_synthetic.py, and refuses with one error line (exit 2, no traceback) a generate
output or align file it cannot score, including an align file of another test set."""

import sys

import pytest

from clitools import REPO, SCRIPTS

sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(SCRIPTS))
import alignment_accuracy  # noqa: E402
import make_synthetic  # noqa: E402


def synthetic(folder, seed):
    make_synthetic.main(["--task", "reverse", "--out", str(folder), "--train", "1", "--valid", "1",
                         "--test", "20", "--max-len", "8", "--vocab", "10", "--seed", str(seed)])
    return folder


def generate_output(raw, wrong=(), nbest_worse=False, soft=False):
    """What fairseq-generate --print-alignment prints for a model that reverses every test
    sentence and attends to the right source token, except sentences `wrong` (one token off)."""
    src = (raw / "test.src").read_text().splitlines()
    tgt = (raw / "test.tgt").read_text().splitlines()
    align = (raw / "test.align").read_text().splitlines()
    out = []
    for i, (s, t, a) in enumerate(zip(src, tgt, align)):
        hyp = t + " w0" if i in wrong else t
        pairs = a + f" 0-{len(t.split())}" if i in wrong else a
        if soft:
            pairs = " ".join(",".join("1.000000" if j == int(p.split("-")[0]) else "0.000000"
                                      for j in range(len(s.split()))) for p in a.split())
        out += [f"S-{i}\t{s}", f"T-{i}\t{t}", f"H-{i}\t-0.25\t{hyp}", f"D-{i}\t-0.25\t{hyp}",
                f"P-{i}\t-0.2 -0.3", f"A-{i}\t{pairs}"]
        if nbest_worse:  # --nbest 2: a second, worse hypothesis with a wrong alignment
            rev = " ".join(f"{p.split('-')[1]}-{p.split('-')[1]}" for p in a.split())
            out += [f"H-{i}\t-0.5\t{t}", f"D-{i}\t-0.5\t{t}", f"P-{i}\t-0.5", f"A-{i}\t{rev}"]
    out.append("2026-12-05 10:00:00 | INFO | fairseq_cli.generate | Generate test with beam=5")
    return "\n".join(out) + "\n"


@pytest.fixture
def raw(tmp_path):
    return synthetic(tmp_path / "raw", seed=1)


def score(capsys, gen, align):
    alignment_accuracy.main(["--generate", str(gen), "--align", str(align)])
    return capsys.readouterr().out


def refused(capsys, gen, align):
    with pytest.raises(SystemExit) as e:
        alignment_accuracy.main(["--generate", str(gen), "--align", str(align)])
    cap = capsys.readouterr()
    assert e.value.code == 2 and "Traceback" not in cap.err and "accuracy" not in cap.out
    line = cap.err.strip().splitlines()[-1]
    assert line.startswith("alignment_accuracy.py: error: "), line  # its own name, however it is run
    return line


def test_scores_the_exact_sentences(raw, tmp_path, capsys):
    tokens = sum(len(t.split()) for t in (raw / "test.tgt").read_text().splitlines()[2:])
    gen = tmp_path / "gen.out"
    gen.write_text(generate_output(raw, wrong=(0, 1)))
    out = score(capsys, gen, raw / "test.align")
    assert "sentences translated exactly: 18 of 20" in out
    assert f"accuracy (attention argmax = true source token): 1.0000 over {tokens} tokens" in out


def test_nbest_scores_the_best_hypothesis(raw, tmp_path, capsys):
    """With --nbest 2 the second H-/A- lines of a sentence replaced the first: the worse
    hypothesis was scored (0.0000 here)."""
    gen = tmp_path / "gen.out"
    gen.write_text(generate_output(raw, nbest_worse=True))
    assert ": 1.0000 over " in score(capsys, gen, raw / "test.align")


def test_align_file_of_another_test_set_is_refused(raw, tmp_path, capsys):
    """Same size, another --seed: was scored silently (a wrong accuracy); now each line must fit
    its sentence."""
    other = synthetic(tmp_path / "other", seed=2)
    gen = tmp_path / "gen.out"
    gen.write_text(generate_output(raw))
    line = refused(capsys, gen, other / "test.align")
    assert "does not fit test sentence" in line and "an align file of another test set?" in line


def test_align_file_with_fewer_lines_is_refused(raw, tmp_path, capsys):
    """Was an IndexError."""
    short = tmp_path / "short.align"
    short.write_text("\n".join((raw / "test.align").read_text().splitlines()[:5]) + "\n")
    gen = tmp_path / "gen.out"
    gen.write_text(generate_output(raw))
    line = refused(capsys, gen, short)
    assert "has 5 lines but the generate output has 20 test sentences" in line


def test_bad_align_files_are_refused(raw, tmp_path, capsys):
    """A missing file was a FileNotFoundError, a text file (test.src) a ValueError."""
    gen = tmp_path / "gen.out"
    gen.write_text(generate_output(raw))
    assert refused(capsys, gen, tmp_path / "nope").endswith(f"--align {tmp_path / 'nope'}: no such file")
    line = refused(capsys, gen, raw / "test.src")
    assert f"--align {raw / 'test.src'} line 1: " in line and "is not a src-tgt pair" in line
    latin1 = tmp_path / "latin1.align"
    latin1.write_bytes(b"0-0 caf\xe9\n")
    assert "not UTF-8 text" in refused(capsys, gen, latin1)
    assert "a folder, not a file" in refused(capsys, gen, raw)


def test_soft_alignments_are_refused(raw, tmp_path, capsys):
    """--print-alignment soft: was a ValueError (not enough values to unpack)."""
    gen = tmp_path / "soft.out"
    gen.write_text(generate_output(raw, soft=True))
    line = refused(capsys, gen, raw / "test.align")
    assert "holds soft alignments (--print-alignment soft)" in line


def test_generate_output_without_alignments_is_refused(raw, tmp_path, capsys):
    gen = tmp_path / "noalign.out"
    gen.write_text("".join(ln + "\n" for ln in generate_output(raw).splitlines() if not ln.startswith("A-")))
    assert "no A- lines" in refused(capsys, gen, raw / "test.align")
    assert "no such file" in refused(capsys, tmp_path / "nothing.out", raw / "test.align")


def test_example_usage_names_the_positional_folder():
    """The usage line read `[WORK=work/reverse]`: `bash examples/synthetic_alignment.sh WORK=out`
    made a folder named `WORK=out`; the script takes the folder as its first argument."""
    script = (REPO / "examples" / "synthetic_alignment.sh").read_text()
    assert 'WORK="${1:-work/reverse}"' in script and 'cd "$(dirname "$0")/.."' in script
    assert "#   bash examples/synthetic_alignment.sh [FOLDER]\n" in script and "[WORK=" not in script
    assert "a relative FOLDER is taken from the repository root" in script
