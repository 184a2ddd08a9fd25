#!/usr/bin/env bash
# The learning benchmark's full mode, as one command for a GPU machine (bench/learn.py --mode gpu).
# The data is made beforehand where OpenCV's contrib selective search is installed and carried along:
#   python bench/learn.py --mode gpu --prepare-only --work learn_data        # ~30 MB of shards
#   bench/gpu_learn.sh learn_data [--seeds 0 1] [--budget-s 480]             # on the GPU machine
# Writes $OUT/learn.json (settings, steps, every run's accuracies and kNN curve), $OUT/learn.log and
# $OUT/runs.tar.gz (each run's log.jsonl, stdout and eval JSON) when $OUT is set.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="${1:?usage: bench/gpu_learn.sh DATA_DIR [learn.py flags]}"
shift
PY="${PYTHON:-python3}"
OUT="${OUT:-}"
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
echo "CPU cores: $(nproc)"
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
"$PY" bench/learn.py --mode gpu --work "$WORK" --seeds 0 1 "$@" ${OUT:+--json "$OUT/learn.json"} \
    2>&1 | tee ${OUT:+"$OUT/learn.log"} || status=$?
if [ -n "$OUT" ] && [ -d "$WORK/runs" ]; then
    (cd "$WORK" && tar czf "$OUT/runs.tar.gz" --exclude='*.pt' runs) || true
fi
exit "$status"
