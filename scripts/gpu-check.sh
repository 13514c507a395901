#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks, section by section, on a machine with a GPU and PyTorch 2.11 (whose lib/
# provides libtorch). Build the bundle here first (`make gpu-bundle`), carry target/gpu-bundle over, and run from the
# repository root:
#   scripts/gpu-check.sh [--budget SECONDS] [SECTION...]  the sections named, in the order named (none named: all,
#                                                         those never run on a GPU first)
#   scripts/gpu-check.sh --plan [SECTION...]              the sections in order with estimated minutes and limits
#   scripts/gpu-check.sh --dry-run [SECTION...]           the same commands on the CPU at toy sizes, with a Python
#                                                         that holds only what the GPU machine's does (make test)
# Each section runs under its own time limit, cut to what is left of --budget (a section that no longer fits is
# skipped). Its full log goes to ${OUT:-target}/gpu-check/SECTION.log (gpu-check-dry/ for a dry run), one line per
# section (status, seconds, figures) to summary.txt after the machine's description, and the work folder's small
# result files (manifests, JSON lines, logs) to results.tgz; the terminal gets the summary lines and the end of each
# failed section's log. LWI_GPU_KEEP=1 keeps the work folder (models, phantoms) for a rerun on the same machine;
# LWI_GPU_NNUNET=1 adds nnU-Net v1's own pipeline to unetr-pp where scipy, scikit-image, pandas and SimpleITK import.
# Record the results in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
SELF=scripts/gpu-check.sh

# name: estimated minutes on one H100 | time limit in seconds | what it runs
declare -A EST LIMIT WHAT
section() { EST[$1]=$2 LIMIT[$1]=$3 WHAT[$1]=$4; }
section unetr-pp 2.5 270 "Synapse UNETR++ segmenting CT phantoms the nnU-Net way: 200 slices with 8 mirrorings, 800 without"
section unetr-pp-train 1.5 180 "UNETR++ training step, Synapse model: lwi bf16/fp16 vs PyTorch AMP, peak memory"
section dist 2.5 240 "c10d: NCCL group of 1, 2 Gloo ranks vs 1 process (TF32 off), 2 NCCL ranks on 1 GPU, dist-step"
section study 2.5 240 "the learned-initialization study's smoke run: UNETR++ full size, 2 + 2 epochs, time per epoch"
section forward 1.0 120 "UNETR++ (Synapse, batch 2) then UNETR (batch 4) forward: lwi vs PyTorch / MONAI"
section tests 1.5 180 "the CUDA tests (plugin/tests/cuda.rs): UNETR++ first, then the fused kernel, then the rest"
section sliding-window 1.5 180 "sliding-window inference alone, full UNETR: lwi vs MONAI"
section segment 1.0 150 "lwi segment of a 512x512x200 CT phantom, full UNETR: stage timings, peak memory"
section e2e 2.8 300 "end-to-end segmentation, file in, labels out: lwi vs MONAI (fp32, then bf16)"
section memory 0.5 120 "peak memory, full UNETR on a 512x512x800 CT"
section train-step 1.5 180 "UNETR training step: lwi vs MONAI in fp32, bf16, fp16"
section training 0.3 90 "init-train then fine-tune of a tiny UNETR on CUDA"
section abi 0.2 60 "the C ABI misuse suite through the bundle's library"
# never run on a GPU first, then the rest most informative first
ORDER="unetr-pp unetr-pp-train dist study forward tests sliding-window segment e2e memory train-step training abi"

usage() {
  sed -n '2,9p' "$SELF" >&2
  echo "sections: $ORDER" >&2
  exit "${1:-2}"
}

FIGURE_PREFIX="FIGURE: "
figure() { echo "$FIGURE_PREFIX$*"; }

# Copies stdin to stdout; each line matching the pattern also becomes a figure (spaces squeezed).
tee_figures() {
  local line
  while IFS= read -r line; do
    echo "$line"
    if [[ $line =~ $1 ]]; then figure "$(sed -E 's/^ +//; s/ +/ /g' <<<"$line")"; fi
  done
}

