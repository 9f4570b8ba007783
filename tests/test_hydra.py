"""fairseq-hydra-train with the configs in examples/hydra: each trains the architecture it names
(the model settings saved in the checkpoint are the architecture's own), and fairseq-generate
translates with the checkpoint."""

import argparse
from dataclasses import fields

import pytest
import torch
from omegaconf import OmegaConf

from clitools import BIN, REPO, parse_generate, run
from fairseq_s2s_attn import model as s2s_model
from fairseq_s2s_attn.config import RNNS2SConfig

CONFIG_DIR = REPO / "examples" / "hydra"
ARCHS = ["rnn_vanilla", "rnn_bahdanau", "rnn_luong", "rnn_bahdanau_paper", "rnn_luong_paper"]
CONFIGS = ARCHS + ["demo"]
# the demo's model: rnn_bahdanau with the precision scripts/demo.sh gives fairseq-train
DEMO_OVERRIDES = dict(cpu_bf16=True)
MODEL_FIELDS = [f.name for f in fields(RNNS2SConfig) if not f.name.startswith("_")]
# small sizes for a fast run; every other model setting is the config's own
SMALL = dict(encoder_embed_dim=8, decoder_embed_dim=8, encoder_hidden_size=8, decoder_hidden_size=16,
             decoder_out_embed_dim=8, attention_dim=8)


def expected_model(name):
    """Every model setting as `fairseq-train --arch ARCH` gives it (architecture function, then
    RNNS2SConfig's defaults), with the demo's overrides for demo.yaml."""
    arch = "rnn_bahdanau" if name == "demo" else name
    args = argparse.Namespace(arch=arch, **(DEMO_OVERRIDES if name == "demo" else {}))
    getattr(s2s_model, arch)(args)
    return arch, {k: getattr(args, k) for k in MODEL_FIELDS}


def load(name):
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_spells_out_the_architecture(name):
    """fairseq-hydra-train fills the model section from RNNS2SConfig before the architecture
    function runs, so every config must list the architecture's values itself."""
    arch, want = expected_model(name)
    model = load(name)["model"]
    assert model.pop("_name") == arch
    assert {k: model[k] for k in want} == want and set(model) == set(want)


def small_run(name, data_bin, save, **model):
    """fairseq-hydra-train's arguments for a few updates of config NAME at small sizes, with
    common.user_dir the worktree's package folder; model: further model settings."""
    small = dict(SMALL, **({"maxout_dim": 8} if load(name)["model"]["maxout_dim"] else {}), **model)
    args = ["--config-dir", CONFIG_DIR, "--config-name", name, f"task.data={data_bin}",
            f"checkpoint.save_dir={save}", f"common.user_dir={REPO / 'fairseq_s2s_attn'}",
            "common.cpu=true", "optimization.max_update=4", "dataset.max_tokens=400",
            "common.log_interval=1", *(f"model.{k}={v}" for k, v in small.items())]
    return args, small


@pytest.fixture(scope="module")
def trained(small_data_bin, tmp_path_factory):
    """Each config trained for a few updates by fairseq-hydra-train at small sizes; run outside
    the repository."""
    cwd = tmp_path_factory.mktemp("hydra_cwd")
    out = {}
    for name in CONFIGS:
        save = tmp_path_factory.mktemp(name)
        args, small = small_run(name, small_data_bin, save)
        run("fairseq-hydra-train", *args, cwd=cwd, timeout=300)
        out[name] = (save, small)
    assert not any(cwd.iterdir())  # nothing left in the working directory (no outputs/, .hydra/)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_hydra_train_then_generate(name, trained, small_data_bin):
    save, small = trained[name]
    state = torch.load(save / "checkpoint_best.pt", map_location="cpu", weights_only=False)
    saved = state["cfg"]["model"]
    arch, want = expected_model(name)
    want.update(small)
    assert saved["_name"] == arch
    assert {k: saved[k] for k in want} == want
    assert state["optimizer_history"][-1]["num_updates"] >= 1
    log = (save / "hydra_train.log").read_text()  # hydra's log of the run, beside the checkpoints
    assert "[train_inner]" in log
    assert "valid on 'valid' subset" in log

    gen = run("fairseq-generate", small_data_bin, "--user-dir", REPO / "fairseq_s2s_attn",
              "--path", save / "checkpoint_best.pt", "--beam", 2, "--batch-size", 32, "--cpu")
    res = parse_generate(gen.stdout)
    assert sorted(res["H"]) == list(range(20))


NO_DROPOUT = dict(encoder_dropout_in=0, encoder_dropout_out=0, decoder_dropout_in=0, decoder_dropout_out=0)
PLUGIN_FIRST = ("-m", "fairseq_s2s_attn.hydra_train")


