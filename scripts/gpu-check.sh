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

step "training on CUDA (tiny UNETR, bf16 autocast): init-train then fine-tune on phantoms"
W=/tmp/lwi-gpu && rm -rf $W && mkdir -p $W
"$B/bin/lwi" --plugin "$B/bin/liblwi.so" phantom --out $W/data --cases 4 --size 48,48,32 --spacing 6,6,8 >/dev/null 2>&1
echo '{"img_size": [32,32,32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}' > $W/arch.json
echo '{"spacing": [8,8,8], "num_samples": 4, "pretext": {"slabs": 2}, "warmup_epochs": 1, "lr": 1e-3, "val_every": 3}' > $W/c.json
t0=$(date +%s)
"$B/bin/lwi" --plugin "$B/bin/liblwi.so" init-train --dataset $W/data/dataset.json --arch-config $W/arch.json --config $W/c.json \
  --epochs 3 --device cuda:0 --out $W/init.safetensors 2>&1 | tail -n 2 || failed=1
"$B/bin/lwi" --plugin "$B/bin/liblwi.so" fine-tune --dataset $W/data/dataset.json --arch-config $W/arch.json --config $W/c.json \
  --init $W/init.safetensors --epochs 3 --device cuda:0 --out $W/model.safetensors 2>&1 | tail -n 2 || failed=1
echo "training wall time: $(( $(date +%s) - t0 )) s"

step "segment a CT-sized phantom (512x512x200, 0.8x0.8x2.5 mm) with the full-size UNETR on CUDA"
"$B/bin/lwi" --plugin "$B/bin/liblwi.so" phantom --out $W/ct --cases 1 --size 512,512,200 --spacing 0.8,0.8,2.5 >/dev/null 2>&1
"$PY" - "$W" <<'PY' || failed=1
import json, sys, torch
from monai.networks.nets import UNETR
w = sys.argv[1]
torch.manual_seed(0)
cfg = dict(in_channels=1, out_channels=14, img_size=[96, 96, 96], proj_type="perceptron")
torch.save(UNETR(**cfg).state_dict(), f"{w}/full.pt")
json.dump(cfg, open(f"{w}/arch.json.full", "w"))
json.dump({str(i): f"class {i}" for i in range(14)}, open(f"{w}/labels.json", "w"))
PY
"$B/bin/lwi" --plugin "$B/bin/liblwi.so" import --from $W/full.pt --arch-config $W/arch.json.full --labels $W/labels.json --out $W/full.safetensors || failed=1
for precision in fp32 bf16; do
  for round in 1 2; do
    "$B/bin/lwi" --plugin "$B/bin/liblwi.so" segment --model $W/full.safetensors $W/ct/imagesTr/phantom_000.nii.gz \
      --out $W/seg-$precision.nii.gz --overwrite --device cuda:0 --sw-batch 4 --precision $precision >/dev/null 2>&1 || failed=1
    echo "lwi segment $precision round $round: $(grep -o '"segment": [0-9.]*' $W/seg-$precision.nii.gz.json) s (read+write excluded)"
  done
done
if [ "$have_monai" = 1 ]; then
  "$PY" - <<'PY'
import time, torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNETR
net = UNETR(in_channels=1, out_channels=14, img_size=96, proj_type="perceptron").cuda().eval()
x = torch.rand(1, 1, 273, 273, 250, device="cuda")  # the phantom's preprocessed grid at 1.5x1.5x2 mm
for dtype in (None, torch.bfloat16):
    for _ in range(2):
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            y = sliding_window_inference(x, (96, 96, 96), 4, net, overlap=0.5, mode="gaussian")
        torch.cuda.synchronize()
        print(f"MONAI sliding_window_inference {dtype or 'fp32'} on 273x273x250: {time.perf_counter() - t:.3f} s")
PY
fi

step "GPU benchmarks: training step, full UNETR, batch 4 (lwi vs MONAI + DiceCELoss + AdamW; AMP for bf16/fp16)"
if [ "$have_monai" = 1 ]; then
  for precision in fp32 bf16 fp16; do
    LWI_BENCH_BIN=$B/bin "$PY" bench/run.py --only train-step --device cuda --batch 4 --precision $precision || failed=1
  done
  step "GPU benchmarks: end-to-end segmentation, file in -> label file out, full UNETR, window batch 4"
  for precision in fp32 bf16; do
    LWI_BENCH_BIN=$B/bin LWI_CLI=$B/bin/lwi LWI_PLUGIN=$B/bin/liblwi.so LWI_BENCH_DIR=$W/bench \
      LWI_BENCH_REAL_CT=$B/data/example_ct.nii.gz "$PY" bench/run.py --only segment --device cuda:0 --batch 4 \
      --precision $precision --reps 4 || failed=1
  done
fi

echo
if [ $failed = 0 ]; then echo "gpu-check: all passed"; else echo "gpu-check: FAILED"; fi
exit $failed
