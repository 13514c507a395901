#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks, in one call, on a machine with a GPU and PyTorch 2.11
# (whose lib/ provides libtorch). Build the bundle first, here: `make gpu-bundle`; then run this
# on the GPU machine from the repository root with target/gpu-bundle carried over.
# Sections run most important first, so a run cut short by a time limit keeps what matters; name
# some to run only those: tests sliding-window segment e2e memory unetr-pp train-step unetr-pp-train
# forward training dist study abi.
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
LWI="$B/bin/lwi --plugin $B/bin/liblwi.so"
W=/tmp/lwi-gpu && rm -rf $W && mkdir -p $W
SECTIONS=" ${*:-tests sliding-window segment e2e memory unetr-pp train-step unetr-pp-train forward training dist study abi} "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }
export LWI_BENCH_BIN=$B/bin LWI_CLI=$B/bin/lwi LWI_PLUGIN=$B/bin/liblwi.so LWI_BENCH_DIR=$W
export LWI_BENCH_REAL_CT=$B/data/example_ct.nii.gz
failed=0
step() { echo; echo "== $* ($(date +%T))"; }
have_monai=$("$PY" -c 'import monai, numpy; print(1)' 2>/dev/null || echo 0)

# Runs a command (its output to $W/last.log) and prints the peak GPU memory meanwhile (MiB, whole
# device, minus what was in use before).
peak_gpu_memory() {
  local base log pid
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
  log=$W/smi.$$.log
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$log" 2>/dev/null &
  pid=$!
  "$@" >$W/last.log 2>&1
  local rc=$?
  [ $rc = 0 ] || { echo "FAILED ($rc): $*"; tail -n 5 $W/last.log; }
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  echo "peak GPU memory: $(( $(sort -n "$log" | tail -n 1) - base )) MiB above the idle $base MiB (nvidia-smi, 50 ms samples)"
  return $rc
}

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || failed=1
"$PY" -c 'import torch; print("python torch", torch.__version__, "cuda", torch.cuda.is_available())'

step "lwi info (liblwi.so dlopened by the lwi command)"
$LWI info | tee $W/lwi-info.json || failed=1
grep -q '"cuda_available": true' $W/lwi-info.json || { echo "FAIL: liblwi.so does not see CUDA"; failed=1; }

monai_or_skip() {
  [ "$have_monai" = 1 ] || echo "(MONAI or numpy not importable here: $1 skipped)"
  [ "$have_monai" = 1 ]
}

if want tests; then
  step "CUDA tests (fused kernel parity first)"
  "$B/bin/cuda-tests" --ignored --nocapture --test-threads 1 fused || failed=1
  "$B/bin/cuda-tests" --ignored --nocapture --test-threads 1 --skip fused || failed=1
fi

if want sliding-window && monai_or_skip "the sliding-window benchmark"; then
  step "GPU benchmark: sliding-window inference alone (lwi vs MONAI 1.6.1)"
  "$PY" bench/run.py --only sliding-window --device cuda:0 || failed=1
fi

if (want segment || want memory) && monai_or_skip "the seeded MONAI weights (and what needs them)"; then
  step "full-size UNETR models (seeded MONAI weights) imported at 1.5x1.5x2 mm and 1.5 mm isotropic"
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
  for s in 1.5,1.5,2 1.5,1.5,1.5; do
    $LWI import --from $W/full.pt --arch-config $W/arch.json.full --labels $W/labels.json --spacing $s \
      --window=-175,250 --out $W/full-$s.safetensors >/dev/null || failed=1
  done
fi

if want segment && [ -f $W/full-1.5,1.5,2.safetensors ]; then
  step "segment a CT-sized phantom (512x512x200, 0.8x0.8x2.5 mm) on CUDA: stage timings from the manifest"
  $LWI phantom --out $W/ct --cases 1 --size 512,512,200 --spacing 0.8,0.8,2.5 >/dev/null 2>&1
  for setting in "fp32 4" "bf16 4" "bf16 16"; do
    set -- $setting
    for round in 1 2; do
      out=$W/seg-$1-$2.nii.gz
      peak=$(peak_gpu_memory $LWI segment --model $W/full-1.5,1.5,2.safetensors $W/ct/imagesTr/phantom_000.nii.gz \
        --out $out --overwrite --device cuda:0 --sw-batch $2 --precision $1) || failed=1
      echo "lwi segment $1 window batch $2, round $round: $("$PY" -c 'import json,sys; t=json.load(open(sys.argv[1]))["timings_s"]; print(json.dumps({k: round(v, 3) for k, v in {**t.pop("segment_stages"), **t}.items()}))' $out.json); $peak"
    done
  done
fi

if want e2e && monai_or_skip "the end-to-end benchmark"; then
  step "GPU benchmark: end-to-end segmentation, file in -> label file out, full UNETR, window batch 4, fp32"
  "$PY" bench/run.py --only segment --device cuda:0 --batch 4 --precision fp32 --reps 4 || failed=1
fi

