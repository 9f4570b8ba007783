"""scripts/average_checkpoints.py: the last checkpoints of one training averaged into one that
fairseq-generate translates with; checkpoints that cannot be averaged refused with one line."""

import pytest
import torch

from clitools import REPO, make_reverse_data, parse_generate, run

pytestmark = pytest.mark.slow

USER_DIR = ("--user-dir", REPO / "fairseq_s2s_attn")


def load(path):
    from fairseq_s2s_attn.checkpoint import allow_fairseq_checkpoints, safe_load

    allow_fairseq_checkpoints()
    return safe_load(str(path))


def train(data_bin, save, arch="rnn_luong_tiny", *extra):
    run("fairseq-train", data_bin, *USER_DIR, "--arch", arch, "--optimizer", "adam", "--lr", "0.005",
        "--max-tokens", 500, "--max-epoch", 3, "--save-dir", save, "--save-interval-updates", 4,
        "--no-progress-bar", "--cpu", "--seed", 3, *extra)
    return save


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return make_reverse_data(tmp_path_factory.mktemp("avg"), train=300, max_len=8, vocab=10, test=20)


@pytest.fixture(scope="module")
def save_dir(data_bin, tmp_path_factory):
    return train(data_bin, tmp_path_factory.mktemp("luong"))


def average(*args, check=True):
    return run("average_checkpoints.py", *args, check=check)


def test_the_mean_of_the_last_epochs(save_dir, data_bin, tmp_path):
    out = tmp_path / "avg.pt"
    proc = average("--inputs", save_dir, "--num-epoch-checkpoints", 2, "--output", out)
    assert "averaged 2 checkpoints" in proc.stdout
    avg, c3, c2 = load(out), load(save_dir / "checkpoint3.pt"), load(save_dir / "checkpoint2.pt")
    assert set(avg["model"]) == set(c3["model"])
    for name, value in avg["model"].items():
        assert value.dtype == c3["model"][name].dtype
        torch.testing.assert_close(value, (c3["model"][name] + c2["model"][name]) / 2)
    assert any(not torch.equal(c3["model"][n], c2["model"][n]) for n in c3["model"])  # not a no-op
    # the newest input's options and position; no optimizer state, so a smaller file
    assert avg["optimizer_history"][-1]["num_updates"] == c3["optimizer_history"][-1]["num_updates"]
    assert avg["extra_state"]["averaged_from"] == ["checkpoint3.pt", "checkpoint2.pt"]
    assert avg["extra_state"]["dictionaries"] == c3["extra_state"]["dictionaries"]
    assert "last_optimizer_state" not in avg and "last_optimizer_state" in c3
    assert out.stat().st_size < (save_dir / "checkpoint3.pt").stat().st_size
    # fairseq-generate translates with it
    gen = run("fairseq-generate", data_bin, *USER_DIR, "--path", out, "--beam", 2, "--cpu",
              "--batch-size", 8)
    assert sorted(parse_generate(gen.stdout)["H"]) == list(range(20))
    # and fairseq-train goes on from it (a fresh optimizer)
    more = tmp_path / "more"
    run("fairseq-train", data_bin, *USER_DIR, "--arch", "rnn_luong_tiny", "--optimizer", "adam",
        "--lr", "0.005", "--max-tokens", 500, "--max-epoch", 4, "--save-dir", more,
        "--restore-file", out, "--no-progress-bar", "--cpu", "--no-save")


def test_the_last_update_checkpoints(save_dir, tmp_path):
    names = {p.name for p in save_dir.glob("checkpoint_*_*.pt")}
    by_updates = sorted(names, key=lambda n: int(n[:-3].split("_")[2]), reverse=True)
    assert len(by_updates) >= 3
    out = tmp_path / "avg.pt"
    average("--inputs", save_dir, "--num-update-checkpoints", 3, "--output", out)
    assert load(out)["extra_state"]["averaged_from"] == by_updates[:3]
    # the upper bound: the newest update checkpoints up to that number
    bound = int(by_updates[1][:-3].split("_")[2])
    average("--inputs", save_dir, "--num-update-checkpoints", 2, "--checkpoint-upper-bound", bound,
            "--output", out, "--force")
    assert load(out)["extra_state"]["averaged_from"] == by_updates[1:3]
    # files given one by one
    average("--inputs", save_dir / "checkpoint1.pt", save_dir / "checkpoint2.pt", "--output", out, "--force")
    assert load(out)["extra_state"]["averaged_from"] == ["checkpoint1.pt", "checkpoint2.pt"]


