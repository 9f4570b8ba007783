"""scripts/compare.py end to end on a tiny corpus: every model trained under one budget, the
results table (BLEU, chrF, tokens/s, updates), BLEU by source length, the plots (BLEU by length,
training curves), and reuse."""

import argparse
import json
import re
import shlex
import sys

import pytest

from clitools import SCRIPTS, run

sys.path.insert(0, str(SCRIPTS))
import compare  # noqa: E402


def tiny_work(root):
    """A work folder as `prepare_data.py all` makes it, from a small plain-text corpus."""
    src, tgt = [], []
    for i in range(240):
        k = 1 + i % 9  # sources of 3 to 11 words: several length buckets
        src.append(" ".join(["open"] + [f"file{(i + j) % 7}" for j in range(k)] + [str(i)]))
        tgt.append(" ".join(["öffne"] + [f"Datei{(i + j) % 7}" for j in range(k)] + [str(i)]))
    (root / "c.en").write_text("\n".join(src) + "\n", encoding="utf-8")
    (root / "c.de").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    work = root / "work"
    run("prepare_data.py", "all", "--src", root / "c.en", "--tgt", root / "c.de", "--work", work,
        "--valid-size", 10, "--test-size", 20, "--vocab-size", 40, "--workers", 1, timeout=300)
    return work


