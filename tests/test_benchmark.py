"""scripts/benchmark.py: end to end on a tiny synthetic data-bin, its error for missing data, and the
analytic FLOPs it adds for oneDNN's fused RNN kernel (which FlopCounterMode does not count)."""

import importlib.util

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clitools import SCRIPTS, run


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPTS / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str):
    """The rows of the first Markdown table after '### Sizes', as {column: cell} dicts."""
    lines = markdown.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("### Sizes"))
    table = []
    for ln in lines[start + 1:]:
        if ln.startswith("|"):
            table.append([c.strip() for c in ln.strip().strip("|").split("|")])
        elif table:
            break
    head, rows = table[0], table[2:]
    return head, [dict(zip(head, r)) for r in rows], rows


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path):
    out = tmp_path / "BENCH.md"
    proc = run("benchmark.py", "--synthetic", "--synthetic-train", 300, "--sizes", 16,
               "--archs", "rnn_luong_nofeed", "--precisions", "fp32", "bf16",
               "--updates", 2, "--warmup", 1, "--flop-batches", 1, "--max-tokens", 300,
               "--gen-sentences", 8, "--gen-batch-size", 4, "--peak-size", 256,
               "--out", out, timeout=300)
    text = out.read_text(encoding="utf-8")
    assert text in proc.stdout
    assert "Command: `python scripts/benchmark.py --synthetic" in text
    assert "1 intra-op thread" in text and "torch " in text and "logical cores" in text
    assert "Matmul peak" in text

    head, rows, raw = table_rows(text)
    assert all(len(r) == len(head) for r in raw)
    got = {(r["config"], r["precision"]) for r in rows}
    assert got == {("lstm (fairseq)", "fp32"), ("lstm (fairseq)", "bf16 (torch.autocast)"),
                   ("rnn_luong_nofeed", "fp32"), ("rnn_luong_nofeed", "bf16 (--cpu-bf16)")}
    ratio_cols = [i for i, h in enumerate(head) if h == "× lstm"]
    assert len(ratio_cols) == 4  # training, beam 5, beam 1, memory
    numeric = [i for i, h in enumerate(head) if h not in ("config", "precision")]
    for r in raw:
        for i in numeric:
            assert float(r[i].replace(",", "")) >= 0, (head[i], r)
        for i in ratio_cols:
            assert float(r[i]) > 0, (head[i], r)
        if r[0] == "lstm (fairseq)" and r[1] == "fp32":
            assert [r[i] for i in ratio_cols] == ["1.00"] * 4
    # where beam search spends its time: three shares per configuration, and the bound they imply
    section = text[text.index("generation time by part"):]
    parts = [ln for ln in section.splitlines() if ln.startswith(("| rnn_luong_nofeed |", "| lstm |"))]
    assert len(parts) == 4
    for ln in parts:
        shares = [float(c.strip().rstrip("%")) for c in ln.strip("|").split("|")[2:]]
        assert len(shares) == 3 and all(0 <= x <= 100 for x in shares) and 90 <= sum(shares) <= 102
    assert "can be at most" in text
    # the fused RNN kernel of the non-input-feeding decoder was added analytically
    assert "added analytically for: " in text and "rnn_luong_nofeed fp32" in text


def test_missing_data_names_the_fix(tmp_path):
    proc = run("benchmark.py", "--data", tmp_path / "nothing", check=False, timeout=120)
    assert proc.returncode != 0
    assert "prepare_data.py all --lang de --work work/demo" in proc.stderr
    assert "--synthetic" in proc.stderr


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_analytic_rnn_flops_match_the_decomposed_count(layers, bidirectional):
    bench = load_benchmark()
    torch.manual_seed(0)
    rnn = nn.LSTM(24, 16, num_layers=layers, bidirectional=bidirectional)
    x = torch.randn(7, 5, 24, requires_grad=True)
    totals = []
    for fused in (True, False):
        tally = {}
        with torch.backends.mkldnn.flags(enabled=fused):
            with FlopCounterMode(display=False, custom_mapping=bench.rnn_flop_formulas(tally)) as fc:
                out, _ = rnn(x)
                out.sum().backward()
        totals.append(fc.get_total_flops())
        if fused and not tally:
            pytest.skip("nn.LSTM did not use oneDNN's fused kernel in this torch build")
    fused_total, decomposed_total = totals
    # the decomposed cells skip a few products with the zero initial state; within 3%
    assert abs(fused_total - decomposed_total) <= 0.03 * decomposed_total
