"""Argument errors of scripts/plot_attention.py (one `error:` line before any model is loaded, no
traceback; main(argv) in this process, nothing translated) and of scripts/make_synthetic.py."""

import sys

import pytest

from clitools import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import make_synthetic  # noqa: E402
import plot_attention  # noqa: E402


def refused(capsys, argv):
    with pytest.raises(SystemExit) as e:
        plot_attention.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def ok_args(tmp_path):
    """Arguments that pass every check made before the model is loaded."""
    (tmp_path / "in.en").write_text("open the file in the folder now\nsave the file please now\n")
    (tmp_path / "data-bin").mkdir()
    return ["--model-dir", tmp_path / "ckpt", "--data", tmp_path / "data-bin",
            "--input", tmp_path / "in.en", "--out", tmp_path / "plots"]


@pytest.mark.parametrize("option,value", [("--num", 0), ("--num", -2), ("--beam", 0)])
def test_counts_must_be_positive(option, value, ok_args, capsys):
    """--num 0 and --beam 0 were ZeroDivisionErrors, --num -2 a misleading message."""
    line = refused(capsys, ok_args + [option, value])
    assert f"error: argument {option}: must be at least 1, got '{value}'" in line


def test_missing_data_existing_out_file_and_bad_spm_model(ok_args, tmp_path, capsys):
    line = refused(capsys, ok_args + ["--data", tmp_path / "nothing"])  # was a TypeError
    assert f"--data {tmp_path / 'nothing'}: no such folder" in line
    (tmp_path / "file.png").write_text("")
    line = refused(capsys, ok_args + ["--out", tmp_path / "file.png"])  # was a FileExistsError
    assert f"--out {tmp_path / 'file.png'} is a file" in line
    (tmp_path / "bad.model").write_text("not a model\n")
    line = refused(capsys, ok_args + ["--spm-model", tmp_path / "bad.model"])  # was a RuntimeError
    assert f"--spm-model {tmp_path / 'bad.model'} is not a sentencepiece model" in line
    assert not (tmp_path / "plots").exists()


def test_out_under_a_file_is_refused_before_loading(ok_args, tmp_path, capsys):
    """--out FILE/sub was a NotADirectoryError after the model had been loaded (here the missing
    checkpoint would be the error if the model were loaded first)."""
    (tmp_path / "afile").write_text("keep me\n")
    line = refused(capsys, ok_args + ["--out", tmp_path / "afile" / "sub"])
    assert f"--out {tmp_path / 'afile' / 'sub'} cannot be made: {tmp_path / 'afile'} is a file" in line
    assert (tmp_path / "afile").read_text() == "keep me\n"


def test_latin1_input_is_refused(ok_args, tmp_path, capsys):
    """A Latin-1 --input was a UnicodeDecodeError."""
    (tmp_path / "latin1.txt").write_bytes("ouvrir le fichier du dossier café maintenant\n".encode("latin-1"))
    line = refused(capsys, ok_args + ["--input", tmp_path / "latin1.txt"])
    assert f"--input {tmp_path / 'latin1.txt'}: not UTF-8 text" in line
    assert not (tmp_path / "plots").exists()


def test_reference_must_match_the_input_line_by_line(ok_args, tmp_path, capsys):
    """--reference: one translation per source line, readable UTF-8, checked before loading."""
    line = refused(capsys, ok_args + ["--reference", tmp_path / "none.de"])
    assert f"--reference {tmp_path / 'none.de'}: no such file" in line
    (tmp_path / "one.de").write_text("öffne die Datei im Ordner jetzt\n")
    line = refused(capsys, ok_args + ["--reference", tmp_path / "one.de"])
    assert f"--reference {tmp_path / 'one.de'} has 1 lines and --input" in line and "2" in line
    (tmp_path / "latin1.de").write_bytes("öffne\nspeichern\n".encode("latin-1"))
    line = refused(capsys, ok_args + ["--reference", tmp_path / "latin1.de"])
    assert f"--reference {tmp_path / 'latin1.de'}: not UTF-8 text" in line
    assert not (tmp_path / "plots").exists()


def test_help_example_uses_the_demos_checkpoint_folder():
    """scripts/demo.sh saves to $WORK/checkpoints/$ARCH (rnn_bahdanau by default)."""
    demo = (SCRIPTS / "demo.sh").read_text()
    assert 'CKPT="$WORK/checkpoints/$ARCH"' in demo and 'ARCH="${DEMO_ARCH:-rnn_bahdanau}"' in demo
    assert "--model-dir work/demo/checkpoints/rnn_bahdanau " in plot_attention.__doc__


def synthetic_refused(capsys, argv):
    with pytest.raises(SystemExit) as e:
        make_synthetic.main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert e.value.code == 2 and "Traceback" not in cap.err and "wrote" not in cap.out
    return cap.err.strip().splitlines()[-1]


@pytest.mark.parametrize("option,value,low", [("--vocab", 0, 1), ("--vocab", -3, 1), ("--train", -5, 1),
                                              ("--train", 0, 1), ("--valid", -1, 0), ("--test", -2, 0),
                                              ("--max-len", 0, 1)])
def test_synthetic_sizes_checked(option, value, low, tmp_path, capsys):
    """--vocab 0/-3 were IndexErrors; --train -5 wrote empty files."""
    out = tmp_path / "syn"
    line = synthetic_refused(capsys, ["--out", out, "--train", 3, option, value])
    assert f"error: argument {option}: must be at least {low}, got '{value}'" in line
    assert not out.exists()


def test_synthetic_test_0_writes_consistent_empty_files(tmp_path, capsys):
    """--test 0 wrote a test.align of one empty line next to an empty test.src."""
    out = tmp_path / "syn"
    make_synthetic.main(["--out", str(out), "--train", "3", "--valid", "0", "--test", "0"])
    for name in ("valid.src", "valid.tgt", "test.src", "test.tgt", "test.align"):
        assert (out / name).read_text() == "", name
    make_synthetic.main(["--out", str(out), "--train", "3", "--valid", "0", "--test", "4"])
    lines = [len((out / name).read_text().splitlines()) for name in ("test.src", "test.tgt", "test.align")]
    assert lines == [4, 4, 4]


def test_synthetic_out_must_be_a_folder(tmp_path, capsys):
    """--out FILE was a FileExistsError, --out FILE/sub a NotADirectoryError."""
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    line = synthetic_refused(capsys, ["--out", afile, "--train", 3])
    assert f"--out {afile} is a file; give a folder" in line
    line = synthetic_refused(capsys, ["--out", afile / "sub", "--train", 3])
    assert f"--out {afile / 'sub'}: cannot make the folder" in line
    assert afile.read_text() == "keep me\n"