# Runs a benchmark program (LABEL CMD...): it must print a JSON line with median_ms last; prints it and a figure.
json_run() {
  local label=$1 out
  shift
  out=$("$@" 2>$W/stderr.log | tail -n 1)
  if [[ $out != *'"median_ms"'* ]]; then
    echo "FAILED: $label: $* printed no timing line"
    tail -n 20 $W/stderr.log
    return 1
  fi
  echo "$label $out"
  figure "$label $(sed -E 's/.*"median_ms": ?([0-9.]+).*/\1/' <<<"$out" | xargs printf '%.1f') ms"
}

# Runs a command (its output to $W/last.log) and prints the peak GPU memory meanwhile (MiB, whole device, minus what
# was in use before); on the CPU, only runs it.
peak_gpu_memory() {
  local base log pid rc
  if [ "$DRY" = 1 ]; then
    "$@" >$W/last.log 2>&1
    rc=$?
    [ $rc = 0 ] || { echo "FAILED ($rc): $*"; tail -n 5 $W/last.log; }
    echo "peak GPU memory: none (CPU)"
    return $rc
  fi
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
  log=$W/smi.$$.log
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$log" 2>/dev/null &
  pid=$!
  "$@" >$W/last.log 2>&1
  rc=$?
  [ $rc = 0 ] || { echo "FAILED ($rc): $*"; tail -n 5 $W/last.log; }
  kill $pid 2>/dev/null
  wait $pid 2>/dev/null
  echo "peak GPU memory: $(($(sort -n "$log" | tail -n 1) - base)) MiB above the idle $base MiB (nvidia-smi, 50 ms samples)"
  return $rc
}

# The stage timings of a segmentation's manifest: "read 0.47 preprocess 0.09 ... s".
timings() {
  "$PY" -c 'import json, sys; t = json.load(open(sys.argv[1]))["timings_s"]
print(" ".join(f"{k} {v:.2f}" for k, v in {**t.pop("segment_stages", {}), **t}.items() if v >= 0.005), "s")' "$1"
}

# A phantom case (DIR SIZE SPACING CASES), made once.
phantom() {
  [ -f $W/$1/dataset.json ] || $LWI phantom --out $W/$1 --cases ${4:-1} --size $2 --spacing $3 >/dev/null 2>&1
}

# bench/run.py's helpers, from the shell.
bench_py() {
  "$PY" -c "import sys; from pathlib import Path; sys.path[:0] = ['bench', 'tests/python']; import run; $1" "${@:2}"
}

# A seeded full-size UNETR (toy in a dry run) imported at SPACING with a CT window: prints the model file.
unetr_model() {
  bench_py 'print(run.segment_model(Path(sys.argv[1]), run.TOY if sys.argv[3] == "1" else run.FULL, sys.argv[2])
          / "model.safetensors")' "$W" "$1" "$DRY"
}

# The seeded Synapse UNETR++ (toy in a dry run) imported with a CT normalisation: prints the model's folder.
unetr_pp_model() {
  bench_py 'print(run.unetr_pp_segment_model(Path(sys.argv[1]), run.PP_TOY if sys.argv[2] == "1" else run.PP_SYNAPSE))' \
    "$W" "$DRY"
}

section_tests() {
  local failed=0
  if [ "$DRY" = 1 ]; then
    "$B/bin/cuda-tests" --ignored --list | tee $W/cuda-tests.txt || failed=1
    local n
    n=$(grep -c ': test$' $W/cuda-tests.txt)
    [ "$(grep -c '^unetr_pp.*: test$' $W/cuda-tests.txt)" -ge 3 ] || { echo "FAIL: the UNETR++ CUDA tests are missing"; failed=1; }
    figure "$n CUDA tests listed (they need a GPU)"
    return $failed
  fi
  for filter in "unetr_pp" "fused" "--skip unetr_pp --skip fused"; do
    "$B/bin/cuda-tests" --ignored --nocapture --test-threads 1 $filter 2>&1 | tee_figures '^test result' || failed=1
  done
  return $failed
}

