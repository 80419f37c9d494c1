#!/usr/bin/env bash
# The GPU measurement recorded in docs/benchmarks.md, in one call on one CUDA GPU (an H100:
# about 7 minutes). Installs nothing: it uses the Python environment it is started in (torch
# with CUDA, diffusers, pytest). First the CUDA-only tests (streams, page-locked record, fp16
# paths), then `python -m fam.bench --preset gpu`: SD1.5 and SDXL at 2×/3×/4×, both engines
# (diffusers and the A1111 adapter), FAM vs plain Hires fix; the table is printed last.
# Extra arguments go to the benchmark (e.g. --json).
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: no CUDA device (torch %s)" % torch.__version__)
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, flush=True)
PY
rc=0
timeout 120 python -m pytest -q -k cuda tests/ -p no:cacheprovider || rc=$?
echo "CUDA-only tests: exit status $rc (0 = all passed)"
python -m fam.bench --preset gpu "$@"
