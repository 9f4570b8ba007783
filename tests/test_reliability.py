"""Reliability: resuming a killed training run, safe and checked checkpoint loading, clear errors
for bad input, defined behaviour for empty and too-long sources, and numerics in fp16/bf16 and
with gradient clipping. The command-line tests are marked slow (they still run in make test);
data-parallel training is in test_distributed.py."""

import contextlib
import dataclasses
import enum
import importlib.util
import io
import os
import pickle
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils, options
from fairseq.data import Dictionary
from fairseq.sequence_generator import SequenceGenerator

from clitools import BIN, REPO, env, one_error_line, parse_generate, run
from conftest import FakeTask, build_model, make_dict, random_tokens
from fairseq_s2s_attn.checkpoint import safe_load
from fairseq_s2s_attn.config import RNNS2SConfig
from fairseq_s2s_attn.errors import CheckpointError, ConfigError

TINY_ARCHS = ["rnn_vanilla_tiny", "rnn_bahdanau_tiny", "rnn_luong_tiny"]
USER_DIR = ("--user-dir", REPO / "fairseq_s2s_attn")
slow = pytest.mark.slow


def load_state(path):
    return torch.load(path, weights_only=True)


# =========================================================================== 1. resume


def luong_cmd(data_bin, save_dir, max_update):
    """The user's training command; only --max-update differs between the runs below."""
    return [data_bin, *USER_DIR, "--arch", "rnn_luong_tiny", "--optimizer", "adam", "--lr", "0.005",
            "--max-tokens", 100, "--seed", 7, "--save-interval-updates", 3, "--no-epoch-checkpoints",
            "--max-update", max_update, "--save-dir", save_dir, "--no-progress-bar", "--cpu"]


RESUME_AT, TOTAL = 4, 20  # an epoch of this corpus is 16 updates: 4 is mid-epoch, 20 in epoch 2


@pytest.fixture(scope="module")
def luong_runs(small_data_bin, tmp_path_factory):
    """One uninterrupted run of TOTAL updates, and one stopped after RESUME_AT updates (mid-epoch)
    then restarted with the same command. Stopping at --max-update is a deterministic kill: it
    leaves the checkpoint_last.pt of a mid-epoch update, as a run killed some time after its
    --save-interval-updates checkpoint does (the restart then redoes the updates after it)."""
    resumed, straight = tmp_path_factory.mktemp("resumed"), tmp_path_factory.mktemp("straight")
    run("fairseq-train", *luong_cmd(small_data_bin, resumed, RESUME_AT))
    killed = load_state(resumed / "checkpoint_last.pt")
    restart = run("fairseq-train", *luong_cmd(small_data_bin, resumed, TOTAL))
    run("fairseq-train", *luong_cmd(small_data_bin, straight, TOTAL))
    return killed, restart, resumed, straight


@slow
def test_resume_mid_epoch_matches_uninterrupted_run(luong_runs):
    killed, restart, resumed, straight = luong_runs
    # the checkpoint the restart continues from is mid-epoch, with dropout on
    itr = killed["extra_state"]["train_iterator"]
    assert (itr["epoch"], itr["iterations_in_epoch"]) == (1, RESUME_AT)
    assert killed["cfg"]["model"]["decoder_dropout_out"] > 0
    assert f"(epoch 1 @ {RESUME_AT} updates)" in restart.stdout + restart.stderr  # it did resume

    a, b = load_state(resumed / "checkpoint_last.pt"), load_state(straight / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == TOTAL
    assert a["extra_state"]["train_iterator"] == b["extra_state"]["train_iterator"]
    assert b["extra_state"]["train_iterator"]["epoch"] == 2  # crossed an epoch boundary after resuming
    for name in b["model"]:  # bitwise: same batches, same dropout masks, same optimizer state
        assert torch.equal(a["model"][name], b["model"][name]), name
    sa, sb = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    for k in sb:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k][key], sb[k][key]), (k, key)


RESUME_IN_EPOCH_2 = 17  # epoch 2 @ 1 update