if want memory && [ -f $W/full-1.5,1.5,1.5.safetensors ]; then
  step "GPU memory: a 512x512x800 CT (0.8x0.8x1.5 mm) segmented at 1.5 mm isotropic, window batch 4"
  $LWI phantom --out $W/long --cases 1 --size 512,512,800 --spacing 0.8,0.8,1.5 >/dev/null 2>&1 || failed=1
  for precision in fp32 bf16; do
    peak_gpu_memory $LWI segment --model $W/full-1.5,1.5,1.5.safetensors $W/long/imagesTr/phantom_000.nii.gz \
      --out $W/long-$precision.nii.gz --overwrite --device cuda:0 --sw-batch 4 --precision $precision || failed=1
    echo "  $precision: timings $("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["timings_s"])' $W/long-$precision.nii.gz.json)"
  done
fi

if want unetr-pp && [ "$have_monai" = 1 ]; then
  step "UNETR++ (Synapse model, seeded) segmenting CT phantoms on CUDA the nnU-Net way, 8 mirrorings"
  pp=$("$PY" -c 'import sys; from pathlib import Path; sys.path[:0] = ["bench", "tests/python"]; import run
print(run.unetr_pp_segment_model(Path(sys.argv[1]), run.PP_SYNAPSE))' $W) || failed=1
  [ -f $W/ct/imagesTr/phantom_000.nii.gz ] ||
    $LWI phantom --out $W/ct --cases 1 --size 512,512,200 --spacing 0.8,0.8,2.5 >/dev/null 2>&1
  $LWI phantom --out $W/long --cases 1 --size 512,512,800 --spacing 0.8,0.8,1.5 >/dev/null 2>&1
  for case in ct long; do
    for precision in fp32 bf16; do
      out=$W/pp-$case-$precision.nii.gz
      peak=$(peak_gpu_memory $LWI segment --model $pp/model.safetensors $W/$case/imagesTr/phantom_000.nii.gz \
        --out $out --overwrite --device cuda:0 --precision $precision) || failed=1
      echo "lwi segment UNETR++ $case $precision: $("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["timings_s"])' $out.json); $peak"
    done
  done
  if "$PY" -c 'import nnunet, batchgenerators, skimage, scipy, SimpleITK' 2>/dev/null; then
    step "GPU benchmark: UNETR++ end to end, lwi vs nnU-Net v1's predict_3D pipeline (fp32, 8 mirrorings)"
    "$PY" bench/run.py --only segment-unetr-pp --device cuda:0 || failed=1
  else
    echo "(nnunet, scikit-image, scipy or SimpleITK not importable here: the nnU-Net comparison skipped)"
  fi
fi

if want train-step && monai_or_skip "the training-step benchmark"; then
  step "GPU benchmark: training step, full UNETR, batch 4 (lwi vs MONAI + DiceCELoss + AdamW; AMP for bf16/fp16)"
  for precision in fp32 bf16 fp16; do
    "$PY" bench/run.py --only train-step --device cuda --batch 4 --precision $precision || failed=1
  done
fi

if want unetr-pp-train; then
  step "GPU benchmark: UNETR++ training step, Synapse model, batch 2 of 64x128x128 (nnU-Net's loss, SGD; lwi bf16 vs PyTorch AMP)"
  "$PY" bench/run.py --only unetr-pp-train-step --device cuda || failed=1
  for precision in bf16 fp16; do
    peak_gpu_memory "$B/bin/unetr_pp_train_step" cuda 2 $precision 5 16 3 3 3 3 || failed=1
    echo "lwi $precision: $(tail -n 1 $W/last.log)"
  done
fi

if want e2e && monai_or_skip "the end-to-end benchmark"; then
  step "GPU benchmark: end-to-end segmentation in bf16"
  "$PY" bench/run.py --only segment --device cuda:0 --batch 4 --precision bf16 --reps 2 || failed=1
fi

if want forward && monai_or_skip "the forward benchmark"; then
  step "GPU benchmark: UNETR forward, full size 96^3, batch 4 (lwi vs MONAI 1.6.1)"
  for precision in fp32 bf16; do
    echo "lwi   $("$B/bin/unetr_forward" cuda 4 $precision 10)"
    echo "MONAI $("$PY" bench/monai_unetr_forward.py cuda 4 $precision 10)"
  done
  step "GPU benchmark: UNETR++ forward, Synapse model 64x128x128, batch 2 (lwi vs bench/pytorch_unetr_pp.py)"
  for precision in fp32 bf16; do
    echo "lwi     $("$B/bin/unetr_pp_forward" cuda 2 $precision 10)"
    echo "PyTorch $("$PY" bench/pytorch_unetr_pp.py cuda 2 $precision 10)"
  done
fi