def test_compare_end_to_end(tmp_path):
    work = tiny_work(tmp_path)
    out = tmp_path / "cmp"
    args = ["--work", work, "--out", out, "--minutes", 0.1, "--parallel", 2, "--warmup", 10,
            "--archs", "rnn_vanilla_tiny", "rnn_bahdanau_tiny", "--ours-args", "--init-range 0.1"]
    proc = run("compare.py", *args, timeout=600)
    text = (out / "results.md").read_text(encoding="utf-8")
    assert text in proc.stdout
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| (rnn_\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| ([\d.]+) \| (\d+) \| ([\d.]+) "
        r"\| ([\d.]+) \|$", text, re.M)}
    assert set(rows) == {"rnn_vanilla_tiny", "rnn_bahdanau_tiny"}
    for bleu, chrf, wps, updates, best_loss, best_wall, length, lenpen in rows.values():
        assert lenpen == "1"
        assert 0 <= float(bleu) <= 100 and 0 <= float(chrf) <= 100
        assert float(wps) > 0 and int(updates) > 0
        assert 0 < float(best_loss) < 20 and int(best_wall) <= 0.1 * 60 + 5
    # the length column is sacrebleu's system / reference length of the saved translations
    import sacrebleu

    ref = (work / "data" / "test.de").read_text(encoding="utf-8").split("\n")[:-1]
    for arch in ("rnn_vanilla_tiny", "rnn_bahdanau_tiny"):
        hyps = (out / arch / "hyp.txt").read_text(encoding="utf-8").split("\n")[:-1]
        scored = sacrebleu.corpus_bleu(hyps, [ref])
        assert abs(float(rows[arch][6]) - scored.sys_len / scored.ref_len) < 1e-3
    buckets = re.search(r"^\| sentences \| (.*) \|$", text, re.M).group(1).split(" | ")
    assert sum(int(n) for n in buckets) == 20  # every test sentence in one bucket
    assert (out / "length_bleu.png").stat().st_size > 1000
    # training curves: every model's loss overlaid, against updates and against time
    for name in ("curves_updates.png", "curves_time.png"):
        assert (out / name).stat().st_size > 10000, name
    for arch in ("rnn_vanilla_tiny", "rnn_bahdanau_tiny"):
        hyps = (out / arch / "hyp.txt").read_text(encoding="utf-8").split("\n")[:-1]
        assert len(hyps) == 20
        assert (out / arch / "curves.png").stat().st_size > 10000
        assert f"--arch {arch}" in text  # the commands that made the numbers
    # the commands are shell-quoted: they can be pasted into a shell
    assert "--adam-betas '(0.9, 0.98)'" in text and "--ours-args '--init-range 0.1'" in text

    again = run("compare.py", *args, timeout=300)  # trained and translated: nothing is redone
    assert again.stdout.count("reusing the translations") == 2 and "training for" not in again.stdout
    assert (out / "results.md").read_text(encoding="utf-8") == text

    # another length penalty: the same training, new translations beside the first ones
    first = {arch: (out / arch / "hyp.txt").read_text(encoding="utf-8")
             for arch in ("rnn_vanilla_tiny", "rnn_bahdanau_tiny")}
    longer = run("compare.py", *args, "--lenpen", 3.0, timeout=300)
    assert "training for" not in longer.stdout and longer.stdout.count("translating the test set") == 2
    assert "lenpen 3" in (out / "results.md").read_text(encoding="utf-8").splitlines()[0]
    for arch in ("rnn_vanilla_tiny", "rnn_bahdanau_tiny"):
        assert len((out / arch / "hyp-lenpen3.txt").read_text(encoding="utf-8").split("\n")[:-1]) == 20
        # fairseq-generate logs into its --results-path file, with the translations
        assert "'lenpen': 3.0" in (out / arch / "generate-lenpen3.out").read_text(encoding="utf-8")
        assert (out / arch / "hyp.txt").read_text(encoding="utf-8") == first[arch]

    # several length penalties: each model takes the one with its best validation-set BLEU
    chosen = run("compare.py", *args, "--lenpen", 1.0, 3.0, timeout=300)
    assert "training for" not in chosen.stdout and "translating the test set" not in chosen.stdout
    assert chosen.stdout.count("translating the valid set") == 4
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "lenpen per model, the best validation BLEU of 1, 3" in text.splitlines()[0]
    valid_ref = (work / "data" / "valid.de").read_text(encoding="utf-8").split("\n")[:-1]
    for arch in ("rnn_vanilla_tiny", "rnn_bahdanau_tiny"):
        bleu = {}
        for lenpen, name in ((1.0, "valid-hyp.txt"), (3.0, "valid-hyp-lenpen3.txt")):
            hyps = (out / arch / name).read_text(encoding="utf-8").split("\n")[:-1]
            assert len(hyps) == 10
            bleu[lenpen] = sacrebleu.corpus_bleu(hyps, [valid_ref]).score
        best = 3.0 if bleu[3.0] > bleu[1.0] else 1.0  # a tie keeps 1
        row = re.search(rf"^\| {arch} \| ([\d.]+) \| ([\d.]+) \|.* \| ([\d.]+) \|$", text, re.M)
        assert float(row.group(3)) == best
        test_hyps = (out / arch / ("hyp.txt" if best == 1.0 else "hyp-lenpen3.txt")).read_text(
            encoding="utf-8").split("\n")[:-1]
        assert abs(float(row.group(1)) - sacrebleu.corpus_bleu(test_hyps, [ref]).score) < 0.01
        sweep = re.search(rf"^\| {arch} \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
        assert [float(sweep.group(1)), float(sweep.group(2))] == [round(bleu[1.0], 2), round(bleu[3.0], 2)]
        assert "'gen_subset': 'valid'" in (out / arch / "generate-valid-lenpen3.out").read_text(encoding="utf-8")


def test_compare_precisions_and_epoch_budget(tmp_path):
    """ARCH@PRECISION entries, --minutes 0 with --max-epoch: the same architecture in fp32 and bf16
    (fairseq's --bf16, here on the CPU), each with its own flags in its command."""
    work = tiny_work(tmp_path)
    out = tmp_path / "prec"
    # a path in --ours-args relative to the caller's folder (fairseq ran in the repository root,
    # where it was "no such file")
    (tmp_path / "emb.txt").write_text("1 32\nopen " + " ".join(["0.5"] * 32) + "\n", encoding="utf-8")
    proc = run("compare.py", "--work", work, "--out", out, "--minutes", 0, "--max-epoch", 2,
               "--parallel", 2, "--warmup", 10, "--ours-args", "--init-range 0.1 --encoder-embed-path emb.txt",
               "--archs", "rnn_luong_tiny@fp32", "rnn_luong_tiny@bf16", cwd=tmp_path, timeout=600)
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "at most 2 epochs" in text
    commands = [line for line in text.splitlines() if line.startswith("fairseq-train")]
    assert len(commands) == 2
    assert sum("--bf16" in c for c in commands) == 1 and all("--max-epoch 2" in c for c in commands)
    assert "--stop-time-hours" not in proc.stdout
    for entry in ("rnn_luong_tiny@fp32", "rnn_luong_tiny@bf16"):
        assert re.search(rf"^\| {re.escape(entry)} \| [\d.]+ \| [\d.]+ \|", text, re.M)
        log = (out / entry / "train.log").read_text()
        assert "epoch 002" in log and "dictionary words from emb.txt" in log
    bad = run("compare.py", "--work", work, "--out", out, "--archs", "rnn_luong_tiny@fp16",
              check=False)
    assert bad.returncode != 0 and "fp16 needs --device cuda" in bad.stderr


def refused(capsys, argv):
    """compare.main(argv) stops before any work: SystemExit, one error line, no traceback."""
    with pytest.raises(SystemExit) as e:
        compare.main([str(a) for a in argv])
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1] if err.strip() else str(e.value.code)
    assert "Traceback" not in err and (message.startswith("error: ") or ": error: " in message), message
    return e.value.code, message