@slow
def test_resume_in_a_later_epoch_matches_uninterrupted_run(small_data_bin, luong_runs, tmp_path):
    """fairseq makes the batches it reuses in every epoch with the seed plus the epoch they are
    made in: epoch 1 in an uninterrupted run, the checkpoint's epoch in a resumed one, so a run
    resumed in epoch 2 trained on other batches than the run it continued
    (runtime.resumed_epochs_keep_their_batches)."""
    *_, straight = luong_runs
    run("fairseq-train", *luong_cmd(small_data_bin, tmp_path, RESUME_IN_EPOCH_2))
    itr = load_state(tmp_path / "checkpoint_last.pt")["extra_state"]["train_iterator"]
    assert (itr["epoch"], itr["iterations_in_epoch"]) == (2, RESUME_IN_EPOCH_2 - 16)
    run("fairseq-train", *luong_cmd(small_data_bin, tmp_path, TOTAL))
    a, b = load_state(tmp_path / "checkpoint_last.pt"), load_state(straight / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == TOTAL
    assert a["extra_state"]["train_iterator"] == b["extra_state"]["train_iterator"]
    for name in b["model"]:  # bitwise: the same batches as the uninterrupted run
        assert torch.equal(a["model"][name], b["model"][name]), name


# =========================================================================== 5c. gradient clipping


@slow
def test_clip_norm_bounds_the_update(small_data_bin, luong_runs, tmp_path):
    *_, straight = luong_runs
    shutil.copy(straight / "checkpoint_last.pt", tmp_path / "checkpoint_last.pt")
    before = load_state(tmp_path / "checkpoint_last.pt")["model"]
    clip, lr = 1e-3, 1.0
    # one update with plain SGD: the step is lr x the clipped gradient, of norm at most --clip-norm
    cmd = luong_cmd(small_data_bin, tmp_path, 1)
    cmd[cmd.index("adam")] = "sgd"
    cmd[cmd.index("--lr") + 1] = str(lr)
    proc = run("fairseq-train", *cmd, "--clip-norm", clip, "--reset-optimizer", "--log-interval", 1,
               "--disable-validation")
    log = proc.stdout + proc.stderr
    gnorm = float(re.search(r"gnorm[= ]([0-9.]+)", log).group(1))
    assert gnorm > 10 * clip  # the gradient norm is reported, and clipping is active
    assert re.search(r"clip[= ]100", log)
    after = load_state(tmp_path / "checkpoint_last.pt")["model"]
    step = torch.sqrt(sum(((after[k].double() - before[k].double()) ** 2).sum() for k in before))
    assert 0.98 * lr * clip < step <= 1.01 * lr * clip


# =========================================================================== 3. safe loading


class _RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def craft_malicious(src, dst, marker):
    state = load_state(src)
    state["extra_state"]["payload"] = _RunsCode(marker)
    torch.save(state, dst)


def tiny_checkpoint(path, arch="rnn_bahdanau_tiny", n_words=12):
    d = make_dict(n_words)
    model = build_model(arch, task=FakeTask(d, d))
    torch.save({"model": model.state_dict(), "cfg": {"model": None}, "optimizer_history": [],
                "extra_state": {}}, path)
    return model


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    good, bad, marker = tmp_path / "good.pt", tmp_path / "bad.pt", tmp_path / "PWNED"
    tiny_checkpoint(good)
    craft_malicious(good, bad, marker)
    with pytest.raises(CheckpointError, match=r"refusing to load .*bad\.pt.*posix\.system|"
                                              r"refusing to load .*bad\.pt.*os\.system"):
        checkpoint_utils.load_checkpoint_to_cpu(str(bad))
    assert not marker.exists()
    # torch's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 makes loads that do not say weights_only=True
    # unsafe: fairseq's own calls say nothing, so the plugin says True on every path (a file,
    # and a stream, which torch.load takes from fairseq without a name to check)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="refusing to load"):
        checkpoint_utils.load_checkpoint_to_cpu(str(bad))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        checkpoint_utils.torch.load(io.BytesIO(bad.read_bytes()))
    assert not marker.exists()
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    # control: the payload is live -- an unsafe load would have run it
    torch.load(bad, weights_only=False)
    assert marker.exists()


def numpy_metrics_state(path, legacy=False):
    """A checkpoint whose metrics hold what fairseq-train --eval-bleu keeps there: the validation
    BLEU counts as numpy int64 arrays (fairseq's translation task logs np.array(counts)), numpy
    scalars beside them."""
    from fairseq.logging import metrics

    tiny_checkpoint(path)
    state = load_state(path)
    with metrics.aggregate(new_root=True) as agg:
        metrics.log_scalar("_bleu_counts", np.array([9, 5, 2, 1]))
        metrics.log_scalar("_bleu_sys_len", np.int64(12))
        metrics.log_scalar("loss", np.float32(3.5))
        state["extra_state"]["metrics"] = {"valid": agg.state_dict()}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return state


@slow
def test_eval_bleu_checkpoints_resume_and_translate(small_data_bin, tmp_path):
    """fairseq-train --eval-bleu keeps the BLEU counts as numpy arrays in every checkpoint; the
    safe loader refused them ('numpy._core.multiarray._reconstruct'), so neither resuming nor
    fairseq-generate could load such a checkpoint."""
    bleu = ["--eval-bleu", "--eval-bleu-args", '{"beam": 1}', "--best-checkpoint-metric", "bleu",
            "--maximize-best-checkpoint-metric"]
    run("fairseq-train", *luong_cmd(small_data_bin, tmp_path, 3), *bleu)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "checkpoint_last.pt"))
    counts = {name: meter for _, name, _, meter in state["extra_state"]["metrics"]["valid"]}
    assert isinstance(counts["_bleu_counts"]["sum"], np.ndarray)
    resumed = run("fairseq-train", *luong_cmd(small_data_bin, tmp_path, 5), *bleu)
    assert "(epoch 1 @ 3 updates)" in resumed.stdout + resumed.stderr
    out = run("fairseq-generate", small_data_bin, *USER_DIR, "--path", tmp_path / "checkpoint_best.pt",
              "--beam", 2, "--cpu", "--max-sentences", 10)
    assert len(parse_generate(out.stdout)["H"]) == 20


def test_numpy_arrays_pickled_by_numpy_1_load(tmp_path):
    """The same arrays in a checkpoint written under numpy 1.x, which names its reconstructor
    numpy.core.multiarray (numpy 2: numpy._core), load through fairseq's torch.load."""
    path = tmp_path / "np1.pt"
    saved = numpy_metrics_state(path, legacy=True)
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    for name in (path, tmp_path / "np2.pt"):
        if name != path:
            numpy_metrics_state(name)
        loaded = checkpoint_utils.torch.load(str(name))  # what load_checkpoint_to_cpu calls
        assert repr(loaded["extra_state"]) == repr(saved["extra_state"])


def test_object_arrays_stay_refused(tmp_path):
    """An object array's values are arbitrary pickled objects: refused as unsafe, not as damage."""
    path = tmp_path / "obj.pt"
    tiny_checkpoint(path)
    state = load_state(path)
    state["extra_state"]["values"] = np.array([1, "x"], dtype=object)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*obj\.pt.*ObjectDType"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))


def _flip_tensor_bytes(data: bytes, tensor: torch.Tensor) -> bytes:
    raw = tensor.detach().contiguous().numpy().tobytes()
    at = data.find(raw[:256])
    assert at > 0
    return data[:at] + bytes(b ^ 0xFF for b in data[at:at + 64]) + data[at + 64:]


def test_damaged_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    model = tiny_checkpoint(good)
    data = good.read_bytes()
    buf = io.BytesIO()
    torch.save(torch.zeros(3), buf)
    dict_buf = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, dict_buf)
    no_cfg = io.BytesIO()  # fairseq: IndexError (list index out of range) in load_checkpoint_to_cpu
    torch.save({"model": {}, "optimizer_history": []}, no_cfg)
    cases = {
        "empty": (b"", "truncated or corrupt"),
        "header_only": (data[:300], "truncated or corrupt"),
        "half": (data[: len(data) // 2], "truncated or corrupt"),
        "no_end": (data[:-10], "truncated or corrupt"),
        "text": (b"this is not a checkpoint\n" * 20, "truncated or corrupt"),
        "random": (torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))
                   .to(torch.uint8).numpy().tobytes(), "truncated or corrupt"),
        "flipped": (_flip_tensor_bytes(data, model.decoder.fc_out.weight), "checksum mismatch"),
        "a_tensor": (buf.getvalue(), "not a fairseq checkpoint"),
        "no_model": (dict_buf.getvalue(), "not a fairseq checkpoint"),
        "no_cfg": (no_cfg.getvalue(), "not a fairseq checkpoint: it has no 'cfg' entry"),
    }
    with open(good, "rb") as f:  # the torch.load that fairseq's checkpoint_utils calls
        assert checkpoint_utils.torch.load(f, map_location="cpu")["model"].keys() == model.state_dict().keys()
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            checkpoint_utils.load_checkpoint_to_cpu(str(path))
        assert str(path) in str(err.value) and message in str(err.value), (name, str(err.value))
        assert "\n" not in str(err.value)
    for load in (lambda p: checkpoint_utils.load_model_ensemble([p]), safe_load):
        with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pt"):
            load(str(tmp_path / "missing.pt"))
    # a folder (was IsADirectoryError): named with the checkpoint files in it
    (tmp_path / "run.pt").mkdir()
    (tmp_path / "run.pt" / "checkpoint_best.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"--path .*run\.pt is a folder, not a checkpoint file: "
                                              r"give a file in it \(checkpoint_best\.pt\)"):
        checkpoint_utils.load_model_ensemble([str(tmp_path / "run.pt")])