section_sliding_window() {
  "$PY" bench/run.py --only sliding-window --device $DEV $TOY | tee_figures 'ratio'
}

section_segment() {
  local failed=0 model settings rounds out peak
  model=$(unetr_model 1.5,1.5,2) || return 1
  phantom ct $CT_SIZE 0.8,0.8,2.5
  if [ "$DRY" = 1 ]; then settings=("fp32 4") rounds=1; else settings=("fp32 4" "bf16 4" "bf16 16") rounds="1 2"; fi
  for setting in "${settings[@]}"; do
    set -- $setting
    for round in $rounds; do
      out=$W/seg-$1-$2.nii.gz
      peak=$(peak_gpu_memory $LWI segment --model $model $W/ct/imagesTr/phantom_000.nii.gz --out $out --overwrite \
        --device $DEV --sw-batch $2 --precision $1) || failed=1
      echo "lwi segment $1 window batch $2, round $round: $(timings $out.json); $peak"
    done
    figure "CT $1 window batch $2: $(timings $out.json); ${peak#peak GPU memory: }"
  done
  return $failed
}

section_e2e() {
  local failed=0
  "$PY" bench/run.py --only segment --device $DEV --batch 4 --precision fp32 --reps 4 $TOY | tee_figures 'ratio' ||
    failed=1
  if [ "$DRY" = 0 ]; then
    "$PY" bench/run.py --only segment --device $DEV --batch 4 --precision bf16 --reps 2 | tee_figures 'ratio' ||
      failed=1
  fi
  return $failed
}

section_memory() {
  local failed=0 model peak
  model=$(unetr_model 1.5,1.5,1.5) || return 1
  phantom long $LONG_SIZE 0.8,0.8,1.5
  for precision in $PRECISIONS; do
    peak=$(peak_gpu_memory $LWI segment --model $model $W/long/imagesTr/phantom_000.nii.gz \
      --out $W/long-$precision.nii.gz --overwrite --device $DEV --sw-batch 4 --precision $precision) || failed=1
    echo "$precision: $(timings $W/long-$precision.nii.gz.json); $peak"
    figure "UNETR long CT $precision: $(timings $W/long-$precision.nii.gz.json); ${peak#peak GPU memory: }"
  done
  return $failed
}

# One UNETR++ segmentation (CASE PRECISION [--no-mirror]): timings, peak memory, a figure.
pp_segment() {
  local out=$W/pp-$1-$2${3:-}.nii.gz peak rc
  peak=$(peak_gpu_memory $LWI segment --model $pp/model.safetensors $W/$1/imagesTr/phantom_000.nii.gz --out $out \
    --overwrite --device $DEV --precision $2 ${3:-})
  rc=$?
  echo "lwi segment UNETR++ $1 $2 ${3:-(8 mirrorings)}: $(timings $out.json); $peak"
  figure "UNETR++ $1 $2 ${3:-mirrored}: $(timings $out.json); ${peak#peak GPU memory: }"
  return $rc
}

section_unetr_pp() {
  local failed=0
  pp=$(unetr_pp_model) || return 1
  phantom ct $CT_SIZE 0.8,0.8,2.5
  phantom long $LONG_SIZE 0.8,0.8,1.5
  # mirroring timed on the 200 slices; the 800 once without it (the same memory, 8x fewer forward passes)
  for precision in $PRECISIONS; do
    pp_segment ct $precision || failed=1
  done
  pp_segment long fp32 --no-mirror || failed=1
  if [ "${LWI_GPU_NNUNET:-0}" = 1 ] && "$PY" -c 'import nnunet, batchgenerators, skimage, scipy, pandas, SimpleITK' 2>/dev/null; then
    "$PY" bench/run.py --only segment-unetr-pp --device $DEV | tee_figures 'ratio' || failed=1
  else
    echo "(nnU-Net's own pipeline left out: LWI_GPU_NNUNET=1 where scipy, scikit-image, pandas and SimpleITK import)"
  fi
  return $failed
}

