#!/usr/bin/env bash
# The learning benchmark's full mode, as one command for a GPU machine (bench/learn.py --mode gpu): the category set,
# seeds 0 and 1, the lightly reference, BYOL, UniVIP and UniVIP without OT, all at once on the one GPU.
# The data is made beforehand where OpenCV's contrib selective search is installed, and carried along with the
# reference's wheels (the device reaches no package index):
#   python bench/learn.py --mode gpu --prepare-only --work learn_data        # ~30 MB of shards
#   python3 -m pip download -d .whl --no-deps lightly==1.6.0 lightning-utilities==0.15.3   # all the reference imports
#   bench/gpu_learn.sh learn_data [--budget-s 480]                          # on the GPU machine, learn_data and .whl carried
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
if ! "$PY" -c "import lightly" 2>/dev/null; then
    # the reference row needs lightly: the carried wheels, without deps (torch and torchvision are the machine's;
    # a wheel whose package is already installed there is skipped by the import order: the machine's come first)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-learn "$ROOT"/.whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site-learn"
fi
status=0
"$PY" bench/learn.py --mode gpu --work "$WORK" --seeds 0 1 --methods reference byol univip univip-no-ot "$@" \
    ${OUT:+--json "$OUT/learn.json"} 2>&1 | tee ${OUT:+"$OUT/learn.log"} || status=$?
if [ -n "$OUT" ] && [ -d "$WORK/runs" ]; then
    (cd "$WORK" && tar czf "$OUT/runs.tar.gz" --exclude='*.pt' runs) || true
fi
exit "$status"
