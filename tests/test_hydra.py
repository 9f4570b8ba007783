"""fairseq-hydra-train with the configs in examples/hydra: each trains the architecture it names
(the model settings saved in the checkpoint are the architecture's own), and fairseq-generate
translates with the checkpoint."""

import argparse
from dataclasses import fields

import pytest
import torch
from omegaconf import OmegaConf

from clitools import REPO, parse_generate, run
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


@pytest.fixture(scope="module")
def trained(small_data_bin, tmp_path_factory):
    """Each config trained for a few updates by fairseq-hydra-train at small sizes; run outside
    the repository, with common.user_dir the worktree's package folder."""
    cwd = tmp_path_factory.mktemp("hydra_cwd")
    out = {}
    for name in CONFIGS:
        model = load(name)["model"]
        small = dict(SMALL, **({"maxout_dim": 8} if model["maxout_dim"] else {}))
        save = tmp_path_factory.mktemp(name)
        run("fairseq-hydra-train", "--config-dir", CONFIG_DIR, "--config-name", name,
            f"task.data={small_data_bin}", f"checkpoint.save_dir={save}",
            f"common.user_dir={REPO / 'fairseq_s2s_attn'}", "common.cpu=true",
            "optimization.max_update=4", "dataset.max_tokens=400", "common.log_interval=1",
            *(f"model.{k}={v}" for k, v in small.items()), cwd=cwd, timeout=300)
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
