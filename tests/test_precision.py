"""fairseq's --bf16 without a TPU (precision.py): fairseq-train, fairseq-generate and
fairseq-interactive run a bfloat16 model on the machine's own device instead of dying on
'NoneType' object has no attribute 'xla_device'. On CPU here; the same code path runs on CUDA
(scripts/gpu_check.sh)."""

import argparse

import pytest
import torch
from omegaconf import OmegaConf

from clitools import REPO, parse_generate, run
from conftest import build_model
from fairseq_s2s_attn import precision

USER_DIR = ("--user-dir", REPO / "fairseq_s2s_attn")


def test_implied_tpu_is_cleared_only_for_bf16_without_torch_xla(monkeypatch):
    def cfg(bf16, tpu):
        return OmegaConf.create({"common": {"bf16": bf16, "tpu": tpu, "cpu": True},
                                 "optimizer": {"tpu": tpu, "lr": [0.1]}, "task": None})

    c = cfg(True, True)
    assert precision.clear_implied_tpu(c)
    assert c.common.tpu is False and c.optimizer.tpu is False
    c = cfg(False, True)  # --tpu asked for without --bf16: left alone
    assert not precision.clear_implied_tpu(c) and c.common.tpu is True
    monkeypatch.setattr(precision, "tpu_available", lambda: True)
    c = cfg(True, True)  # a TPU machine: fairseq's meaning stays
    assert not precision.clear_implied_tpu(c) and c.common.tpu is True


def test_bf16_inference_converts_the_model_and_fp16_wins():
    model = build_model("rnn_luong_tiny")
    common = argparse.Namespace(bf16=True, fp16=False)
    cfg = argparse.Namespace(common=common, generation=argparse.Namespace(beam=5))
    model.prepare_for_inference_(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    half = build_model("rnn_luong_tiny").half()
    common.fp16 = True  # fairseq-generate already made it fp16: no second conversion
    half.prepare_for_inference_(cfg)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_help_describes_what_bf16_now_does():
    out = run("fairseq-train", "--user-dir", REPO / "fairseq_s2s_attn", "--help").stdout
    flat = " ".join(out.split())
    assert "--bf16 use bfloat16: the model in bf16 with fp32 master weights" in flat
    assert "use bfloat16; implies --tpu" not in flat


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["rnn_bahdanau_tiny", "rnn_luong_tiny", "lstm"])
def test_bf16_train_generate_interactive(arch, small_data_bin, tmp_path):
    extra = (["--encoder-embed-dim", 16, "--decoder-embed-dim", 16, "--encoder-hidden-size", 16,
              "--decoder-hidden-size", 16, "--decoder-out-embed-dim", 16] if arch == "lstm" else [])
    common = ["--optimizer", "adam", "--lr", "0.005", "--max-tokens", 1000, "--max-update", 12,
              "--no-progress-bar", "--cpu", "--seed", 3, "--no-epoch-checkpoints", *extra]
    train = run("fairseq-train", small_data_bin, *USER_DIR, "--arch", arch, *common,
                "--save-dir", tmp_path / "bf16", "--bf16")
    out = train.stdout + train.stderr
    assert "xla_device" not in out and "Traceback" not in out
    assert "num_updates 12" in out
    assert "--bf16 on CPU: bfloat16 model with fp32 master weights" in out
    assert "'tpu': True" not in out.split("--bf16 on CPU")[1]  # no section left on TPU
    train_line = [line for line in out.splitlines() if "| train |" in line][-1]
    assert "loss_scale" not in train_line  # no loss scaling (--fp16 logs loss_scale)

    ckpt = tmp_path / "bf16" / "checkpoint_best.pt"
    gen = run("fairseq-generate", small_data_bin, *USER_DIR, "--path", ckpt, "--beam", 4,
              "--cpu", "--bf16", "--batch-size", 8, *(["--print-alignment"] if arch != "lstm" else []))
    res = parse_generate(gen.stdout)
    assert sorted(res["H"]) == list(range(20))
    assert "BLEU4" in gen.stdout
    inter = run("fairseq-interactive", small_data_bin, *USER_DIR, "--path", ckpt, "--beam", 3,
                "--cpu", "--bf16", input="3 4 5\n6 7\n")
    assert len([line for line in inter.stdout.splitlines() if line.startswith("H-")]) == 2
