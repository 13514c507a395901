#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks, in one call, on a machine with a GPU and PyTorch 2.11
# (whose lib/ provides libtorch). Build the bundle first, here: `make gpu-bundle`; then run this
# on the GPU machine from the repository root with target/gpu-bundle carried over.
# Record what it prints in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
B=target/gpu-bundle
[ -x "$B/bin/lwi" ] || { echo "gpu-check: $B is missing: run 'make gpu-bundle' first" >&2; exit 2; }
PY=${PYTHON:-$(command -v python3 || true)}
for cand in "$PY" /opt/torch/.venv/bin/python; do
  if [ -n "$cand" ] && "$cand" -c 'import torch' 2>/dev/null; then PY=$cand; break; fi
done
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
  echo "gpu-check: no Python with torch found (set PYTHON)" >&2; exit 2; }
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$B/py:${PYTHONPATH:-}"
failed=0
step() { echo; echo "== $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || failed=1
"$PY" -c 'import torch; print("python torch", torch.__version__, "cuda", torch.cuda.is_available())'

step "lwi info (liblwi.so dlopened by the lwi command)"
"$B/bin/lwi" --plugin "$B/bin/liblwi.so" info | tee /tmp/lwi-info.json || failed=1
grep -q '"cuda_available": true' /tmp/lwi-info.json || { echo "FAIL: liblwi.so does not see CUDA"; failed=1; }

step "C ABI misuse suite"
mkdir -p /tmp/lwi-scratch
"$B/bin/abi_misuse" "$B/bin/liblwi.so" "$B/data/imagesTr/phantom_000.nii.gz" /tmp/lwi-scratch | tail -n 1 || failed=1

step "CUDA tests"
"$B/bin/cuda-tests" --ignored --nocapture --test-threads 1 || failed=1

step "GPU benchmarks: UNETR forward, full size 96^3, batch 4 (lwi vs MONAI 1.6.1, alternated)"
have_monai=$("$PY" -c 'import monai, numpy; print(1)' 2>/dev/null || echo 0)
for precision in fp32 bf16 fp16; do
  for round in 1 2; do
    echo "lwi   $("$B/bin/unetr_forward" cuda 4 $precision 10)"
    if [ "$have_monai" = 1 ]; then
      echo "MONAI $("$PY" bench/monai_unetr_forward.py cuda 4 $precision 10)"
    fi
  done
done
[ "$have_monai" = 1 ] || echo "(MONAI or numpy not importable here: reference side skipped)"

echo
if [ $failed = 0 ]; then echo "gpu-check: all passed"; else echo "gpu-check: FAILED"; fi
exit $failed
