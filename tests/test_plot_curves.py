"""scripts/plot_curves.py: the log lines of fairseq-train (simple and json) and fairseq-hydra-train
it reads, and the curves it draws from a real training log; --tensorboard-logdir writes event
files (tensorboardX is installed, so fairseq no longer asks for it)."""

import sys

import pytest

from clitools import REPO, SCRIPTS, run

sys.path.insert(0, str(SCRIPTS))
import plot_curves  # noqa: E402

# the same three lines as fairseq-train prints them (--log-format simple), as json, and as
# fairseq-hydra-train writes them to hydra_train.log
SIMPLE = [
    "2026-11-26 06:45:11 | INFO | train_inner | epoch 001:      3 / 4 loss=3.991, ppl=15.9, "
    "wps=13930, ups=51.97, wpb=278.7, bsz=40, num_updates=3, lr=0.005, gnorm=0.201, train_wall=0, wall=1",
    "2026-11-26 06:45:11 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 3.894 | "
    "ppl 14.87 | bleu 0.04 | wps 390.5 | wpb 53 | bsz 10 | num_updates 4",
    "2026-11-26 06:45:11 | INFO | train | epoch 001 | loss 3.989 | ppl 15.87 | wps 2866.4 | "
    "ups 11.17 | wpb 268 | bsz 50 | num_updates 4 | lr 0.005 | gnorm 0.243 | train_wall 0 | wall 2",
]
JSON = [
    '2026-11-26 06:45:16 | INFO | train_inner | {"epoch": 1, "update": 0.75, "loss": "3.991", '
    '"ppl": "15.9", "num_updates": "3", "lr": "0.005", "train_wall": "0", "wall": "1"}',
    '2026-11-26 06:45:16 | INFO | valid | {"epoch": 1, "valid_loss": "3.894", "valid_ppl": "14.87", '
    '"valid_bleu": "0.04", "valid_wps": "393.3", "valid_num_updates": "4"}',
    '2026-11-26 06:45:16 | INFO | train | {"epoch": 1, "train_loss": "3.989", "train_ppl": "15.87", '
    '"train_num_updates": "4", "train_lr": "0.005", "train_train_wall": "0", "train_wall": "2"}',
]
HYDRA = [
    "[2026-11-26 06:45:02,285][train_inner][INFO] - epoch 001:      3 / 4 loss=3.991, ppl=15.9, "
    "wps=4056.7, num_updates=3, lr=0.005, gnorm=0.205, clip=0, train_wall=0, wall=1",
    "[2026-11-26 06:45:02,331][valid][INFO] - epoch 001 | valid on 'valid' subset | loss 3.894 | "
    "ppl 14.87 | bleu 0.04 | wps 15033.9 | wpb 53 | bsz 10 | num_updates 4",
    "[2026-11-26 06:45:02,342][train][INFO] - epoch 001 | loss 3.989 | ppl 15.99 | wps 9221.9 | "
    "num_updates 4 | lr 0.005 | gnorm 0.235 | clip 0 | train_wall 0 | wall 2",
]


@pytest.mark.parametrize("lines", [SIMPLE, JSON, HYDRA], ids=["simple", "json", "hydra"])
def test_reads_every_log_format(lines, tmp_path):
    log = tmp_path / "train.log"
    log.write_text("\n".join(["2026-11-26 06:45:10 | INFO | fairseq_cli.train | model rnn_s2s"]
                             + lines + ["done training in 1.2 seconds"]) + "\n")
    got = plot_curves.read_log(log)
    assert got["train_inner"] == [{"updates": 3, "wall": 1.0, "loss": 3.991, "bleu": None}]
    assert got["train"] == [{"updates": 4, "wall": 2.0, "loss": 3.989, "bleu": None}]
    # validation has no wall of its own: it takes the next training line's
    assert got["valid"] == [{"updates": 4, "wall": 2.0, "loss": 3.894, "bleu": 0.04}]


