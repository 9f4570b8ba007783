#!/usr/bin/env bash
# The GPU check, in one command on a machine with a CUDA GPU (`make gpu-check` does the same):
#   1. tests/test_cuda.py: every variant on CUDA equals the CPU (fp64) in training and decoding,
#      and trains and beam-searches in fp16, bf16 and autocast;
#   2. scripts/gpu_check.py: every architecture through fairseq-train, fairseq-generate
#      (--print-alignment too) and fairseq-interactive in fp32, --fp16, --bf16 and --amp;
#   3. scripts/benchmark.py --device cuda: speed and GPU memory against fairseq's lstm.
#
#   bash scripts/gpu_check.sh [DATA-BIN] [OUT]     # defaults: work/demo/data-bin, work/gpu-check
#
# Time on an H200: tests ~10 s, gpu_check.py ~15-25 s per architecture and precision (12 x 4 by
# default: about 15 minutes; CHECK_ARGS="--configs ..." for a subset), benchmark ~90 s.
# DATA-BIN: the demo corpus's (`python scripts/prepare_data.py all --lang de --work work/demo`).
# Knobs: CHECK_ARGS (extra options of gpu_check.py, e.g. "--updates 100 --precisions fp16 bf16"),
# BENCH_ARGS (of benchmark.py), SKIP="tests check bench" (any of them). Python: .venv's if there is
# one, else python3 (a GPU machine without the venv: see ../shared/gpu/build_device_site.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-work/demo/data-bin}
OUT=${2:-work/gpu-check}
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
[ -d "$DATA" ] || { echo "error: no data-bin at $DATA (python scripts/prepare_data.py all --lang de --work work/demo)" >&2; exit 2; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: torch sees no CUDA device here" >&2; exit 2; }
status=0
skip() { case " ${SKIP:-} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if ! skip tests; then
    echo "==== 1/3 tests/test_cuda.py"
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -n 15
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if ! skip check; then
    echo "==== 2/3 scripts/gpu_check.py"
    # shellcheck disable=SC2086
    "$PY" scripts/gpu_check.py --data "$DATA" --out "$OUT" ${CHECK_ARGS:-} 2> "$OUT/gpu_check.log" \
        | grep -v '^\[gpu-check\]' || status=1
fi
if ! skip bench; then
    echo "==== 3/3 scripts/benchmark.py --device cuda"
    # shellcheck disable=SC2086
    "$PY" scripts/benchmark.py --device cuda --data "$DATA" --out "$OUT/BENCHMARKS-gpu.md" \
        --json "$OUT/benchmark.json" ${BENCH_ARGS:-} 2> "$OUT/benchmark.log" || status=1
fi
exit $status
