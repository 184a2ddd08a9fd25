#!/usr/bin/env bash
# The GPU check, one command for a GPU machine, 9 minutes at most (GPU_CHECK_S=540): the CUDA-only tests (the step never synchronises),
# then bench/gpu_bench.py: the trainer's own step at the paper's ResNet-50 setting (largest batch that fits; BYOL,
# UniVIP crops, UniVIP RoIAlign; eager and --compile), a real `python -m train` run from shards that prep makes here
# out of data/sample (or --data SHARDS), and the step's top CUDA kernels. Arguments go to bench/gpu_bench.py (see its
# --help); `bench/gpu.sh --smoke` runs every part on the CPU at toy sizes. With $OUT set, the results go there:
# gpu_bench.json, gpu_bench.md, profile.txt, train_log.jsonl, gpu_check.log, cuda_tests.txt, roi_bench.txt,
# colour_bench.txt.
# A machine that lacks a package (OpenCV's contrib module for prep, say) takes wheels carried in .whl/: they are
# installed into /tmp/site first (docs/benchmarks.md says how to fetch them).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-}"
[ -n "$OUT" ] && mkdir -p "$OUT"
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname 2>/dev/null || echo '?')" \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader || true
else
    echo "nvidia-smi: not found (no NVIDIA driver here)"
fi
df -h /dev/shm 2>/dev/null | tail -1 | awk '{print "/dev/shm: " $2 " size, " $4 " free"}' || true
echo "CPU cores: $(nproc 2>/dev/null || echo '?')"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - <<'PY'
import platform, torch, torchvision, numpy, PIL
try:
    import cv2
    cv = f"{cv2.__version__} ({'with' if hasattr(cv2, 'ximgproc') else 'WITHOUT'} contrib: prep needs it)"
except ImportError:
    cv = "missing"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}), torchvision {torchvision.__version__}, numpy {numpy.__version__}, "
      f"pillow {PIL.__version__}, opencv {cv}, cuda available: {torch.cuda.is_available()}")
PY
status=0
case " $* " in
*" --smoke "*) ;;
*)
    # the eager cases (seconds); the compiled ones are marked slow: they compile for minutes
    timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_step.py -k cuda -m "not slow" 2>&1 \
        | tee ${OUT:+"$OUT/cuda_tests.txt"} || status=1
    # the RoIAlign variant's pooling alone, torchvision's kernel against train.roi's bmm (seconds)
    timeout 120 "$PY" bench/roi_bench.py --device cuda --batch 512 2>&1 | tee ${OUT:+"$OUT/roi_bench.txt"} || status=1
    # the colour augmentation eager against --compile's form (compiles two graphs first; their cache serves the step)
    timeout 150 "$PY" bench/colour_bench.py --device cuda --batch 256 2>&1 \
        | tee ${OUT:+"$OUT/colour_bench.txt"} || status=1
    ;;
esac
# the whole check fits GPU_CHECK_S seconds (default 540, under the device's 10-minute command limit): gpu_bench gets
# what the parts above left (at least 240 s); a --budget-s among the arguments comes later and wins
# (--smoke keeps its own budget: CPU compilation is slow)
budget=()
case " $* " in
*" --smoke "*) ;;
*)
    left=$(( ${GPU_CHECK_S:-540} - SECONDS ))
    [ "$left" -lt 240 ] && left=240
    echo "== ${SECONDS} s so far; bench/gpu_bench.py budget ${left} s"
    budget=(--budget-s "$left")
    ;;
esac
"$PY" bench/gpu_bench.py ${budget[@]+"${budget[@]}"} "$@" 2>&1 | tee ${OUT:+"$OUT/gpu_check.log"} || status=1
exit "$status"
