#!/usr/bin/env bash
# The GPU measurement recorded in docs/benchmarks.md, in one call on one CUDA GPU (an H100:
# about 8 minutes). Installs nothing from the network: it uses the Python it is started in
# ($PYTHON, else python3) with torch (CUDA) and pytest; diffusers, which GPU images often
# lack, is installed offline from wheels in ./.whl when that folder holds them (how to fill
# it: docs/benchmarks.md). Prints the machine first, then runs the CUDA-only tests (streams,
# page-locked record, fp16 paths), then `python -m benchmarks.bench --preset gpu`: SDXL and SD1.5 at
# 2×/3×/4×, both engines (diffusers and the A1111 adapter), FAM vs plain Hires fix, the
# per-step split, the AM-layer parts; the table is printed last. Extra arguments go to the
# benchmark (e.g. --json). Keep the whole output: bash benchmarks/gpu.sh 2>&1 | tee gpu.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import diffusers" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fam-site .whl/*.whl
    export PYTHONPATH=/tmp/fam-site${PYTHONPATH:+:$PYTHONPATH}
fi
echo "== machine: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" - <<'PY'
import os, sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: no CUDA device (torch %s)" % torch.__version__)
try:
    import diffusers
    dv = diffusers.__version__
except ImportError:
    sys.exit("benchmarks/gpu.sh: diffusers is missing; put its wheels in ./.whl (docs/benchmarks.md)")
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
      f"diffusers {dv} | Python {sys.version.split()[0]} | {os.cpu_count()} CPUs", flush=True)
PY
rc=0
timeout 150 "$PY" -m pytest -q -k cuda tests/ -p no:cacheprovider || rc=$?
echo "== CUDA-only tests: exit status $rc (0 = all passed)"
"$PY" -m benchmarks.bench --preset gpu "$@"