section_train_step() {
  local failed=0
  for precision in $PRECISIONS fp16; do
    [ "$DRY" = 1 ] && [ $precision != fp32 ] && continue
    "$PY" bench/run.py --only train-step --device $DEV --batch 4 --precision $precision $TOY | tee_figures 'ratio' ||
      failed=1
  done
  return $failed
}

section_unetr_pp_train() {
  local failed=0 peak
  "$PY" bench/run.py --only unetr-pp-train-step --device $DEV $TOY | tee_figures 'ratio' || failed=1
  for precision in $PP_TRAIN_PRECISIONS; do
    peak=$(peak_gpu_memory "$B/bin/unetr_pp_train_step" $DEV 2 $precision $REPS $PP_ARGS) || failed=1
    echo "lwi $precision: $(tail -n 1 $W/last.log); $peak"
    figure "lwi UNETR++ train step $precision: ${peak#peak GPU memory: }"
  done
  return $failed
}

section_forward() {
  local failed=0
  # UNETR++ first: the cheapest UNETR++ run on CUDA; its time per forward sizes unetr-pp
  for precision in $PRECISIONS; do
    json_run "UNETR++ lwi $precision" "$B/bin/unetr_pp_forward" $DEV 2 $precision $REPS $PP_ARGS || failed=1
    json_run "UNETR++ PyTorch $precision" "$PY" bench/pytorch_unetr_pp.py $DEV 2 $precision $REPS $PP_ARGS || failed=1
  done
  for precision in $PRECISIONS; do
    json_run "UNETR lwi $precision" "$B/bin/unetr_forward" $DEV 4 $precision $REPS $UNETR_ARGS || failed=1
    json_run "UNETR MONAI $precision" "$PY" bench/monai_unetr_forward.py $DEV 4 $precision $REPS $UNETR_ARGS || failed=1
  done
  return $failed
}

TINY_ARCH='{"img_size": [32,32,32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}'

section_training() {
  local failed=0 t0 epochs=$TRAIN_EPOCHS
  phantom data 48,48,32 6,6,8 4
  echo "$TINY_ARCH" >$W/arch.json
  echo '{"spacing": [8,8,8], "num_samples": 4, "pretext": {"slabs": 2}, "warmup_epochs": 1, "lr": 1e-3, "val_every": 3}' >$W/c.json
  t0=$(date +%s)
  $LWI init-train --dataset $W/data/dataset.json --arch-config $W/arch.json --config $W/c.json \
    --epochs $epochs --device $DEV --out $W/init.safetensors 2>&1 | tail -n 2 || failed=1
  $LWI fine-tune --dataset $W/data/dataset.json --arch-config $W/arch.json --config $W/c.json \
    --init $W/init.safetensors --epochs $epochs --device $DEV --out $W/model.safetensors 2>&1 | tail -n 2 || failed=1
  figure "tiny UNETR init-train + fine-tune, $epochs + $epochs epochs: $(($(date +%s) - t0)) s"
  return $failed
}

# The dist section's fine-tune (DIR CONFIG [LAUNCHER...]) on its own phantoms, under an outer time limit.
fine() {
  rm -rf $1 && mkdir -p $1 && echo "$2" >$1/c.json
  local bin
  bin=$(cd $B/bin && pwd)
  (cd $1 && timeout -k 10 150 "${@:3}" $bin/lwi --plugin $bin/liblwi.so fine-tune --from-scratch \
    --dataset $W/dist-data/dataset.json --arch-config $W/arch.json --config c.json --epochs 2 --seed 4 --device $DEV \
    --out model.safetensors --json >out.jsonl 2>err.log) || { echo "FAILED: fine-tune in $1"; tail -n 5 $1/err.log; return 1; }
}

dist_config() { # BATCH [DISTRIBUTED-JSON]
  local d=${2:-}
  [ -n "$d" ] || d='{}'
  echo "{\"spacing\": [8,8,8], \"num_samples\": 2, \"optimizer\": \"sgd\", \"momentum\": 0.9, \"lr\": 1e-2,
    \"warmup_epochs\": 0, \"val_every\": 1, \"amp\": false, \"batch_size\": $1, \"distributed\": $d}"
}

