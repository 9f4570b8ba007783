"""scripts/benchmark.py: end to end on a tiny synthetic data-bin, its error for missing data, and the
analytic FLOPs it adds for oneDNN's fused RNN kernel (which FlopCounterMode does not count)."""

import importlib.util
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clitools import SCRIPTS, run


def load_script(name):
    """scripts/NAME.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark():
    return load_script("benchmark")


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
    assert len(ratio_cols) == 6  # training, beam 5, beam 1, RSS, tensor memory of training and beam
    numeric = [i for i, h in enumerate(head) if h not in ("config", "precision")]
    for r in raw:
        for i in numeric:
            assert float(r[i].replace(",", "")) >= 0, (head[i], r)
        for i in ratio_cols:
            assert float(r[i]) > 0, (head[i], r)
        if r[0] == "lstm (fairseq)" and r[1] == "fp32":
            assert [r[i] for i in ratio_cols] == ["1.00"] * 6
    # tensor memory: at least the parameters (4 bytes each) and, in training, their gradients
    for r in rows:
        params_mb = float(r["params (M)"]) * 1e6 * 4 / 2 ** 20
        assert float(r["train tensor MB"]) >= 2 * params_mb * 0.99, r
        assert float(r["gen tensor MB"]) >= params_mb * 0.99, r
    # where beam search spends its time: three shares per configuration, and the bound they imply
    # (at least the speed measured: products and search are at most all of the time)
    section = text[text.index("generation time by part"):]
    parts = [ln for ln in section.splitlines() if ln.startswith(("| rnn_luong_nofeed |", "| lstm |"))]
    assert len(parts) == 4
    best_lstm = max(float(r["beam-5 sent/s"].replace(",", "")) for r in rows if r["config"] == "lstm (fairseq)")
    for ln, r in zip(parts, rows):
        cells = [c.strip() for c in ln.strip("|").split("|")]
        shares = [float(c.rstrip("%")) for c in cells[2:5]]
        assert all(0 <= x <= 100 for x in shares) and 90 <= sum(shares) <= 102
        measured = float(r["beam-5 sent/s"].replace(",", "")) / best_lstm
        assert float(cells[5]) >= measured * 0.98, (cells, measured)
    assert "can be at most" in text
    # the fused RNN kernel of the non-input-feeding decoder was added analytically
    assert "added analytically for: " in text and "rnn_luong_nofeed fp32" in text


def test_tensor_peak_counts_new_storages_until_they_are_freed():
    bench = load_benchmark()
    param = torch.zeros(1000)  # exists before: counted only as static bytes
    with bench.TensorPeak(static=param.numel() * 4) as tp:
        a = torch.ones(1000, 1000)  # 4 MB
        a.view(-1)[:10].mul_(3)  # a view and an in-place op: no new storage
        a.add_(1)
        param.add_(1)
        b = a * 2  # 4 MB more
        del a, b
        c = torch.ones(10)
    assert tp.peak == 4000 + 2 * 4_000_000
    assert tp.current == 4000 + 40
    del c
    assert tp.current == 4000


def test_storage_bytes_counts_shared_storage_once():
    bench = load_benchmark()
    x = torch.zeros(100)
    assert bench.storage_bytes([x, x[:10], x.view(10, 10), torch.zeros(5, dtype=torch.bfloat16)]) == 410


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
            with FlopCounterMode(display=False, custom_mapping=bench.uncounted_flop_formulas(tally)) as fc:
                out, _ = rnn(x)
                out.sum().backward()
        totals.append(fc.get_total_flops())
        if fused and not tally:
            pytest.skip("nn.LSTM did not use oneDNN's fused kernel in this torch build")
    fused_total, decomposed_total = totals
    # the decomposed cells skip a few products with the zero initial state; within 3%
    assert abs(fused_total - decomposed_total) <= 0.03 * decomposed_total


def test_flops_are_counted_over_each_batchs_own_rows(gen):
    """--cpu-bf16 training pads its products over all positions to a bucket of rows
    (precision.padded_rows); count_flops counts the products asked for (36 target rows here, not
    the 64 run), the same as with the padding off, and leaves the padding switched on."""
    from conftest import FakeTask, build_model, make_dict, random_tokens
    from fairseq_s2s_attn import precision
    from fairseq_s2s_attn.criterion import FusedCrossEntropyCriterion

    bench = load_benchmark()
    d = make_dict()
    task = FakeTask(d, d)
    model = build_model("rnn_bahdanau_tiny", task=task, cpu_bf16=True).train()
    crit = FusedCrossEntropyCriterion(task, False)
    src = random_tokens(d, [7, 4, 6, 2], left_pad=True, generator=gen)
    target = random_tokens(d, [9, 3, 8, 2], left_pad=False, generator=gen)
    prev = torch.roll(target, 1, 1)
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1),
                            "prev_output_tokens": prev}, "target": target, "ntokens": 22}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def forward_backward(s):
        crit(model, s)[0].backward()

    def flops(padded_run):
        result = dict(train_tokens=22, train_updates=1, train_tok_s=1.0)
        bench.count_flops(dict(flop_batches=1), model, optimizer, forward_backward, [sample], result)
        with FlopCounterMode(display=False, custom_mapping=bench.uncounted_flop_formulas({})) as fc:
            # the padded work itself
            precision.PAD_ROWS = padded_run
            try:
                forward_backward(sample)
            finally:
                precision.PAD_ROWS = True
        return result["flops_counted"], fc.get_total_flops()

    counted, run_padded = flops(True)
    counted_plain, run_plain = flops(False)
    assert precision.PAD_ROWS is True
    assert counted == counted_plain == run_plain < run_padded


@pytest.mark.parametrize("bias_in_product", [True, False])
def test_flops_of_the_bf16_output_layer_are_its_three_products(bias_in_product, gen, monkeypatch):
    """Under --cpu-bf16 the fused loss's logits come from oneDNN's linear
    (criterion.BIAS_IN_PRODUCT), which FlopCounterMode does not count itself: with the
    benchmark's formulas the output layer counts 3 x 2 N C V (forward, both gradients) either
    way (it undercounted the bf16 rows by a third of that layer's products)."""
    from fairseq_s2s_attn import criterion

    bench = load_benchmark()
    monkeypatch.setattr(criterion, "BIAS_IN_PRODUCT", bias_in_product)
    n, c, v = 37, 16, 50
    x = torch.randn(n, c, generator=gen, requires_grad=True)
    w = torch.randn(v, c, generator=gen, requires_grad=True)
    b = torch.randn(v, generator=gen, requires_grad=True)
    target = torch.randint(2, v, (n,), generator=gen)
    with FlopCounterMode(display=False, custom_mapping=bench.uncounted_flop_formulas({})) as fc:
        loss, _, _ = criterion.OutputLayerLoss.apply(x, w, b, target, 1, torch.bfloat16, 1.0, 0.0,
                                                     False)
        loss.backward()
    assert fc.get_total_flops() == 3 * 2 * n * c * v


def device_table(markdown: str):
    """The main table of the --device cuda / --gpu-style report: (head, rows as dicts, raw rows)."""
    return table_rows(markdown)


def table_after(markdown: str, title: str):
    lines = markdown.splitlines()
    start = next(i for i, ln in enumerate(lines) if title in ln)
    table = []
    for ln in lines[start + 1:]:
        if ln.startswith("|"):
            table.append([c.strip() for c in ln.strip().strip("|").split("|")])
        elif table:
            break
    return table[0], table[2:]


@pytest.mark.slow
def test_gpu_style_path_on_the_cpu(tmp_path):
    """--device cpu --gpu-style: the --device cuda code path (one worker process, every config and
    precision, model.to(bf16) with an fp32 master copy, several generation batch sizes, the
    model/search split, the max-tokens search, JSON) on a tiny synthetic data-bin."""
    import json

    out, js = tmp_path / "BENCH.md", tmp_path / "bench.json"
    proc = run("benchmark.py", "--device", "cpu", "--gpu-style", "--synthetic", "--synthetic-train", 300,
               "--sizes", 16, "--precisions", "fp32", "bf16", "--updates", 2, "--warmup", 1,
               "--flop-batches", 1, "--max-tokens", 300, "--gen-sentences", 8, "--gen-batch-size", 4, 1,
               "--gen-sentences-bs1", 2, "--breakdown-batches", 1, "--peak-size", 128,
               "--max-tokens-search", "--max-tokens-search-cap", 600,
               "--out", out, "--json", js, timeout=300)
    text = out.read_text(encoding="utf-8")
    assert text in proc.stdout
    assert "(--device cpu, --gpu-style)" in text and "Matmul peak" in text
    assert "ONE worker process" in text

    configs = ["lstm (fairseq)", "rnn_vanilla", "rnn_bahdanau", "rnn_luong", "rnn_luong_nofeed"]
    precisions = ["fp32", "bf16 (model.to(bfloat16))"]
    head, rows, raw = device_table(text)
    assert all(len(r) == len(head) for r in raw)
    assert [(r["config"], r["precision"]) for r in rows] == [(c, p) for p in precisions for c in configs]
    for col in ("train tok/s", "beam-5 bs-4 sent/s", "beam-5 bs-4 tok/s", "beam-5 bs-1 sent/s",
                "beam-5 bs-1 tok/s", "GFLOP/update", "GFLOP/s", "% of peak"):
        assert col in head
    ratio_cols = [i for i, h in enumerate(head) if h == "× lstm"]
    assert len(ratio_cols) == 5  # training, beam 5 at batch 4 and 1, train and generation memory
    numeric = [i for i, h in enumerate(head) if h not in ("config", "precision", "notes")]
    for r in raw:
        assert r[-1] == "", r  # no failed phase
        for i in numeric:
            if "peak MB" in head[i] and r[i] == "–":  # RSS peak not resettable here
                continue
            assert float(r[i].replace(",", "")) >= 0, (head[i], r)
        if r[0] == "lstm (fairseq)":  # every ratio is against lstm at the same precision
            assert all(r[i] in ("1.00", "–") for i in ratio_cols), r
            assert r[ratio_cols[0]] == "1.00"

    # the model/search split of generation at the first batch size: one row per config and precision
    bhead, brows = table_after(text, "generation time at batch 4 by part")
    assert len(brows) == 10
    for r in brows:
        model, search = float(r[2].rstrip("%")), float(r[4].rstrip("%"))
        assert 0 <= model <= 100 and 0 <= search <= 100 and 98 <= model + search <= 102, r

    # the max-tokens search: a row per config, at the first precision
    shead, srows = table_after(text, "Largest --max-tokens")
    assert sorted(r[0] for r in srows) == sorted(c.split()[0] for c in configs)
    assert all(r[1].replace(",", "").isdigit() for r in srows)

    data = json.loads(js.read_text())
    assert data["worker_error"] is None and set(data["peaks"]) == {"fp32", "bf16"}
    assert len(data["rows"]) == 10
    for r in data["rows"]:
        assert r["train_tok_s"] > 0 and r["beam5_bs4"]["sent_s"] > 0 and r["beam5_bs1"]["sentences"] == 2
        assert r["train_updates"] == 2
    assert set(data["max_tokens_search"]) == {"lstm", "rnn_vanilla", "rnn_bahdanau", "rnn_luong",
                                              "rnn_luong_nofeed"}


def test_gpu_only_options_are_refused_on_the_cpu_benchmark():
    proc = run("benchmark.py", "--synthetic", "--precisions", "fp16", check=False, timeout=60)
    assert proc.returncode == 2 and "only with --device cuda" in proc.stderr
    proc = run("benchmark.py", "--synthetic", "--gen-batch-size", 8, 1, check=False, timeout=60)
    assert proc.returncode == 2 and "one value" in proc.stderr


def test_fp32_master_adam_is_adam_on_an_fp32_copy():
    """The fp16/bf16 optimizer step of the GPU mode: Adam on a flat fp32 master copy, copied back."""
    bench = load_benchmark()
    torch.manual_seed(0)
    low = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    ref = [p.detach().float().clone().requires_grad_(True) for p in low.parameters()]
    opt = bench.FP32MasterAdam(low.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(ref, lr=0.01)
    for step in range(3):
        for p, r in zip(low.parameters(), ref):
            g = torch.randn_like(r)
            p.grad, r.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        assert all(p.grad is None for p in low.parameters())
        flat = torch.cat([r.detach().reshape(-1) for r in ref])
        assert torch.allclose(opt.master.detach(), flat, atol=1e-6)
        for p, r in zip(low.parameters(), ref):
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), r.detach().to(torch.bfloat16))


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_analytic_cudnn_rnn_flops(layers, bidirectional):
    """The formula for cuDNN's fused RNN (aten._cudnn_rnn, which FlopCounterMode does not count):
    2 * tokens * 4H * (I + H) per layer and direction, twice that for backward; from the shapes of
    the weight list, as FlopCounterMode hands them over."""
    bench = load_benchmark()
    aten = torch.ops.aten
    if not hasattr(aten, "_cudnn_rnn"):
        pytest.skip("this torch build has no aten._cudnn_rnn")
    tally = {}
    formulas = bench.uncounted_flop_formulas(tally)
    rnn = nn.LSTM(24, 16, num_layers=layers, bidirectional=bidirectional)
    shapes = [tuple(w.shape) for w in rnn._flat_weights]
    T, B = 7, 5
    expected = 0
    for layer in range(layers):
        in_dim = 24 if layer == 0 else 16 * (2 if bidirectional else 1)
        expected += (2 if bidirectional else 1) * 2 * T * B * 64 * (in_dim + 16)
    assert formulas[aten._cudnn_rnn]((T, B, 24), shapes, 4, None, (layers, B, 16)) == expected
    assert formulas[aten._cudnn_rnn]((T * B, 24), shapes, 4, None, (layers, B, 16)) == expected  # packed
    assert formulas[aten._cudnn_rnn_backward]((T, B, 24), shapes, 4) == 2 * expected
    assert tally == {"cudnn_rnn": 2 * expected, "cudnn_rnn_backward": 2 * expected}