@pytest.fixture(scope="module")
def fairseq_builtin_checkpoints(small_data_bin, tmp_path_factory):
    """fairseq's own lstm and transformer, tiny, trained 2 updates by stock fairseq (no --user-dir)."""
    sizes = {
        "lstm": ["--encoder-embed-dim", 16, "--decoder-embed-dim", 16, "--decoder-out-embed-dim", 16,
                 "--encoder-hidden-size", 16, "--decoder-hidden-size", 16],
        "transformer": ["--encoder-embed-dim", 16, "--decoder-embed-dim", 16,
                        "--encoder-ffn-embed-dim", 32, "--decoder-ffn-embed-dim", 32,
                        "--encoder-layers", 1, "--decoder-layers", 1, "--encoder-attention-heads", 2,
                        "--decoder-attention-heads", 2],
    }
    out = {}
    for arch, opts in sizes.items():
        save = tmp_path_factory.mktemp(arch)
        run("fairseq-train", small_data_bin, "--arch", arch, *opts, "--optimizer", "adam",
            "--lr", "0.005", "--max-tokens", 200, "--max-update", 2, "--save-dir", save,
            "--no-progress-bar", "--cpu", "--disable-validation", "--no-epoch-checkpoints")
        out[arch] = save / "checkpoint_last.pt"
    return out


@slow
def test_fairseq_lstm_and_transformer_checkpoints_still_load(small_data_bin, fairseq_builtin_checkpoints,
                                                              tmp_path):
    from fairseq.models.lstm import LSTMModel
    from fairseq.models.transformer import TransformerModel

    paths = fairseq_builtin_checkpoints
    for arch, cls in (("lstm", LSTMModel), ("transformer", TransformerModel)):
        models, _ = checkpoint_utils.load_model_ensemble([str(paths[arch])])
        assert isinstance(models[0], cls)
    # and they generate with the plugin loaded (both at once: an ensemble of the two)
    gen = run("fairseq-generate", small_data_bin, *USER_DIR, "--path",
              f"{paths['lstm']}:{paths['transformer']}", "--beam", 2, "--cpu", "--batch-size", 32)
    assert sorted(parse_generate(gen.stdout)["H"]) == list(range(20))

    # a crafted checkpoint: one error line naming the file, and the payload never runs
    marker, bad = tmp_path / "PWNED", tmp_path / "crafted.pt"
    craft_malicious(paths["lstm"], bad, marker)
    proc = run("fairseq-generate", small_data_bin, *USER_DIR, "--path", bad, "--cpu", check=False)
    one_error_line(proc, "refusing to load", bad)
    assert not marker.exists()