@pytest.mark.parametrize("option,value", [("--minutes", -1), ("--max-epoch", 0), ("--parallel", 0),
                                          ("--gen-batch-size", 0), ("--max-tokens", 0),
                                          ("--warmup", 0), ("--lr", 0), ("--lr", "nan")])
def test_bad_numbers_are_refused_up_front(option, value, tmp_path, capsys):
    """--max-epoch 0 would be fairseq's "no limit" (with --minutes 0: training without end, though
    the message said "at most 0 epochs"); --parallel 0 was a ValueError traceback; --warmup 0 a
    ZeroDivisionError in fairseq's inverse_sqrt scheduler in every training; --lr 0 trained nothing."""
    code, message = refused(capsys, ["--work", tmp_path, "--out", tmp_path / "o", option, value])
    assert code == 2 and (f"argument {option}: must be at least" in message
                          or f"argument {option}: must be above 0" in message)
    assert not (tmp_path / "o").exists()


def fake_work(root):
    """What compare.py reads from a --work folder before training, without the training data."""
    (root / "data").mkdir(parents=True)
    (root / "data-bin").mkdir()
    (root / "data" / "meta.json").write_text(json.dumps({"src_lang": "en", "tgt_lang": "de"}))
    for name in ("data/test.en", "data/test.de", "data-bin/dict.de.txt"):
        (root / name).write_text("x\n")
    return root


def test_missing_work_data_names_the_file_and_the_fix(tmp_path, capsys):
    _, message = refused(capsys, ["--work", tmp_path / "nowork", "--out", tmp_path / "o"])
    assert f"{tmp_path / 'nowork' / 'data' / 'meta.json'} not found" in message
    assert "prepare_data.py all" in message and not (tmp_path / "o").exists()
    work = fake_work(tmp_path / "work")
    (work / "data" / "test.de").unlink()
    _, message = refused(capsys, ["--work", work, "--out", tmp_path / "o"])
    assert f"{work / 'data' / 'test.de'} not found" in message


def test_relative_paths_are_the_callers(tmp_path, capsys, monkeypatch):
    """fairseq runs in the repository root: a relative --work reached fairseq-train as a path
    under the repository ("data-bin mydata/data-bin not found"), while --out was made in the
    caller's folder. Both now resolve against the caller's folder."""
    monkeypatch.chdir(tmp_path)
    _, message = refused(capsys, ["--work", "mydata", "--out", "cmp"])
    assert f"{tmp_path / 'mydata' / 'data' / 'meta.json'} not found" in message


def test_unknown_arch_names_the_plugins_architectures(tmp_path, capsys):
    work = fake_work(tmp_path / "work")
    _, message = refused(capsys, ["--work", work, "--out", tmp_path / "o",
                                  "--archs", "rnn_bahdanau", "bogus_arch@bf16"])
    assert "unknown architecture 'bogus_arch'" in message and "rnn_bahdanau, rnn_luong" in message
    assert "transformer" not in message and len(message) < 400  # not fairseq's whole list
    assert not (tmp_path / "o").exists()


def test_commands_are_shell_quoted():
    args = argparse.Namespace(work="my work", minutes=1.0, max_epoch=5, patience=-1, device="cpu",
                              precision="fp32", lr=0.002, warmup=10, max_tokens=500, seed=1,
                              ours_args="--init-range 0.1 --cpu-bf16")
    cmd = compare.train_cmd(args, "rnn_bahdanau", "out dir/checkpoints")
    line = compare.shell_command(["fairseq-train"] + cmd[3:])
    assert "--adam-betas '(0.9, 0.98)'" in line
    assert shlex.split(line) == ["fairseq-train"] + cmd[3:]
    argv = ["--work", "my work", "--ours-args", "--init-range 0.1", "--minutes", 0.5]
    assert shlex.split(compare.shell_command(["python", "scripts/compare.py"] + argv)) == \
        ["python", "scripts/compare.py"] + [str(a) for a in argv]