@pytest.mark.parametrize("name, rnn_type, feeding", [
    ("rnn_luong", "lstm", True), ("rnn_luong_nofeed", "lstm", False), ("rnn_luong_gru", "gru", False),
    ("rnn_bahdanau", "lstm", None), ("rnn_bahdanau_gru", "gru", None),
    ("rnn_bahdanau_gru_coverage", "gru", "coverage"),
])
def test_configs_parse_to_the_cell_and_feeding_they_name(name, rnn_type, feeding):
    """The matched-size options put LSTM cells in every row like fairseq's lstm; the *_gru
    configurations' own --rnn-type gru must win over that, and rnn_luong_gru is rnn_luong's
    default (no input feeding); the Bahdanau rows keep the paper's plain score, except
    rnn_bahdanau_gru_coverage, --arch rnn_bahdanau's own default (GRU, coverage)."""
    from fairseq import options

    bench = load_benchmark()
    for precision in ("fp32", "bf16"):
        opts = bench.model_options(name, precision, 32, 1, 0.1)
        args = options.parse_args_and_arch(options.get_training_parser(), ["data-bin", *opts])
        assert args.rnn_type == rnn_type and args.cpu_bf16 is (precision == "bf16")
        if feeding == "coverage":
            assert args.coverage is True
        elif feeding is not None:
            assert args.input_feeding is feeding
        else:
            assert args.coverage is False