@slow
def test_truncated_checkpoint_last_on_resume(small_data_bin, luong_runs, tmp_path):
    """A run killed while its checkpoint was copied: restarting says so in one line."""
    *_, straight = luong_runs
    data = (straight / "checkpoint_last.pt").read_bytes()
    (tmp_path / "checkpoint_last.pt").write_bytes(data[: len(data) * 2 // 3])
    proc = run("fairseq-train", *luong_cmd(small_data_bin, tmp_path, TOTAL + 1), check=False)
    one_error_line(proc, "truncated or corrupt", tmp_path / "checkpoint_last.pt")


# =========================================================================== 4. bad input


def _parse_error(args):
    parser = options.get_training_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        options.parse_args_and_arch(parser, input_args=args)
    return err.getvalue()


CHOICE_FIELDS = [f for f in dataclasses.fields(RNNS2SConfig)
                 if isinstance(f.type, type) and issubclass(f.type, enum.Enum)]


@pytest.mark.parametrize("field", CHOICE_FIELDS, ids=lambda f: f.name)
def test_invalid_choice_lists_the_valid_ones(field, tmp_path):
    flag = "--" + field.name.replace("_", "-")
    message = _parse_error([str(tmp_path), *map(str, USER_DIR), "--arch", "rnn_luong_tiny", flag, "bogus"])
    assert f"argument {flag}: invalid choice: 'bogus'" in message
    for choice in field.type:
        assert repr(choice.value) in message.splitlines()[-1], (choice, message[-300:])


@pytest.mark.parametrize("flag, value, message", [
    ("--encoder-layers", "two", "invalid int value: 'two'"),
    ("--decoder-dropout-out", "high", "invalid float value: 'high'"),
    ("--reverse-source", "perhaps", "expected a boolean"),
])
def test_invalid_values_are_named(flag, value, message, tmp_path):
    out = _parse_error([str(tmp_path), *map(str, USER_DIR), "--arch", "rnn_bahdanau_tiny", flag, value])
    assert message in out and flag in out


def test_checkpoint_with_other_dictionary_names_both_sizes():
    trained = build_model("rnn_luong_tiny", task=FakeTask(make_dict(20), make_dict(12)))
    other = build_model("rnn_luong_tiny", task=FakeTask(make_dict(28), make_dict(12)))
    n_trained, n_now = len(trained.encoder.dictionary), len(other.encoder.dictionary)
    with pytest.raises(CheckpointError, match=f"source dictionary of {n_trained} types.* has {n_now} types"):
        other.load_state_dict(trained.state_dict())
    other = build_model("rnn_luong_tiny", task=FakeTask(make_dict(20), make_dict(5)))
    with pytest.raises(CheckpointError, match=f"target dictionary of {len(trained.decoder.dictionary)} "
                                              f"types.* has {len(other.decoder.dictionary)} types"):
        other.load_state_dict(trained.state_dict())


def test_checkpoint_with_other_sizes_says_which():
    trained = build_model("rnn_bahdanau_tiny")
    other = build_model("rnn_bahdanau_tiny", attention_dim=24)
    with pytest.raises(CheckpointError, match=r"decoder\.attention\.scorer\.query_proj\.weight is "
                                              r"\(32, 64\) in the checkpoint, \(24, 64\) in the model"):
        other.load_state_dict(trained.state_dict())
    build_model("rnn_bahdanau_tiny").load_state_dict(trained.state_dict())  # same sizes still load


def test_checkpoint_of_another_architecture_says_so():
    trained = build_model("rnn_luong_tiny")
    with pytest.raises(CheckpointError, match=r"holds another model: .*decoder\.attention.*--arch"):
        build_model("rnn_vanilla_tiny").load_state_dict(trained.state_dict())


def test_errors_fairseq_wraps_still_print_as_one_line(capsys):
    """fairseq's trainer re-raises any load_state_dict failure as a bare Exception without the
    cause; the command still ends with our one line (plus the file fairseq names)."""
    import sys

    try:
        try:
            raise CheckpointError("the checkpoint was trained with a source dictionary of 16 types")
        except Exception:
            raise Exception("Cannot load model parameters from checkpoint /x/checkpoint_last.pt; "
                            "please ensure that the architectures match.")
    except Exception as e:
        sys.excepthook(type(e), e, e.__traceback__)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: the checkpoint was trained with a source dictionary of 16 types " \
        "(Cannot load model parameters from checkpoint /x/checkpoint_last.pt)" in err[0], err


@slow
@pytest.mark.parametrize("args, message", [
    (["--max-len-a", 0, "--max-len-b", 0], "min_len cannot be larger than max_len"),
    (["--sampling", "--sampling-topp", 0.9], "--sampling requires --nbest to be equal to --beam"),
    (["--temperature", 0], "--temperature must be greater than 0"),
])
def test_fairseqs_own_checks_are_one_line(small_data_bin, luong_runs, args, message):
    """fairseq refuses these with assert statements: the message came at the end of a traceback
    of 10-30 lines (for fairseq's lstm too); S2S_TRACEBACK=1 brings the traceback back."""
    cmd = [small_data_bin, *USER_DIR, "--path", luong_runs[3] / "checkpoint_last.pt", "--beam", 2,
           "--cpu", *args]
    line = one_error_line(run("fairseq-generate", *cmd, check=False), message, "fairseq's check")
    assert line.startswith("fairseq-generate: error: ")
    proc = subprocess.run([str(BIN / "fairseq-generate"), *map(str, cmd)], capture_output=True,
                          text=True, env=dict(env(False), S2S_TRACEBACK="1"), cwd=REPO)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and message in proc.stderr


@slow
@pytest.mark.parametrize("command, args, message", [
    ("fairseq-generate", ["--constraints"], "fairseq-generate has no constraints to read"),
    ("fairseq-generate", ["--print-step"], "--print-step prints the refinement steps"),
    ("fairseq-generate", ["--retain-iter-history"], "--retain-iter-history prints the refinement"),
    ("fairseq-interactive", ["--score-reference"], "input lines have none"),
])
def test_options_the_command_cannot_serve_are_one_line(small_data_bin, luong_runs, command, args,
                                                       message):
    """Each died with a traceback after the models loaded (fairseq's lstm too): fairseq-generate
    --constraints with a TypeError at the first batch, --print-step and --retain-iter-history
    with a KeyError after it (its translations half written), fairseq-interactive
    --score-reference with KeyError: 'target'. Now one error line; fairseq-interactive keeps
    --constraints (test_cli) and fairseq-generate --score-reference (test_cli)."""
    proc = run(command, small_data_bin, *USER_DIR, "--path", luong_runs[3] / "checkpoint_last.pt",
               "--beam", 2, "--cpu", *args, input="w1 w2 w3\n", check=False)
    line = one_error_line(proc, message)
    assert line.startswith(f"{command}: error: ") and "H-" not in proc.stdout, proc.stdout[-2000:]


FAKE_SACREMOSES = """
import os
def _log(kind, lang):
    with open(os.environ["FAKE_MOSES_LOG"], "a") as f:
        f.write(f"{kind} {lang}\\n")
class MosesTokenizer:
    def __init__(self, lang):
        _log("tokenizer", lang)
    def tokenize(self, x, aggressive_dash_splits=False, return_str=False, escape=True):
        return x
class MosesDetokenizer:
    def __init__(self, lang):
        _log("detokenizer", lang)
    def detokenize(self, tokens, return_str=True, unescape=True):
        return " ".join(tokens)
"""


@slow
def test_moses_tokenizer_takes_the_language_pair_of_the_data(small_data_bin, luong_runs,
                                                              tmp_path):
    """fairseq-interactive --tokenizer moses without --source-lang/--target-lang died before
    reading a line (hydra: "Error merging override tokenizer.source_lang=null"); now the
    tokenizer gets the data-bin's pair, as the task does, and sentences translate (sacremoses
    stood in for by a module that records the languages it is given). Given, the options work as
    before; a data folder naming no pair is one error line; without sacremoses fairseq's "Please
    install" is one line."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sacremoses.py").write_text(FAKE_SACREMOSES)
    log = tmp_path / "moses.log"

    def interactive(data, *extra, fake_moses=True):
        environ = dict(env(False), FAKE_MOSES_LOG=str(log))
        if fake_moses:
            environ["PYTHONPATH"] = str(fake)
        cmd = [str(BIN / "fairseq-interactive"), str(data), *map(str, USER_DIR), "--path",
               str(luong_runs[3] / "checkpoint_last.pt"), "--beam", "2", "--cpu",
               "--tokenizer", "moses", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=environ, cwd=REPO,
                              input="w1 w2 w3\nw4 w5\n")

    proc = interactive(small_data_bin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(line.startswith("H-") for line in proc.stdout.splitlines()) == 2
    assert log.read_text().split("\n")[:2] == ["tokenizer src", "detokenizer tgt"]
    log.unlink()
    assert interactive(small_data_bin, "--source-lang", "src", "--target-lang", "tgt").returncode == 0
    assert log.read_text().split("\n")[:2] == ["tokenizer src", "detokenizer tgt"]
    dicts_only = tmp_path / "dicts"
    dicts_only.mkdir()
    for name in ("dict.src.txt", "dict.tgt.txt"):
        (dicts_only / name).write_text((small_data_bin / name).read_text())
    one_error_line(interactive(dicts_only), "--tokenizer moses needs --source-lang and "
                                            "--target-lang", str(dicts_only))
    if importlib.util.find_spec("sacremoses") is None:
        one_error_line(interactive(small_data_bin, fake_moses=False), "pip install sacremoses")


@slow
def test_eval_bleu_detokenizer_takes_the_target_language(small_data_bin, tmp_path):
    """fairseq-train --eval-bleu --eval-bleu-detok moses detokenized with English rules whatever
    the target language (moses's default "en"; sacremoses stood in for by a module recording the
    languages it is given); now with the task's pair, and the languages of
    --eval-bleu-detok-args where given."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sacremoses.py").write_text(FAKE_SACREMOSES)
    log = tmp_path / "moses.log"
    environ = dict(env(False), FAKE_MOSES_LOG=str(log), PYTHONPATH=str(fake))

    def train(save, *extra):
        cmd = [str(BIN / "fairseq-train"), *map(str, luong_cmd(small_data_bin, tmp_path / save, 2)),
               "--eval-bleu", "--eval-bleu-detok", "moses", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=environ, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "'bleu'" in proc.stdout or "| bleu " in proc.stdout, proc.stdout[-2000:]
        made = log.read_text().split("\n")
        log.unlink()
        return made

    assert train("a")[-3:-1] == ["tokenizer src", "detokenizer tgt"]  # was: en, en
    assert train("b", "--eval-bleu-detok-args", '{"target_lang": "fr"}')[-3:-1] == [
        "tokenizer src", "detokenizer fr"]


BOTH_COMMANDS = """
import io, sys, contextlib
from fairseq_cli import generate, interactive  # both imported, as scripts/gpu_check.py does
def call(module, argv, stdin=""):
    sys.argv, sys.stdin, out = [module.__name__] + argv, io.StringIO(stdin), io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            module.cli_main()
    except Exception as e:
        return type(e).__name__ + ": " + str(e)
    return out.getvalue()
common = sys.argv[1:]
text = call(generate, common + ["--score-reference"])
print("generate", sum(line.startswith("H-") for line in text.splitlines()))
print("interactive", call(interactive, common + ["--score-reference"], "w1 w2\\n").strip())
"""


@slow
def test_the_command_running_decides_not_the_modules_imported(small_data_bin, luong_runs):
    """In a process that imports both commands' modules (fairseq-interactive imports
    fairseq-generate's; scripts/gpu_check.py runs both), fairseq-generate --score-reference
    scored its references: the check reads the command running, not the modules loaded (it
    refused fairseq-generate there when it read the modules)."""
    proc = subprocess.run([str(BIN / "python"), "-c", BOTH_COMMANDS, str(small_data_bin), *USER_DIR,
                           "--path", str(luong_runs[3] / "checkpoint_last.pt"), "--cpu"],
                          capture_output=True, text=True, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == "generate 20", proc.stdout[-2000:]
    assert lines[-1].startswith("interactive ConfigError: --score-reference scores the references"), lines[-1]


@slow
def test_missing_restore_file_is_an_error(small_data_bin, luong_runs, tmp_path):
    """fairseq trained from scratch (one INFO line) when --restore-file named no file."""
    cmd = luong_cmd(small_data_bin, tmp_path / "ck", 2)
    line = one_error_line(run("fairseq-train", *cmd, "--restore-file", tmp_path / "nope.pt", check=False),
                          f"--restore-file {tmp_path / 'nope.pt'}: no such file")
    assert "train from scratch" in line and not (tmp_path / "ck" / "checkpoint_last.pt").exists()
    # a name in --save-dir: fairseq reads it from the working folder; the error says so
    (tmp_path / "ck").mkdir(exist_ok=True)
    shutil.copy(luong_runs[3] / "checkpoint_last.pt", tmp_path / "ck" / "model.pt")
    line = one_error_line(run("fairseq-train", *cmd, "--restore-file", "model.pt", check=False),
                          f"did you mean {tmp_path / 'ck' / 'model.pt'}?")
    # SAVE_DIR/checkpoint_last.pt named explicitly on a first run: fairseq's default, no error
    run("fairseq-train", *luong_cmd(small_data_bin, tmp_path / "ck3", 2), "--restore-file",
        tmp_path / "ck3" / "checkpoint_last.pt")
    run("fairseq-train", *cmd, "--restore-file", luong_runs[3] / "checkpoint_last.pt",
        "--reset-optimizer", "--reset-dataloader", "--reset-meters")  # an existing one loads
    # fairseq reads --restore-file X.pt with --checkpoint-suffix S as XS.pt: no error for that
    shutil.copy(luong_runs[3] / "checkpoint_last.pt", tmp_path / "m_x.pt")
    out = run("fairseq-train", *luong_cmd(small_data_bin, tmp_path / "ck4", 2), "--checkpoint-suffix", "_x",
              "--restore-file", tmp_path / "m.pt", "--reset-optimizer", "--reset-dataloader",
              "--reset-meters")
    assert f"Loaded checkpoint {tmp_path / 'm_x.pt'}" in out.stdout + out.stderr


@slow
def test_generate_with_other_data_bin(small_data_bin, luong_runs, tmp_path):
    *_, straight = luong_runs
    other = tmp_path / "data-bin"
    shutil.copytree(small_data_bin, other)
    with open(other / "dict.src.txt", "a") as f:  # a corpus with more source words
        f.writelines(f"extra{i} 1\n" for i in range(9))
    proc = run("fairseq-generate", other, *USER_DIR, "--path", straight / "checkpoint_last.pt",
               "--cpu", check=False)
    n_trained, n_now = (len(Dictionary.load(str(d / "dict.src.txt"))) for d in (small_data_bin, other))
    assert n_now == n_trained + 9
    line = one_error_line(proc, f"source dictionary of {n_trained} types", f"has {n_now} types")
    assert "size mismatch" not in proc.stderr, line


def test_a_model_run_in_the_reverse_direction_is_an_error(small_data_bin, luong_runs, tmp_path):
    """fairseq-generate and -interactive infer the language pair from the data-bin's file names
    where --source-lang/--target-lang are not given. A model trained tgt->src run that way, and
    one trained src->tgt (pair inferred, now recorded in the checkpoint) run with the pair
    reversed, translated the other side with the wrong embeddings (these dictionaries are the
    same size, as a joined one is): nonsense, without a word. Now one error line naming the pair
    to give; given it, the model translates as before."""
    *_, straight = luong_runs
    trained = straight / "checkpoint_last.pt"
    assert load_state(trained)["extra_state"]["language_pair"] == ["src", "tgt"]
    generate = ["fairseq-generate", small_data_bin, *USER_DIR, "--cpu", "--batch-size", 8]
    one_error_line(run(*generate, "--path", trained, "--source-lang", "tgt", "--target-lang", "src",
                       check=False),
                   f"{trained} translates src->tgt", "this command reads tgt->src",
                   "give --source-lang src --target-lang tgt")
    reverse = tmp_path / "reverse"
    run("fairseq-train", *luong_cmd(small_data_bin, reverse, 2), "--source-lang", "tgt",
        "--target-lang", "src")
    model = reverse / "checkpoint_last.pt"
    one_error_line(run(*generate, "--path", model, check=False), "translates tgt->src",
                   "reads src->tgt", "give --source-lang tgt --target-lang src")
    one_error_line(run("fairseq-interactive", small_data_bin, *USER_DIR, "--path", model, "--cpu",
                       input="w1 w2\n", check=False), "give --source-lang tgt --target-lang src")
    right = parse_generate(run(*generate, "--path", model, "--source-lang", "tgt",
                               "--target-lang", "src").stdout)
    assert sorted(right["H"]) == list(range(20))


def test_generate_with_another_dictionary_of_the_same_size(small_data_bin, luong_runs, tmp_path):
    """A data-bin whose dictionary has as many types as the model's, but other words or another
    order (another corpus's, prepare_data with the same --vocab-size), made the embeddings stand
    for other words, silently. fairseq-train records a fingerprint of each dictionary; a data-bin
    with other dictionaries is one error line, its own translates."""
    *_, straight = luong_runs
    model = straight / "checkpoint_last.pt"
    recorded = load_state(model)["extra_state"]["dictionaries"]
    assert sorted(recorded) == ["source", "target"]
    for side, lang in (("source", "src"), ("target", "tgt")):
        other = tmp_path / side
        shutil.copytree(small_data_bin, other)
        lines = (other / f"dict.{lang}.txt").read_text().splitlines(keepends=True)
        lines[0], lines[1] = lines[1], lines[0]  # two words' rows swapped
        (other / f"dict.{lang}.txt").write_text("".join(lines))
        proc = run("fairseq-generate", other, *USER_DIR, "--path", model, "--cpu", check=False)
        one_error_line(proc, f"{model} was trained with another {side} dictionary than the data-bin's",
                       "use the data-bin (dict.*.txt) the model was trained with")
    assert sorted(parse_generate(run("fairseq-generate", small_data_bin, *USER_DIR, "--path", model,
                                     "--cpu").stdout)["H"]) == list(range(20))


@slow
def test_fairseq_models_with_other_dictionaries_are_one_line(small_data_bin, tmp_path):
    """fairseq's own models (here its lstm, trained with the plugin loaded): a data-bin whose
    dictionary has another size ended in torch's traceback listing the mismatched weights, one of
    the same size with other words translated with the wrong embeddings, silently (the plugin
    checked its own models only). Now one error line for each."""
    run("fairseq-train", small_data_bin, *USER_DIR, "--arch", "lstm", "--encoder-embed-dim", 8,
        "--encoder-hidden-size", 8, "--decoder-embed-dim", 8, "--decoder-hidden-size", 8,
        "--decoder-out-embed-dim", 8, "--optimizer", "adam", "--lr", "0.01", "--max-tokens", 1000,
        "--max-update", 2, "--save-dir", tmp_path / "lstm", "--no-progress-bar", "--cpu")
    model = tmp_path / "lstm" / "checkpoint_last.pt"
    bigger, swapped = tmp_path / "bigger", tmp_path / "swapped"
    for other in (bigger, swapped):
        shutil.copytree(small_data_bin, other)
    with open(bigger / "dict.tgt.txt", "a") as f:
        f.writelines(f"extra{i} 1\n" for i in range(9))
    lines = (swapped / "dict.src.txt").read_text().splitlines(keepends=True)
    (swapped / "dict.src.txt").write_text("".join([lines[1], lines[0]] + lines[2:]))
    n = len(Dictionary.load(str(small_data_bin / "dict.tgt.txt")))
    one_error_line(run("fairseq-generate", bigger, *USER_DIR, "--path", model, "--cpu", check=False),
                   f"{model} was trained with a dictionary of {n} types", f"has {n + 9} types")
    one_error_line(run("fairseq-generate", swapped, *USER_DIR, "--path", model, "--cpu", check=False),
                   f"{model} was trained with another source dictionary than the data-bin's")
    assert sorted(parse_generate(run("fairseq-generate", small_data_bin, *USER_DIR, "--path", model,
                                     "--cpu").stdout)["H"]) == list(range(20))


def test_the_trained_language_pair_of_a_checkpoint():
    from argparse import Namespace

    from fairseq_s2s_attn.checkpoint import trained_pair

    def state(task=None, recorded=None, args=None):
        extra = {} if recorded is None else {"language_pair": recorded}
        return {"cfg": None if task is None else {"task": task}, "args": args, "extra_state": extra}

    assert trained_pair(state({"source_lang": "de", "target_lang": "en"})) == ("de", "en")
    # the options as given win over the pair recorded (the same pair when both are there)
    assert trained_pair(state({"source_lang": "de", "target_lang": "en"}, ["x", "y"])) == ("de", "en")
    assert trained_pair(state({"source_lang": None, "target_lang": None}, ["en", "de"])) == ("en", "de")
    assert trained_pair(state({"source_lang": None, "target_lang": None})) is None
    assert trained_pair(state({"source_lang": "de", "target_lang": None})) is None
    assert trained_pair(state(args=Namespace(source_lang="fr", target_lang="en"))) == ("fr", "en")
    assert trained_pair(state({}, ["en"])) is None  # not a pair
    assert trained_pair({"cfg": {"task": {}}, "extra_state": None}) is None
    assert trained_pair(None) is None


def test_dictionary_fingerprints():
    from fairseq_s2s_attn.checkpoint import fingerprint, trained_dictionaries

    def words(*types):
        d = Dictionary()
        for t in types:
            d.add_symbol(t)
        return d

    assert fingerprint(words("x", "y")) == fingerprint(words("x", "y")) != fingerprint(words("y", "x"))
    assert fingerprint(words("x", "yz")) != fingerprint(words("xy", "z"))
    assert fingerprint(make_dict(12)) != fingerprint(make_dict(12, prefix="v"))
    assert fingerprint(None) is None
    assert trained_dictionaries({"extra_state": {"dictionaries": {"source": "ab", "target": 3}}}) \
        == {"source": "ab"}
    assert trained_dictionaries({"extra_state": None}) == {} == trained_dictionaries(None)


# ------------------------------------------------------------------ empty and too-long sources

LINES = ["w1 w2 w3", "", "   ", "w4 w5 w6 w7 w8 w9 w1 w2", "w4"]


@slow
def test_interactive_empty_and_too_long_lines(small_data_bin, luong_runs):
    """Empty lines translate to empty output; with --skip-invalid-size-inputs-valid-test a line
    longer than --max-source-positions is skipped with a warning (no output line, the others keep
    their ids); without it the command stops with one error line."""
    *_, straight = luong_runs
    args = [small_data_bin, *USER_DIR, "--path", straight / "checkpoint_last.pt", "--beam", 3,
            "--source-lang", "src", "--target-lang", "tgt", "--cpu", "--print-alignment",
            "--max-source-positions", 6]
    text = "\n".join(LINES) + "\n"
    proc = run("fairseq-interactive", *args, "--skip-invalid-size-inputs-valid-test",
               "--buffer-size", 8, "--batch-size", 8, input=text)
    res = parse_generate(proc.stdout)
    assert sorted(res["H"]) == [0, 1, 2, 4]  # line 3 (9 tokens with </s>) skipped
    assert res["H"][1] == res["H"][2] == "" and res["A"][1] == ""
    assert res["H"][0] and res["H"][4]
    assert "empty source sentence(s): translated to empty output" in proc.stdout
    assert "1 samples have invalid sizes and will be skipped" in proc.stdout

    proc = run("fairseq-interactive", *args, input=text, check=False)
    line = one_error_line(proc, "longer than the limit", "9 source", "6 source",
                          "--skip-invalid-size-inputs-valid-test")
    assert "--truncate-source" not in line  # it acts on binarized data only, not on these lines


@slow
def test_interactive_input_that_is_not_utf8(small_data_bin, luong_runs, tmp_path):
    """A line that is not UTF-8 ended fairseq-interactive with a UnicodeDecodeError traceback
    (--input FILE) or sentencepiece's "Unable to cast" (standard input); now one error line
    names it, and the lines before it on standard input are translated."""
    import subprocess

    from clitools import BIN, env

    *_, straight = luong_runs
    args = [str(small_data_bin), *map(str, USER_DIR), "--path", str(straight / "checkpoint_last.pt"),
            "--source-lang", "src", "--target-lang", "tgt", "--cpu", "--beam", "2"]
    data = "w1 w2 w3\nw4 caf\xe9 w5\nw6\n".encode("latin-1")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(data)
    proc = run("fairseq-interactive", *args, "--input", bad, check=False)
    one_error_line(proc, f"{bad}: line 2 is not UTF-8 text")
    proc = subprocess.run([str(BIN / "fairseq-interactive"), *args], input=data, env=env(),
                          capture_output=True, timeout=300)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode(errors="replace"))
    one_error_line(proc, "standard input: line 2 is not UTF-8 text")
    assert sorted(parse_generate(proc.stdout)["H"]) == [0]


@slow
def test_language_model_samples_longer_than_the_limit(small_data_bin, tmp_path):
    """fairseq-train of a language model (the --lm-path of shallow fusion) with sentences longer
    than --tokens-per-sample: fairseq's "Size of sample #N is invalid" became a TypeError in the
    plugin's message, which assumed (source, target) sizes. Now one error line with the
    language model's options; with --skip-invalid-size-inputs-valid-test it trains."""
    raw = small_data_bin.parent / "raw"
    run("fairseq-preprocess", "--only-source", "--srcdict", small_data_bin / "dict.tgt.txt",
        "--trainpref", raw / "train.tgt", "--validpref", raw / "valid.tgt", "--destdir",
        tmp_path / "lm-bin", "--workers", 1)
    train = ["fairseq-train", tmp_path / "lm-bin", *USER_DIR, "--task", "language_modeling",
             "--arch", "lstm_lm", "--decoder-embed-dim", 8, "--decoder-hidden-size", 8,
             "--decoder-out-embed-dim", 8, "--tokens-per-sample", 5, "--sample-break-mode", "eos",
             "--optimizer", "adam", "--lr", "0.01", "--max-tokens", 400, "--max-update", 2,
             "--save-dir", tmp_path / "lm", "--no-progress-bar", "--cpu"]
    proc = run(*train, check=False)
    one_error_line(proc, "sample(s) longer than the limit", "the limit is 5 (--tokens-per-sample",
                   "--skip-invalid-size-inputs-valid-test")
    assert "--truncate-source" not in proc.stderr and "source" not in proc.stderr.split("error:")[1]
    run(*train, "--skip-invalid-size-inputs-valid-test")
    assert (tmp_path / "lm" / "checkpoint_last.pt").exists()


@slow
def test_dataset_impl_cached_trains_as_mmap(small_data_bin, tmp_path):
    """--dataset-impl cached (served from memory after each epoch's prefetch) died before the
    first update with KeyError in IndexedCachedDataset: fairseq's trainer reads the first batch
    (its dummy batch) before anything was prefetched. Now it trains, and the same corpus trains
    and translates exactly as in fairseq's default mmap format."""
    raw = small_data_bin.parent / "raw"
    cached = tmp_path / "cached"
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref",
        raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test", "--destdir",
        cached, "--dataset-impl", "cached", "--srcdict", small_data_bin / "dict.src.txt",
        "--tgtdict", small_data_bin / "dict.tgt.txt", "--workers", 1)
    out = {}
    for name, data, impl in (("mmap", small_data_bin, "mmap"), ("cached", cached, "cached")):
        train = run("fairseq-train", *luong_cmd(data, tmp_path / name, 20), "--dataset-impl", impl)
        gen = run("fairseq-generate", data, *USER_DIR, "--path", tmp_path / name / "checkpoint_last.pt",
                  "--dataset-impl", impl, "--beam", 2, "--cpu", "--batch-size", 8)
        out[name] = ([re.search(r"\| loss (\S+) .*\| num_updates (\d+)", line).groups()
                      for line in train.stdout.splitlines() if "valid on 'valid' subset" in line],
                     parse_generate(gen.stdout)["H"])
    assert len(out["cached"][0]) >= 2 and len(out["cached"][1]) == 20
    assert out["cached"] == out["mmap"]


@slow
def test_generate_truncate_source(small_data_bin, luong_runs):
    *_, straight = luong_runs
    proc = run("fairseq-generate", small_data_bin, *USER_DIR, "--path", straight / "checkpoint_last.pt",
               "--beam", 2, "--cpu", "--max-source-positions", 5, "--truncate-source")
    res = parse_generate(proc.stdout)
    assert sorted(res["S"]) == list(range(20))  # nothing skipped
    assert max(len(s.split()) for s in res["S"].values()) == 4  # 4 words + </s> = the limit
    # without it, the error offers it (binarized data)
    proc = run("fairseq-generate", small_data_bin, *USER_DIR, "--path", straight / "checkpoint_last.pt",
               "--beam", 2, "--cpu", "--max-source-positions", 5, check=False)
    one_error_line(proc, "longer than the limit", "--truncate-source", "--skip-invalid-size-inputs-valid-test")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_empty_source_rows_in_a_batch(arch):
    """An empty row gets an empty hypothesis (one per beam slot); the other rows are translated
    exactly as without it."""
    d = make_dict()
    model = build_model(arch, task=FakeTask(d, d)).eval()
    g = torch.Generator().manual_seed(3)
    src = random_tokens(d, [5, 1, 3, 1], left_pad=True, generator=g)  # rows 1 and 3: just </s>
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)}, "id": torch.arange(4)}
    gen = SequenceGenerator([model], d, beam_size=3, max_len_b=10)
    hypos = gen.generate([model], sample)
    assert [len(h) for h in hypos] == [3, 3, 3, 3]
    for i in (1, 3):
        assert hypos[i][0]["tokens"].tolist() == [d.eos()] and float(hypos[i][0]["score"]) == 0.0
    kept = src[[0, 2]]  # the batch without its empty rows
    alone = gen.generate([model], {"net_input": {"src_tokens": kept, "src_lengths": kept.ne(d.pad()).sum(1)}})
    for i, j in ((0, 0), (2, 1)):
        assert hypos[i][0]["tokens"].tolist() == alone[j][0]["tokens"].tolist()
        assert torch.allclose(hypos[i][0]["score"], alone[j][0]["score"], atol=1e-5)
    # --prefix-size: the prefix rows follow the rows they belong to (were not selected: an error)
    prefix = torch.tensor([[d.index("w4")], [d.index("w5")], [d.index("w6")], [d.index("w7")]])
    hypos = gen.generate([model], sample, prefix_tokens=prefix)
    alone = gen.generate([model], {"net_input": {"src_tokens": kept, "src_lengths": kept.ne(d.pad()).sum(1)}},
                         prefix_tokens=prefix[[0, 2]])
    for i in (1, 3):
        assert hypos[i][0]["tokens"].tolist() == [d.eos()]
    for i, j in ((0, 0), (2, 1)):
        assert hypos[i][0]["tokens"][0] == prefix[i, 0]
        assert hypos[i][0]["tokens"].tolist() == alone[j][0]["tokens"].tolist()