def error_line(*args):
    proc = average(*args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]  # after argparse's usage, where it prints it
    assert last.startswith("average_checkpoints.py: error: "), proc.stderr
    return last


def test_what_cannot_be_averaged_is_one_error_line(save_dir, data_bin, tmp_path):
    other = train(data_bin, tmp_path / "bahdanau", "rnn_bahdanau_tiny", "--max-epoch", 1)
    wider = train(data_bin, tmp_path / "wider", "rnn_luong_tiny", "--max-epoch", 1,
                  "--decoder-out-embed-dim", 24)
    c1 = save_dir / "checkpoint1.pt"
    assert "other architectures (rnn_bahdanau_tiny and rnn_luong_tiny)" in error_line(
        "--inputs", c1, other / "checkpoint1.pt", "--output", tmp_path / "x.pt")
    line = error_line("--inputs", c1, wider / "checkpoint1.pt", "--output", tmp_path / "x.pt")
    assert "other model settings (decoder_out_embed_dim: 24 and" in line
    # the same model trained on another data-bin's dictionaries (their record changed here)
    state = load(c1)
    state["extra_state"]["dictionaries"]["target"] = "0" * 16
    torch.save(state, tmp_path / "other_dict.pt")
    assert "trained with other target dictionaries" in error_line(
        "--inputs", c1, tmp_path / "other_dict.pt", "--output", tmp_path / "x.pt")
    state = load(c1)
    state["cfg"]["task"]["source_lang"], state["cfg"]["task"]["target_lang"] = "tgt", "src"
    torch.save(state, tmp_path / "reverse.pt")
    assert "other language pairs (tgt->src and src->tgt)" in error_line(
        "--inputs", c1, tmp_path / "reverse.pt", "--output", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()

    assert "9 epoch checkpoints asked for, 3 found" in error_line(
        "--inputs", save_dir, "--num-epoch-checkpoints", 9, "--output", tmp_path / "x.pt")
    found = len(list(other.glob("checkpoint_*_*.pt")))
    assert f"99 update checkpoints asked for, {found} found" in error_line(
        "--inputs", other, "--num-update-checkpoints", 99, "--output", tmp_path / "x.pt")
    (tmp_path / "empty").mkdir()
    assert "0 found (fairseq-train writes them with --save-interval-updates)" in error_line(
        "--inputs", tmp_path / "empty", "--num-update-checkpoints", 1, "--output", tmp_path / "x.pt")
    assert "takes one folder" in error_line(
        "--inputs", c1, "--num-epoch-checkpoints", 1, "--output", tmp_path / "x.pt")
    assert "give --num-epoch-checkpoints N" in error_line("--inputs", save_dir, "--output", tmp_path / "x.pt")
    assert "needs --num-epoch-checkpoints" in error_line(
        "--inputs", c1, "--checkpoint-upper-bound", 2, "--output", tmp_path / "x.pt")
    assert "is one of the inputs" in error_line("--inputs", c1, save_dir / "checkpoint2.pt", "--output", c1)
    assert "given twice" in error_line("--inputs", c1, c1, "--output", tmp_path / "x.pt")
    assert "not found" in error_line("--inputs", c1, tmp_path / "none.pt", "--output", tmp_path / "x.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "truncated or corrupt" in error_line("--inputs", c1, tmp_path / "junk.pt", "--output", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()

    # an existing output is kept unless --force
    keep = tmp_path / "keep.pt"
    keep.write_bytes(b"precious")
    assert "exists; give --force" in error_line(
        "--inputs", c1, save_dir / "checkpoint2.pt", "--output", keep)
    assert keep.read_bytes() == b"precious"
    average("--inputs", c1, save_dir / "checkpoint2.pt", "--output", keep, "--force")
    assert load(keep)["extra_state"]["averaged_from"] == ["checkpoint1.pt", "checkpoint2.pt"]