@pytest.mark.slow
def test_beam_ab_takes_turns_and_reports_medians(small_data_bin):
    """scripts/beam_ab.py: every configuration in one process, beam 2 and 1, two rounds; a row per
    configuration and precision, speeds and ratios positive, lstm fp32 against itself 1.00; with
    --levers, a second table with each lever's speed-up per configuration, precision and beam."""
    proc = run("beam_ab.py", "--data", small_data_bin, "--archs", "lstm", "rnn_luong_nofeed",
               "--size", 16, "--beams", 2, 1, "--rounds", 2, "--gen-sentences", 8,
               "--gen-batch-size", 4, "--levers", "topk", "logsoftmax", "searchlines", timeout=300)
    assert "round 2/2 done" in proc.stderr
    main, levers = proc.stdout.split("Each lever off and on")
    lever_rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in levers.splitlines()
                  if ln.startswith("| ")][1:]  # after the header
    assert sorted((r[0], r[2], r[3]) for r in lever_rows if r[1] == "fp32") == sorted(
        (a, b, lever) for a in ("lstm", "rnn_luong_nofeed") for b in ("1", "2")
        for lever in ("logsoftmax", "searchlines", "topk"))
    assert len(lever_rows) == 24 and all(float(c) > 0 for r in lever_rows for c in r[4:])
    lines = [ln for ln in main.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:3] == ["config", "precision", "beam 2 sent/s"] and len(head) == 8
    rows = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): [c.strip() for c in ln.strip("|").split("|")[2:]]
            for ln in lines[1:]}
    assert set(rows) == {("lstm", "fp32"), ("lstm", "bf16 (torch.autocast)"),
                         ("rnn_luong_nofeed", "fp32"), ("rnn_luong_nofeed", "bf16 (--cpu-bf16)")}
    for cells in rows.values():
        assert all(float(c) > 0 for c in cells)
    assert rows[("lstm", "fp32")][1] == rows[("lstm", "fp32")][4] == "1.00"
    assert "8 sentences of test in batches of 4" in proc.stdout