@slow
def test_empty_sources_of_other_models_are_left_alone(small_data_bin, fairseq_builtin_checkpoints):
    """The empty-source rule is ours (rnn_s2s models): fairseq's lstm decodes an empty source
    as stock fairseq does (a scored hypothesis, not the empty one with score 0)."""
    [lstm], _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(fairseq_builtin_checkpoints["lstm"])], arg_overrides={"data": str(small_data_bin)})
    d = task.source_dictionary
    src = random_tokens(d, [4, 1], left_pad=True, generator=torch.Generator().manual_seed(3))
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)}, "id": torch.arange(2)}
    hypos = SequenceGenerator([lstm.eval()], task.target_dictionary, beam_size=2, max_len_b=5).generate(
        [lstm], sample)
    assert float(hypos[1][0]["score"]) < 0  # a real log-probability, not the plugin's empty output


def test_every_data_shard_but_the_first_may_lack_dictionaries(small_data_bin, tmp_path):
    """fairseq reads the dictionaries from the first folder of --data a:b:c only; the data-bin
    check asks for them there and nowhere else."""
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    (tmp_path / "shard2").mkdir()
    cfg = TranslationConfig(data=f"{small_data_bin}{os.pathsep}{tmp_path / 'shard2'}", source_lang="src",
                            target_lang="tgt")
    task = TranslationTask.setup_task(cfg)
    assert len(task.source_dictionary) == len(Dictionary.load(str(small_data_bin / "dict.src.txt")))
    with pytest.raises(ConfigError, match="is not a data-bin"):
        TranslationTask.setup_task(TranslationConfig(data=f"{tmp_path / 'shard2'}{os.pathsep}{small_data_bin}",
                                                     source_lang="src", target_lang="tgt"))