def test_rejects_a_log_without_curves(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("nothing here\n")
    proc = run("plot_curves.py", log, "--out", tmp_path / "c.png", check=False)
    assert proc.returncode != 0 and "no train_inner/train/valid lines" in proc.stderr


def test_resumed_run_keeps_time_going_forward(tmp_path):
    """A resumed run appended to the log (`>> train.log`, hydra_train.log): fairseq's wall restarts
    at 0, and is counted from the previous run's last wall (here 2 s)."""
    resumed = [line.replace("num_updates=3", "num_updates=7").replace("num_updates 4", "num_updates 8")
               .replace("epoch 001", "epoch 002") for line in SIMPLE]
    log = tmp_path / "train.log"
    log.write_text("\n".join(SIMPLE + ["starting a resumed run"] + resumed) + "\n")
    got = plot_curves.read_log(log)
    assert [p["wall"] for p in got["train_inner"]] == [1.0, 3.0]
    assert [p["wall"] for p in got["train"]] == [2.0, 4.0]
    assert [p["wall"] for p in got["valid"]] == [2.0, 4.0]
    assert [p["updates"] for p in got["train"]] == [4, 8]


def test_missing_log_or_folder_is_one_error_line(tmp_path):
    for path, needle in ((tmp_path / "nothing.log", "no such file"), (tmp_path, "a folder, not a training log")):
        with pytest.raises(SystemExit) as e:
            plot_curves.main([str(path), "--out", str(tmp_path / "c.png")])
        assert str(e.value.code) == f"error: {path}: {needle}"
    assert not (tmp_path / "c.png").exists()


def test_default_labels_are_distinct():
    """Two logs in one folder would both be named after the folder: the file's stem is added."""
    assert plot_curves.default_labels(["a/train.log", "b/train.log"]) == ["a", "b"]
    assert plot_curves.default_labels(["a/train.log", "a/hydra_train.log", "b/train.log"]) == \
        ["a/train", "a/hydra_train", "b"]
    assert plot_curves.default_labels(["x/a/train.log", "y/a/train.log"]) == ["x/a/train.log", "y/a/train.log"]


@pytest.mark.slow
def test_curves_and_tensorboard_from_a_training_run(small_data_bin, tmp_path):
    tb = tmp_path / "tb"
    train = run("fairseq-train", small_data_bin, "--user-dir", REPO / "fairseq_s2s_attn",
                "--arch", "rnn_bahdanau_tiny", "--optimizer", "adam", "--lr", "0.005",
                "--max-tokens", 400, "--max-epoch", 3, "--log-interval", 2, "--log-format", "simple",
                "--eval-bleu", "--eval-bleu-args", '{"beam": 1}', "--tensorboard-logdir", tb,
                "--no-save", "--save-dir", tmp_path / "checkpoints", "--cpu", "--seed", 1)
    output = train.stdout + train.stderr
    assert "Please install tensorboardX" not in output and "tensorboard not found" not in output
    for subset in ("train_inner", "train", "valid"):  # one event file per logged subset
        assert list((tb / subset).glob("events.out.tfevents.*")), subset
        assert (tb / subset).stat().st_size > 0
    log = tmp_path / "run" / "train.log"
    log.parent.mkdir()
    log.write_text(output)

    got = plot_curves.read_log(log)
    assert len(got["valid"]) == 3 and len(got["train"]) == 3 and len(got["train_inner"]) >= 3
    updates = [p["updates"] for p in got["train_inner"]]
    assert updates == sorted(updates) and all(p["bleu"] is not None for p in got["valid"])
    assert all(p["wall"] is not None for k in got for p in got[k])

    proc = run("plot_curves.py", log, log, "--labels", "a", "b", "--out", tmp_path / "one.png",
               "--out-prefix", tmp_path / "cmp" / "curves")
    assert "a: " in proc.stdout and "3 validation points" in proc.stdout
    for name in ("one.png", "cmp/curves_updates.png", "cmp/curves_time.png", "cmp/curves_bleu.png"):
        assert (tmp_path / name).stat().st_size > 10000, name


@pytest.fixture
def simple_log(tmp_path):
    log = tmp_path / "run" / "train.log"
    log.parent.mkdir()
    log.write_text("\n".join(SIMPLE) + "\n")
    return log


def curves(capsys, *argv):
    plot_curves.main([str(a) for a in argv])
    return capsys.readouterr().out.strip().splitlines()[-1]


def curves_refused(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        plot_curves.main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert e.value.code == 2 and "Traceback" not in cap.err and "wrote" not in cap.out
    return cap.err.strip().splitlines()[-1]


def test_unwritable_out_is_one_error_line(simple_log, tmp_path, capsys):
    """--out x.xyz was matplotlib's ValueError, --out FILE/c.png a FileExistsError; both are
    refused before the log is read. A write refused by the system (root under /proc: the folder
    exists) was a FileNotFoundError."""
    line = curves_refused(capsys, simple_log, "--out", tmp_path / "x.xyz")
    assert f"--out {tmp_path / 'x.xyz'}: matplotlib cannot write .xyz files (it writes " in line
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    line = curves_refused(capsys, simple_log, "--out", afile / "c.png")
    assert f"--out {afile / 'c.png'}: its folder {afile} is a file, not a folder" in line
    line = curves_refused(capsys, simple_log, "--out-prefix", afile / "c")
    assert f"--out-prefix {afile / 'c'}: its folder {afile} is a file, not a folder" in line
    assert afile.read_text() == "keep me\n"
    proc = next((d for d in ("/proc", "/sys") if plot_curves.folder_problem(d) is None), None)
    if proc:  # as root: the folder looks writable, the write itself fails
        line = curves_refused(capsys, simple_log, "--out", f"{proc}/c.png")
        assert f"error: cannot write {proc}/c.png (" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "run"]


def test_out_reports_the_file_it_writes(simple_log, tmp_path, capsys):
    """--out pc/curvesnoext printed `wrote pc/curvesnoext` but matplotlib wrote
    pc/curvesnoext.png; --out FOLDER printed `wrote FOLDER` and wrote FOLDER.png next to it."""
    out = tmp_path / "pc"
    assert curves(capsys, simple_log, "--out", out / "curvesnoext") == f"wrote {out / 'curvesnoext.png'}"
    assert (out / "curvesnoext.png").stat().st_size > 1000
    assert curves(capsys, simple_log, "--out", out) == f"wrote {out / 'curves.png'}"
    assert (out / "curves.png").stat().st_size > 1000 and not (tmp_path / "pc.png").exists()
    assert curves(capsys, simple_log, "--out", out / "c.svg") == f"wrote {out / 'c.svg'}"
    assert (out / "c.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in out.iterdir()) == ["c.svg", "curves.png", "curvesnoext.png"]