# The largest weight difference of two model files (float32 tensors): prints it, fails above 1e-4.
same_weights() {
  "$PY" - "$1" "$2" <<'PYEOF'
import json, struct, sys, torch
def load(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); h.pop("__metadata__", None)
    return {k: torch.frombuffer(bytearray(b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]), dtype=torch.float32)
            for k, v in h.items() if v["dtype"] == "F32"}
a, b = load(sys.argv[1]), load(sys.argv[2])
d = max(float((a[k] - b[k]).abs().max()) for k in a)
print(f"2 Gloo ranks x batch 1 vs 1 process x batch 2, TF32 off: max |dw| = {d:.2e} (limit 1e-4)")
sys.exit(0 if d <= 1e-4 else 1)
PYEOF
}

section_dist() {
  local failed=0 port torchrun
  phantom dist-data 48,48,32 6,6,8 $DIST_CASES
  echo "$TINY_ARCH" >$W/arch.json
  export GLOO_SOCKET_IFNAME=lo
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  # a group of one built from the config (torchrun's world of one would be a single process)
  if fine $W/group1 "$(dist_config 2 "{\"rank\": 0, \"world_size\": 1, \"master_addr\": \"127.0.0.1\",
    \"master_port\": $port, \"backend\": \"$GROUP_BACKEND\", \"wait_s\": 120, \"timeout_s\": 60}")" \
    env NCCL_DEBUG=INFO NCCL_DEBUG_FILE=$W/group1/nccl.%p.log; then
    if [ "$GROUP_BACKEND" = nccl ]; then
      if grep -h -m 1 -i 'init complete' $W/group1/nccl.*.log; then
        figure "NCCL group of 1 built (NCCL: Init COMPLETE), 2 epochs trained"
      else
        echo "FAIL: NCCL reported no communicator (NCCL_DEBUG=INFO)"
        failed=1
      fi
    else
      figure "$GROUP_BACKEND group of 1, 2 epochs trained"
    fi
  else
    failed=1
  fi
  # 1 process x batch 2 against 2 Gloo ranks x batch 1 on the same device, TF32 off on both sides
  fine $W/one "$(dist_config 2)" env NVIDIA_TF32_OVERRIDE=0 || failed=1
  torchrun="$PY -m torch.distributed.run --standalone --nproc_per_node=2 --no-python"
  fine $W/gloo2 "$(dist_config 1 '{"backend": "gloo", "wait_s": 120, "timeout_s": 60}')" \
    env NVIDIA_TF32_OVERRIDE=0 CUDA_VISIBLE_DEVICES=0 $torchrun || failed=1
  same_weights $W/one/model.safetensors $W/gloo2/model.safetensors | tee_figures 'max' || failed=1
  if [ "$DRY" = 0 ]; then
    echo "2 NCCL ranks on one GPU (NCCL refuses a duplicate GPU; expected to fail, the message recorded):"
    fine $W/nccl2 "$(dist_config 1 '{"backend": "nccl", "wait_s": 60, "timeout_s": 30}')" \
      env CUDA_VISIBLE_DEVICES=0 $torchrun && echo "  (it trained)" ||
      grep -m 2 -E "LWI|rror|uplicate" $W/nccl2/err.log | cut -c1-300
  fi
  "$PY" bench/run.py --only dist-step --device $DEV --ranks 1 --backend $GROUP_BACKEND --rounds 1 $TOY |
    tee_figures 'group of|averaged' || failed=1
  "$PY" bench/run.py --only dist-step --device $DEV --ranks 2 --backend gloo --rounds 1 $TOY |
    tee_figures 'group of|averaged' || failed=1
  return $failed
}