def test_scoring_an_ensemble_without_attention_leaves_need_attn_as_it_was():
    """--score-reference with a model without attention in the ensemble: the scorer turns the
    others' attention off for that call (fairseq would average None into it) and must turn it
    back on, or a later beam search with the same models returns no attention."""
    from fairseq.sequence_scorer import SequenceScorer

    d = make_dict()
    luong, vanilla = (build_model(a, task=FakeTask(d, d)).eval() for a in ("rnn_luong_tiny", "rnn_vanilla_tiny"))
    luong.decoder.need_attn = True
    g = torch.Generator().manual_seed(5)
    src, tgt = random_tokens(d, [5, 3], left_pad=True, generator=g), random_tokens(d, [4, 2], left_pad=False,
                                                                                     generator=g)
    prev = tgt.roll(1, dims=1)
    prev[:, 0] = d.eos()
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1),
                            "prev_output_tokens": prev}, "target": tgt, "id": torch.arange(2)}
    hypos = SequenceScorer(d, compute_alignment=True).generate([luong, vanilla], sample)
    assert [h[0]["alignment"] for h in hypos] == [[], []]
    assert luong.decoder.need_attn is True
    beam = SequenceGenerator([luong], d, beam_size=2, max_len_b=4).generate([luong], sample)
    assert beam[0][0]["attention"].numel() > 0


