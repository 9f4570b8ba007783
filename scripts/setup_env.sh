#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything both README
# commands need: torch (CPU wheel), fairseq (the fairseq-fixed fork, built without build
# isolation so it reuses our torch), sentencepiece, sacrebleu, matplotlib, tensorboardX
# (fairseq-train --tensorboard-logdir), pytest (with pytest-xdist: make test runs 2 processes)
# and this package.
#
# Idempotent: a second run checks a stamp file and returns in about a second.
#   VENV=/path/to/venv bash scripts/setup_env.sh      # default: .venv in the repository root
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
FAIRSEQ_SPEC="fairseq-fixed==0.12.3.1"
# fairseq's real runtime needs (its metadata also asks for torchaudio, which would pull another torch).
FAIRSEQ_RUNTIME="hydra-core==1.3.2 omegaconf==2.3.0 bitarray regex sacrebleu>=2.0 tqdm cffi scikit-learn packaging"
EXTRAS="sentencepiece matplotlib tensorboardX pytest pytest-timeout pytest-xdist>=3.8"
STAMP_KEY="v3 torch=$TORCH_VERSION $FAIRSEQ_SPEC | $FAIRSEQ_RUNTIME | $EXTRAS | $(sha1sum "$ROOT/setup.py" | cut -c1-12)"
STAMP="$VENV/.fairseq_s2s_attn_stamp"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_KEY" ] && "$VENV/bin/python" -c "import fairseq, fairseq_s2s_attn" 2>/dev/null; then
    exit 0
fi

echo "[setup] creating environment in $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Never let a dependency replace the CPU torch wheel with another build.
CONSTRAINTS="$VENV/constraints-s2s.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

"${PIP[@]}" install -q --upgrade "pip>=23" wheel "setuptools<81"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" numpy cython -c "$CONSTRAINTS"
"${PIP[@]}" install -q $FAIRSEQ_RUNTIME $EXTRAS -c "$CONSTRAINTS"
if ! "$VENV/bin/python" -c "import fairseq" 2>/dev/null; then
    echo "[setup] building $FAIRSEQ_SPEC (a few minutes the first time; pip caches the wheel)"
    MAX_JOBS="${MAX_JOBS:-2}" "${PIP[@]}" install -q --no-deps --no-build-isolation "$FAIRSEQ_SPEC"
fi
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import torch, fairseq, sentencepiece, sacrebleu  # noqa: F401
import fairseq_s2s_attn  # noqa: F401
print(f"[setup] ok: torch {torch.__version__}, fairseq {fairseq.__version__}")
PY
echo "$STAMP_KEY" > "$STAMP"
