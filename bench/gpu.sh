#!/usr/bin/env bash
# One command for a GPU machine (issue #3 item 7): ResNet-50 UniVIP / BYOL images/s in bf16 with synthetic input and
# with the real loader, and model FLOP utilisation. Arguments go to bench/gpu_bench.py (see its --help), e.g.
#   bench/gpu.sh --data demo_out/shards
# Prints a markdown table; writes $OUT/gpu_bench.json when $OUT is set. Finishes within --budget-s (default 320 s).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname 2>/dev/null || echo '?')" \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader || true
else
    echo "nvidia-smi: not found (no NVIDIA driver here)"
fi
df -h /dev/shm 2>/dev/null | tail -1 | awk '{print "/dev/shm: " $2 " size, " $4 " free"}' || true
echo "CPU cores: $(nproc 2>/dev/null || echo '?')"
"$PY" - <<'PY'
import platform, torch, torchvision, numpy, PIL
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}), torchvision {torchvision.__version__}, numpy {numpy.__version__}, "
      f"pillow {PIL.__version__}, cuda available: {torch.cuda.is_available()}")
PY
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_bench.py "$@"