@pytest.mark.slow
def test_plugin_first_hydra_train_on_two_cpu_processes(small_data_bin, tmp_path):
    """fairseq-hydra-train loads the plugin after choosing how to start processes, so its CPU
    launcher came too late (fairseq stopped at "world size is 2 but have 0 available devices").
    python -m fairseq_s2s_attn.hydra_train loads it first: two processes, spawned by fairseq or
    started by torchrun, make the same updates as one process with update_freq 2 (dropout 0:
    each process draws its own dropout masks)."""
    params = {}
    for how, launcher, extra in (("one", ["python", *PLUGIN_FIRST], ["optimization.update_freq=[2]"]),
                                 ("spawned", ["python", *PLUGIN_FIRST],
                                  ["distributed_training.distributed_world_size=2"]),
                                 ("torchrun", ["torchrun", "--standalone", "--nproc-per-node", 2,
                                               *PLUGIN_FIRST], [])):
        args, _ = small_run("rnn_bahdanau", small_data_bin, tmp_path / how, **NO_DROPOUT)
        proc = run(*launcher, *args, "dataset.num_workers=0", *extra, cwd=tmp_path, timeout=300)
        log = (tmp_path / how / "hydra_train.log").read_text() + proc.stderr
        assert f"training on {1 if how == 'one' else 2} devices" in log, log[-3000:]
        if how != "one":  # gloo closed before the interpreter's shutdown (a SIGABRT once in CI)
            assert "distributed shutdown (rank 0)" in log, log[-3000:]
        state = torch.load(tmp_path / how / "checkpoint_last.pt", map_location="cpu", weights_only=True)
        assert state["optimizer_history"][-1]["num_updates"] == 4
        params[how] = state["model"]
    for how in ("spawned", "torchrun"):
        for name, value in params["one"].items():
            torch.testing.assert_close(params[how][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fairseq_hydra_train_under_torchrun_refuses_to_train_alone(small_data_bin, tmp_path):
    """Without the plugin loaded first, every torchrun process trained alone on all the data
    (exit status 0, the same checkpoints written twice); now each stops and names the command."""
    args, _ = small_run("rnn_luong", small_data_bin, tmp_path / "ck")
    proc = run("torchrun", "--standalone", "--nproc-per-node", 2, BIN / "fairseq-hydra-train", *args,
               "dataset.num_workers=0", cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode != 0
    assert "torchrun started 2 processes" in proc.stderr
    assert "-m fairseq_s2s_attn.hydra_train" in proc.stderr
    assert not (tmp_path / "ck" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("command", ["fairseq-hydra-train", "-m fairseq_s2s_attn.hydra_train"])
def test_refused_options_are_one_line_naming_hydra_keys(command, small_data_bin, tmp_path):
    """hydra catches the job's exceptions before the plugin's one-line hook: a refused
    combination printed a traceback of about 25 lines through fairseq, naming command-line
    options that a hydra user does not type."""
    args, _ = small_run("rnn_luong", small_data_bin, tmp_path / "ck", attention="dot",
                        decoder_hidden_size=12)
    if command.startswith("-m"):
        proc = run("python", *command.split(), *args, cwd=tmp_path, check=False, timeout=300)
    else:
        proc = run(command, *args, cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: model.attention dot needs model.decoder_hidden_size (12) ")
    assert "model.encoder_hidden_size" in lines[0] and "--" not in lines[0]
    assert not (tmp_path / "ck" / "checkpoint_last.pt").exists()


def test_hydra_keys_rewrites_options_only():
    """Options become hydra keys (a component's option its group's _name); text that merely
    contains '--' (a path, a value) stays as it is."""
    from fairseq_s2s_attn.hydra_train import hydra_keys
    assert hydra_keys("--path /runs/--seed/x.pt: no such file") == "common_eval.path /runs/--seed/x.pt: no such file"
    assert hydra_keys("use --criterion label_smoothed_cross_entropy (--coverage), --max-tokens.") == \
        "use criterion._name label_smoothed_cross_entropy (model.coverage), dataset.max_tokens."
    # a field of two groups (model and task) stays a command-line option
    assert hydra_keys("--max-source-positions 12") == "--max-source-positions 12"


def test_hydra_keys_name_the_group_of_a_mirrored_field():
    """fairseq mirrors some fields into a second group (distributed_training.fp16 is
    ``${common.fp16}``, distributed_training.tpu ``${common.tpu}``, bmuf.distributed_world_size
    ``${distributed_training.distributed_world_size}``); a hydra user sets the field of its own
    group, so an error about --fp16 under hydra names common.fp16. Counting the mirrors as a
    second group left those options unrewritten, as for a field two groups really have."""
    from fairseq_s2s_attn.hydra_train import hydra_keys
    assert hydra_keys("--fp16 needs --cpu and --max-tokens") == \
        "common.fp16 needs common.cpu and dataset.max_tokens"
    assert hydra_keys("--tpu, --memory-efficient-fp16 and --distributed-world-size 2") == \
        "common.tpu, common.memory_efficient_fp16 and distributed_training.distributed_world_size 2"