@pytest.mark.slow
def test_train_ab_switches_each_lever_in_turns(small_data_bin):
    """scripts/train_ab.py: one row per configuration and lever, each from pairs of updates with
    the fast path off and on (2 batches x 2 rounds: 4 pairs), times and speed-ups positive."""
    proc = run("train_ab.py", "--data", small_data_bin, "--archs", "rnn_luong", "--size", 16,
               "--levers", "dropout", "adam", "context", "--updates", 2, "--rounds", 2, "--warmup", 1,
               "--max-tokens", 200, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]
    assert [r[:3] for r in rows] == [["rnn_luong", "bf16 (--cpu-bf16)", lever]
                                     for lever in ("dropout", "adam", "context")]
    for r in rows:
        assert r[3] == "4" and float(r[4]) > 0 and float(r[5]) > 0 and float(r[6]) > 0
    assert "2 batches x 2 rounds" in proc.stdout


@pytest.mark.slow
def test_train_ab_measures_the_accuracy_count_with_report_accuracy(small_data_bin):
    """The accuracy lever trains with --report-accuracy's criterion, which the report names;
    without --report-accuracy it is refused in one line (it would measure nothing)."""
    proc = run("train_ab.py", "--data", small_data_bin, "--archs", "rnn_luong_nofeed", "--size", 16,
               "--levers", "accuracy", "--report-accuracy", "--updates", 2, "--rounds", 1,
               "--warmup", 1, "--max-tokens", 200, timeout=300)
    assert ("--criterion fused_label_smoothed_cross_entropy --label-smoothing 0.1 "
            "--report-accuracy" in proc.stdout)
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in proc.stdout.splitlines()
            if ln.startswith("| rnn_luong_nofeed")]
    assert [r[2:4] for r in rows] == [["accuracy", "2"]] and float(rows[0][6]) > 0
    refused = run("train_ab.py", "--data", small_data_bin, "--levers", "accuracy", check=False,
                  timeout=120)
    assert refused.returncode == 2 and "add --report-accuracy" in refused.stderr.splitlines()[-1]