section_study() {
  # a smoke run; the full study (bench/lwi_vs_random.py --full, hours) is a device call of its own
  "$PY" bench/lwi_vs_random.py $STUDY_ARGS --arch unetr_pp --seeds 0 --train-cases 2 --device $DEV |
    tee_figures 'seconds per epoch'
}

section_abi() {
  mkdir -p $W/scratch
  "$B/bin/abi_misuse" "$B/bin/liblwi.so" "$B/data/imagesTr/phantom_000.nii.gz" $W/scratch | tail -n 1 |
    tee_figures 'passed'
}

# What the machine is, for the summary's head.
describe_machine() {
  [ "$DRY" = 1 ] && echo "dry run on the CPU (toy sizes), $(nproc --all) cores" ||
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch, numpy; print("python", __import__("sys").version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available(), "numpy", numpy.__version__)'
  echo "lwi $(cat $B/commit.txt 2>/dev/null): $($LWI info | tr -d '\n' | tr -s ' ' | cut -c1-300)"
}

# Sets up the environment the sections share (exported: each section runs as its own process).
setup() {
  export DRY B=$PWD/target/gpu-bundle PYTHONUNBUFFERED=1
  [ -x "$B/bin/lwi" ] || { echo "gpu-check: $B is missing: run 'make gpu-bundle' first" >&2; exit 2; }
  if [ "$DRY" = 1 ]; then
    # only torch, numpy and packaging besides the bundle's py/, as on the GPU machine
    PY=$(.venv/bin/python scripts/device-python target/device-python) || exit 2
    W=${LWI_GPU_WORK:-target/gpu-check-dry-work} R=${OUT:-target}/gpu-check-dry
    DEV=cpu GROUP_BACKEND=gloo PRECISIONS=fp32 PP_TRAIN_PRECISIONS=fp32 REPS=1 TOY=--toy TRAIN_EPOCHS=1
    UNETR_ARGS="32 8 48 96 4" PP_ARGS="4 1 1 2 2" CT_SIZE=48,48,24 LONG_SIZE=48,48,48 DIST_CASES=4
    STUDY_ARGS="--init-epochs 1 --ft-epochs 1 --iterations 2"
    # as bench/run.py --toy: UNETR++ patches, the sliding-window volume, the flat all-reduce
    export LWI_BENCH_PATCH=16,32,32 LWI_BENCH_VOLUME=48,48,40 LWI_BENCH_FLAT=100000
    # one thread a process: tiny operators on busy cores otherwise spin in OpenMP for seconds each
    export OMP_NUM_THREADS=1
  else
    PY=${PYTHON:-}
    for cand in "$PY" python3 /opt/torch/.venv/bin/python; do
      if [ -n "$cand" ] && "$cand" -c 'import torch' 2>/dev/null; then PY=$cand && break; fi
    done
    W=${LWI_GPU_WORK:-/tmp/lwi-gpu} R=${OUT:-target}/gpu-check
    DEV=cuda:0 GROUP_BACKEND=nccl PRECISIONS="fp32 bf16" PP_TRAIN_PRECISIONS="bf16 fp16" REPS=10 TOY= TRAIN_EPOCHS=3
    UNETR_ARGS="96 16 768 3072 12" PP_ARGS="16 3 3 3 3" CT_SIZE=512,512,200 LONG_SIZE=512,512,800 DIST_CASES=12
    STUDY_ARGS="--full --init-epochs 2 --ft-epochs 2"
  fi
  TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
    echo "gpu-check: no Python with torch found (set PYTHON)" >&2
    exit 2
  }
  export PY W R DEV GROUP_BACKEND PRECISIONS PP_TRAIN_PRECISIONS REPS TOY TRAIN_EPOCHS UNETR_ARGS PP_ARGS CT_SIZE \
    LONG_SIZE DIST_CASES STUDY_ARGS
  export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}" PYTHONPATH="$B/py:${PYTHONPATH:-}"
  export LWI="$B/bin/lwi --plugin $B/bin/liblwi.so"
  export LWI_BENCH_BIN=$B/bin LWI_CLI=$B/bin/lwi LWI_PLUGIN=$B/bin/liblwi.so LWI_BENCH_DIR=$W
  export LWI_BENCH_REAL_CT=$B/data/example_ct.nii.gz
  [ "${LWI_GPU_KEEP:-0}" = 1 ] || rm -rf "$W"
  rm -rf "$R" # this run's logs only
  mkdir -p "$W" "$R"
  W=$(cd "$W" && pwd) R=$(cd "$R" && pwd) # absolute: some commands run in folders of their own
}