if want training; then
  step "training on CUDA (tiny UNETR, bf16 autocast): init-train then fine-tune on phantoms"
  $LWI phantom --out $W/data --cases 4 --size 48,48,32 --spacing 6,6,8 >/dev/null 2>&1
  echo '{"img_size": [32,32,32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}' > $W/arch.json
  echo '{"spacing": [8,8,8], "num_samples": 4, "pretext": {"slabs": 2}, "warmup_epochs": 1, "lr": 1e-3, "val_every": 3}' > $W/c.json
  t0=$(date +%s)
  $LWI init-train --dataset $W/data/dataset.json --arch-config $W/arch.json --config $W/c.json \
    --epochs 3 --device cuda:0 --out $W/init.safetensors 2>&1 | tail -n 2 || failed=1
  $LWI fine-tune --dataset $W/data/dataset.json --arch-config $W/arch.json --config $W/c.json \
    --init $W/init.safetensors --epochs 3 --device cuda:0 --out $W/model.safetensors 2>&1 | tail -n 2 || failed=1
  echo "training wall time: $(( $(date +%s) - t0 )) s"
fi

if want dist; then
  step "data-parallel training on c10d: NCCL at world size 1, 2 Gloo ranks sharing cuda:0, 2 NCCL ranks on one GPU"
  [ -d $W/data ] || $LWI phantom --out $W/data --cases 12 --size 48,48,32 --spacing 6,6,8 >/dev/null 2>&1
  echo '{"img_size": [32,32,32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}' > $W/arch.json
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  dist_config() {  # BATCH [DISTRIBUTED-JSON]
    local d=${2:-}; [ -n "$d" ] || d='{}'
    echo "{\"spacing\": [8,8,8], \"num_samples\": 2, \"optimizer\": \"sgd\", \"momentum\": 0.9, \"lr\": 1e-2,
      \"warmup_epochs\": 0, \"val_every\": 1, \"amp\": false, \"batch_size\": $1, \"distributed\": $d}"
  }
  fine() {  # DIR CONFIG [LAUNCHER...]
    mkdir -p $1 && echo "$2" > $1/c.json
    local bin; bin=$(cd $B/bin && pwd)
    (cd $1 && "${@:3}" $bin/lwi --plugin $bin/liblwi.so fine-tune --from-scratch --dataset $W/data/dataset.json \
      --arch-config $W/arch.json --config c.json --epochs 2 --seed 4 --device cuda:0 --out model.safetensors --json \
      > out.jsonl 2> err.log) || { echo "FAILED: fine-tune in $1"; tail -n 5 $1/err.log; return 1; }
  }
  fine $W/nccl1 "$(dist_config 2 "{\"rank\": 0, \"world_size\": 1, \"master_addr\": \"127.0.0.1\", \"master_port\": $port, \"backend\": \"nccl\"}")" \
    && echo "NCCL, world size 1: 2 epochs trained" || failed=1
  fine $W/one "$(dist_config 2)" || failed=1
  TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=2 --no-python"
  fine $W/gloo2 "$(dist_config 1 '{"backend": "gloo"}')" env CUDA_VISIBLE_DEVICES=0 $TORCHRUN || failed=1
  "$PY" - $W/one/model.safetensors $W/gloo2/model.safetensors <<'PYEOF' || failed=1
import json, struct, sys, torch
def load(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); h.pop("__metadata__", None)
    return {k: torch.frombuffer(bytearray(b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]), dtype=torch.float32)
            for k, v in h.items() if v["dtype"] == "F32"}
a, b = load(sys.argv[1]), load(sys.argv[2])
d = max(float((a[k] - b[k]).abs().max()) for k in a)
print(f"2 Gloo ranks on cuda:0 x batch 1 vs 1 process x batch 2: max |dw| = {d:.2e} (cuDNN is not bit-deterministic)")
sys.exit(0 if d <= 1e-4 else 1)
PYEOF
  echo "2 NCCL ranks on one GPU (NCCL refuses a duplicate GPU; expected to fail, the message recorded):"
  fine $W/nccl2 "$(dist_config 1 '{"backend": "nccl", "wait_s": 60, "timeout_s": 30}')" env CUDA_VISIBLE_DEVICES=0 $TORCHRUN \
    && echo "  (it trained)" || grep -m 2 -E "LWI|rror|uplicate" $W/nccl2/err.log | cut -c1-300
  if monai_or_skip "the data-parallel step against DDP"; then
    "$PY" bench/run.py --only dist-step --device cuda --ranks 1 --backend nccl | tail -n 4 || failed=1
    "$PY" bench/run.py --only dist-step --device cuda --ranks 2 --backend gloo | tail -n 4 || failed=1
  fi
fi

if want study; then
  step "the learned-initialization study at full size (one seed, 2 training cases; bench/lwi_vs_random.py --full)"
  for arch in unetr unetr_pp; do
    "$PY" bench/lwi_vs_random.py --full --arch $arch --seeds 0 --train-cases 2 --device cuda:0 | tail -n 3 || failed=1
  done
fi

if want abi; then
  step "C ABI misuse suite"
  mkdir -p $W/scratch
  "$B/bin/abi_misuse" "$B/bin/liblwi.so" "$B/data/imagesTr/phantom_000.nii.gz" $W/scratch | tail -n 1 || failed=1
fi

echo
if [ $failed = 0 ]; then echo "gpu-check: all passed"; else echo "gpu-check: FAILED"; fi
exit $failed