@pytest.mark.slow
def test_train_ab_runs_the_rows_lever_side_by_side(small_data_bin):
    """The rows lever: two worker processes (off, on) per round, their totals and peak memory;
    the cache sizes each ran with are named."""
    proc = run("train_ab.py", "--data", small_data_bin, "--archs", "rnn_bahdanau", "--size", 16,
               "--levers", "rows", "--updates", 2, "--rounds", 2, "--warmup", 1,
               "--max-tokens", 200, timeout=300)
    assert "Lever rows, side by side" in proc.stdout and "cache 16; on = rows padded" in proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| rnn_bahdanau")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert [r[2] for r in rows] == ["1", "2"]
    for r in rows:  # ms per update, speed-up, peak memory (the totals of 2 tiny updates may be 0.0)
        assert all(float(v) > 0 for v in r[5:])


@pytest.mark.slow
def test_memory_trend_reports_long_runs_against_both_lstm_rows(small_data_bin):
    """scripts/memory_trend.py: lstm fp32 as stock fairseq and with the plugin's run-time
    settings, then each configuration; the resident set every --every updates, the peak, and
    ratios that are the rows' own peaks over the lstm rows' (4 updates, every 2: 2 columns)."""
    proc = run("memory_trend.py", "--data", small_data_bin, "--archs", "rnn_luong", "--size", 16,
               "--precisions", "bf16", "fp32", "--updates", 4, "--every", 2, "--max-tokens", 200,
               timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[3:5] == ["RSS @2", "RSS @4"]
    rows = [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]
    assert [(r["config"], r["precision"], r["run-time settings"]) for r in rows] == [
        ("lstm", "fp32", "stock"), ("lstm", "fp32", "plugin"),
        ("rnn_luong", "bf16 (--cpu-bf16)", "plugin"), ("rnn_luong", "fp32", "plugin")]
    stock, plugin = float(rows[0]["peak MB"]), float(rows[1]["peak MB"])
    for r in rows:
        peak = float(r["peak MB"])
        assert float(r["RSS @2"]) > 0 and float(r["RSS @4"]) <= peak
        assert float(r["x lstm stock"]) == pytest.approx(peak / stock, abs=0.01)
        assert float(r["x lstm plugin"]) == pytest.approx(peak / plugin, abs=0.01)
    # the run-time settings each row ran with (glibc's heap kept only with the plugin's)
    assert "lstm fp32 stock: peak" in proc.stderr
    kept = [ln.endswith("True") for ln in proc.stderr.splitlines() if "freed memory kept" in ln]
    glibc = __import__("platform").libc_ver()[0] == "glibc"
    assert kept == [False, glibc, glibc, glibc]


@pytest.mark.parametrize("script", ["memory_trend.py", "train_ab.py"])
def test_training_scripts_name_the_fix_for_missing_data_but_no_synthetic_option(tmp_path, script):
    """They take benchmark.py's batches but have no --synthetic: the error must not offer it."""
    proc = run(script, "--data", tmp_path / "nothing", check=False, timeout=120)
    assert proc.returncode != 0 and "does not exist: --data must be a fairseq data-bin" in proc.stderr
    assert "prepare_data.py all --lang de --work work/demo" in proc.stderr
    assert "--synthetic" not in proc.stderr


def test_train_ab_levers_switch_the_fast_paths():
    """Each lever's switches set what its fast path reads; "on" restores the plugin's state."""
    train_ab = load_script("train_ab")
    from fairseq.modules import FairseqDropout

    from fairseq_s2s_attn import (attention, criterion, dropout, fused, native, optim, precision,
                                  stepgrad)

    names = [(dropout.Dropout, "forward"), (optim, "FUSED_ADAMW"), (attention, "FP32_CONTEXT"),
             (precision, "PAD_ROWS"), (criterion, "FORWARD_GRADIENT"), (stepgrad, "DEFER"),
             (attention, "SIGMOID_BACKWARD"), (criterion, "ARGMAX_BY_COUNT"), (fused, "ENABLED"),
             (stepgrad, "DEFER_SOURCES"), (criterion, "IN_PLACE_CHUNKS"),
             (criterion, "BIAS_IN_PRODUCT"), (native, "CELLS"), (native, "LOSS_ROWS"),
             (native, "DROPOUT"), (native, "SCORE")]
    state = [getattr(obj, name) for obj, name in names]
    switches = train_ab.levers()
    assert set(switches) == set(train_ab.LEVERS)
    try:
        for _, off in switches.values():
            off()
        assert dropout.Dropout.forward is FairseqDropout.forward
        assert optim.FUSED_ADAMW is None
        assert [getattr(obj, name) for obj, name in names[2:]] == [False] * 14
        for on, _ in switches.values():
            on()
        assert [getattr(obj, name) for obj, name in names] == state
    finally:
        for (obj, name), value in zip(names, state):
            setattr(obj, name, value)


def test_beam_ab_levers_switch_the_fast_paths():
    """Each lever of scripts/beam_ab.py turns its fast path off (the C loop's flag False,
    fairseq's own search lines) and on again."""
    beam_ab = load_script("beam_ab")
    from fairseq.sequence_generator import SequenceGenerator

    from fairseq_s2s_attn import native
    from fairseq_s2s_attn.patching import innermost

    flags = ["LOG_SOFTMAX", "TOPK", "SCORE", "CELLS"]
    state = [getattr(native, name) for name in flags]

    def plugins_scrub():
        return "nan_to_num_" in innermost(SequenceGenerator, "_generate").__code__.co_names

    assert plugins_scrub()
    try:
        for lever in beam_ab.LEVERS:
            beam_ab.switch(lever, False)
        assert [getattr(native, name) for name in flags] == [False] * 4 and not plugins_scrub()
        for lever in beam_ab.LEVERS:
            beam_ab.switch(lever, True)
        assert [getattr(native, name) for name in flags] == [True] * 4 and plugins_scrub()
    finally:
        for name, value in zip(flags, state):
            setattr(native, name, value)
        beam_ab.switch("searchlines", True)


def test_beam_ab_int8_rows_quantize_both_kinds_of_model(small_data_bin, monkeypatch):
    """scripts/beam_ab.py --precisions int8: fairseq's lstm through torch's quantize_dynamic (its
    Linear and LSTM layers), ours with --cpu-bf16 --cpu-int8 (the decoder's step weights in
    int8); both still decode."""
    import argparse

    from fairseq.sequence_generator import SequenceGenerator

    from fairseq_s2s_attn import int8
    if not int8.available():
        pytest.skip("no fbgemm int8 product in this torch")
    monkeypatch.setattr(int8, "MIN_ELEMENTS", 0)  # sizes 16
    beam_ab = load_script("beam_ab")
    args = argparse.Namespace(data=str(small_data_bin), size=16, layers=1, seed=1)
    task, lstm, _ = beam_ab.load("lstm", "int8", args)
    kinds = {type(m).__module__ for m in lstm.modules()}
    assert "torch.ao.nn.quantized.dynamic.modules.linear" in kinds
    assert "torch.ao.nn.quantized.dynamic.modules.rnn" in kinds
    _, ours, _ = beam_ab.load("rnn_luong_nofeed", "int8", args)
    assert ours.decoder.cpu_int8 and ours.decoder.cpu_bf16
    assert all(int8.int8_weight(w) is not None for w in ours.decoder.step_weights())
    assert beam_ab.precision_label("lstm", "int8") == "int8 (torch's quantize_dynamic)"
    task.load_dataset("test")
    sample = next(iter(task.get_batch_iterator(task.dataset("test"), max_sentences=4).next_epoch_itr()))
    for model in (lstm, ours):
        gen = SequenceGenerator([model], task.target_dictionary, beam_size=2, max_len_b=5)
        with torch.no_grad():
            assert all(len(h) == 2 for h in gen.generate([model], sample))


def test_beam_ab_needs_the_lstm_baseline(small_data_bin):
    proc = run("beam_ab.py", "--data", small_data_bin, "--archs", "rnn_luong", check=False)
    assert proc.returncode == 2 and "--archs needs lstm" in proc.stderr


def refused(capsys, main, argv):
    """main(argv) stops in argparse: exit status 2, one `error:` line, no traceback."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_bad_sizes_and_output_paths_are_refused_up_front(tmp_path, capsys):
    """Checked before the synthetic data is built or anything measured: --out in a missing folder
    was found only when the report was written, after the whole benchmark."""
    bench = load_benchmark()
    assert "--sizes must be at least 1" in refused(capsys, bench.main, ["--synthetic", "--sizes", 16, 0])
    for option in ("--out", "--json"):
        line = refused(capsys, bench.main, ["--synthetic", option, tmp_path / "nodir" / "b.md"])
        assert f"{option} {tmp_path / 'nodir' / 'b.md'}: no folder {tmp_path / 'nodir'}" in line
        assert f"{option} {tmp_path} is a folder" in refused(capsys, bench.main, ["--synthetic", option, tmp_path])
    line = refused(capsys, bench.main, ["--synthetic", "--gen-split", "dev"])
    assert "the synthetic data-bin has train, valid and test" in line
    assert not list(tmp_path.iterdir())


def test_missing_gen_split_lists_the_splits(tmp_path):
    """A data-bin without the --gen-split: not "Build the demo data first", but the splits it has."""
    bench = load_benchmark()
    (tmp_path / "dict.src.txt").write_text("a 1\n")
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.src-tgt.src.bin").write_bytes(b"")
    bench.check_data(str(tmp_path), "test")
    with pytest.raises(SystemExit) as e:
        bench.check_data(str(tmp_path), "dev")
    assert str(e.value.code) == f"error: --gen-split dev: {tmp_path} has no dev.*.bin; its splits: test, train, valid"


@pytest.mark.parametrize("option", ["--rounds", "--beams", "--size", "--gen-sentences", "--gen-batch-size"])
def test_beam_ab_refuses_counts_below_one(option, tmp_path, capsys):
    """--rounds 0 was a StatisticsError after building every model, --gen-sentences 0 printed
    0.0 sent/s: refused before the data is read."""
    sys.path.insert(0, str(SCRIPTS))
    import beam_ab

    line = refused(capsys, beam_ab.main, ["--data", tmp_path / "nothing", option, 0])
    assert f"argument {option}: must be at least 1, got '0'" in line