# Runs one section under LIMIT seconds: its log, its summary line; prints the line and, on failure, the log's end.
run_section() {
  local name=$1 limit=$2 t0 rc status figures line
  t0=$(date +%s)
  timeout -k 10 "$limit" "$SELF" --section "$name" >"$R/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT($limit s)" ;;
    *) status="FAILED($rc)" ;;
  esac
  figures=$(grep "^$FIGURE_PREFIX" "$R/$name.log" | cut -c$((${#FIGURE_PREFIX} + 1))- |
    awk 'NR > 1 { printf "; " } { printf "%s", $0 }')
  line=$(printf '%-15s %-14s %5d s  %s' "$name" "$status" $(($(date +%s) - t0)) "$figures")
  echo "$line" | tee -a "$R/summary.txt"
  if [ $rc != 0 ]; then
    FAILED_SECTIONS+=" $name"
    tail -n 30 "$R/$name.log" | sed 's/^/    | /'
  fi
  # the small result files, refreshed after every section so that a run cut short keeps them
  (cd "$W" && find . -maxdepth 3 -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' -o -name '*.txt' \) \
    -size -2M -print0 | tar czf "$R/results.tgz" --null -T -) 2>/dev/null
}

main() {
  local mode=run budget= names=()
  if [ "${1:-}" = --section ]; then # one section, in the environment setup() exported
    "section_${2//-/_}"
    exit $?
  fi
  DRY=0
  while [ $# -gt 0 ]; do
    case $1 in
      --plan) mode=plan ;;
      --dry-run) DRY=1 ;;
      --budget) budget=${2:?--budget needs seconds} && shift ;;
      -h | --help) usage 0 ;;
      -*) echo "gpu-check: unknown option $1" >&2 && usage ;;
      *) [ -n "${EST[$1]:-}" ] || { echo "gpu-check: unknown section $1" >&2 && usage; }; names+=("$1") ;;
    esac
    shift
  done
  [ ${#names[@]} -gt 0 ] || read -r -a names <<<"$ORDER"
  if [ $mode = plan ]; then
    local total=0
    for s in "${names[@]}"; do
      printf '%-15s %4s min  limit %3s s  %s\n' "$s" "${EST[$s]}" "${LIMIT[$s]}" "${WHAT[$s]}"
      total=$(awk "BEGIN { print $total + ${EST[$s]} }")
    done
    echo "estimated total on one H100: $total min (±50 %), plus the machine's start"
    exit 0
  fi
  ulimit -c 0 # no core files from a process that aborts
  setup
  FAILED_SECTIONS= SKIPPED_SECTIONS=
  describe_machine 2>&1 | tee "$R/summary.txt"
  local start left limit
  start=$(date +%s)
  for s in "${names[@]}"; do
    limit=${LIMIT[$s]}
    if [ -n "$budget" ]; then
      left=$((budget - ($(date +%s) - start)))
      if [ $left -lt 20 ]; then
        printf '%-15s %-14s\n' "$s" "SKIPPED(budget)" | tee -a "$R/summary.txt"
        SKIPPED_SECTIONS+=" $s"
        continue
      fi
      [ $left -ge $limit ] || limit=$left
    fi
    run_section "$s" "$limit"
  done
  echo "logs and results: $R/"
  if [ -z "$FAILED_SECTIONS" ]; then
    echo "gpu-check: all passed${SKIPPED_SECTIONS:+ (not run, no time left:$SKIPPED_SECTIONS)}"
  else
    echo "gpu-check: FAILED:$FAILED_SECTIONS"
    exit 1
  fi
}

main "$@"
