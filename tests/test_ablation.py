"""scripts/ablation.py without running fairseq: every variant of the table is a valid model
configuration (parsed by fairseq's own option parser, then built), and the table's shape."""

import shlex
import sys

import pytest
from fairseq import options

from clitools import SCRIPTS
from conftest import FakeTask, make_dict
from fairseq_s2s_attn.model import RNNS2SModel

sys.path.insert(0, str(SCRIPTS))
import ablation  # noqa: E402


@pytest.mark.parametrize("name", list(ablation.VARIANTS))
def test_every_variant_parses_and_builds(name):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, ["data-bin", *ablation.VARIANTS[name], *shlex.split(ablation.DEFAULT_MODEL_ARGS)])
    d = make_dict()
    model = RNNS2SModel.build_model(args, FakeTask(d, d))
    if "local-" in name:
        assert model.decoder.attention.mode == name.split(" ")[0]
    if name.startswith("global ("):
        assert model.decoder.attention.score_name == name[len("global ("):].split(",")[0].rstrip(")")


def _parsed(name):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, ["data-bin", *ablation.VARIANTS[name], *shlex.split(ablation.DEFAULT_MODEL_ARGS)])
    return {k: v for k, v in vars(args).items() if k not in ("arch", "_name")}


def test_every_row_is_a_different_model():
    """One change per row: no two rows may end up as the same configuration once the
    architecture's defaults are filled (rnn_bahdanau's coverage default once made
    'bahdanau (additive)' the same model as 'bahdanau + coverage')."""
    configs = {name: _parsed(name) for name in ablation.VARIANTS}
    names = list(configs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert configs[a] != configs[b], (a, b)
    # Luong et al.'s Table 4 rows feed h~_{t-1} into the next step; the Bahdanau rows are the
    # paper's plain additive score except the coverage row
    for name, cfg in configs.items():
        if name.startswith(("global", "local")):
            assert cfg["input_feeding"] is True and cfg["rnn_type"] == "lstm", name
        if name.startswith(("bahdanau", "rnnsearch")):
            assert cfg["coverage"] is (name == "bahdanau + coverage"), name


def test_table_has_luong_table_4_shape():
    rows = [dict(name="global (dot)", ppl={"valid": 1.234, "test": 1.5}, bleu=42.04, params=1000,
                 updates=10, seconds=12.3)]
    text = ablation.table(rows, "Data: x.")
    lines = text.splitlines()
    assert lines[0] == "Data: x."
    assert lines[2].startswith("| System | Ppl (valid) | Ppl (test) | BLEU (test, beam 5) |")
    assert lines[4] == "| global (dot) | 1.23 | 1.50 | 42.0 | 1,000 | 10 | 12 s |"


def test_unknown_variant_and_missing_budget_are_errors(capsys):
    with pytest.raises(SystemExit):
        ablation.main(["--variants", "global (cosine)"])
    assert "unknown variant" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablation.main(["--max-update", "0"])
    assert "budget" in capsys.readouterr().err


def test_fairseq_runs_in_the_callers_folder(tmp_path, monkeypatch):
    """Paths in --model-args (an embedding file) resolve as the user typed them: the commands ran
    in the repository root before."""
    monkeypatch.chdir(tmp_path)
    proc = ablation.run([sys.executable, "-c", "import os; print(os.getcwd())"])
    assert proc.stdout.strip() == str(tmp_path)


def test_variants_with_commas_in_their_names_can_be_chosen():
    """Two rows' names hold commas ("global (general, scaled)"); --variants split at every comma
    and refused both halves of each."""
    text = "global (general, scaled), local-m (dot),rnnsearch (GRU, s0 from h<-1, maxout over s_{i-1})"
    names = ablation.variant_names(text)
    assert names == ["global (general, scaled)", "local-m (dot)",
                     "rnnsearch (GRU, s0 from h<-1, maxout over s_{i-1})"]
    assert all(n in ablation.VARIANTS for n in names)
    assert ablation.variant_names(",".join(ablation.VARIANTS)) == list(ablation.VARIANTS)