# =========================================================================== 5. numerics


def _long_batch(d, gen):
    """Sources of 500 and 250 tokens, one of a single </s>, and one of padding only."""
    src = random_tokens(d, [500, 3, 1, 250], left_pad=True, generator=gen)
    src[1, :] = d.pad()
    tgt = random_tokens(d, [30, 5, 1, 12], left_pad=False, generator=gen)
    prev = tgt.roll(1, dims=1)
    prev[:, 0] = d.eos()
    prev[tgt.eq(d.pad())] = d.pad()
    return src, prev, tgt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_half_precision_forward_is_finite(arch, dtype):
    d = make_dict(20)
    model = build_model(arch, task=FakeTask(d, d)).to(dtype).eval()
    src, prev, _ = _long_batch(d, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, extra = model(src, src.ne(d.pad()).sum(1), prev)
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()
    assert torch.isfinite(model.get_normalized_probs((logits, extra), log_probs=True)).all()
    attn = extra["attn"][0]
    if attn is not None:
        assert torch.isfinite(attn).all()
        assert attn[1].abs().sum() == 0  # a source of padding only: no weight anywhere
        sums = attn[[0, 2, 3]].float().sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=2e-2)
        assert attn[0].float().masked_select(src[0].eq(d.pad())).abs().sum() == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_cpu_bf16_training_step(arch):
    d = make_dict(20)
    model = build_model(arch, task=FakeTask(d, d), cpu_bf16=True, dropout=True, init_range=0.1).train()
    src, prev, tgt = _long_batch(d, torch.Generator().manual_seed(1))
    logits, extra = model(src, src.ne(d.pad()).sum(1), prev)
    assert logits.dtype == torch.bfloat16  # autocast was on
    lprobs = model.get_normalized_probs((logits, extra), log_probs=True)
    loss = F.nll_loss(lprobs.view(-1, lprobs.size(-1)), tgt.view(-1), ignore_index=d.pad(), reduction="sum")
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
