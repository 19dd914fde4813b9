#!/usr/bin/env bash
# Every GPU check and benchmark, in one call of the device tool, most important first, within
# a time budget: `scripts/gpu-bench.sh [SECONDS] [SECTION ...]` (default 540 s, every section).
# A step that would outrun the budget gets what is left, and none starts with under 30 s
# left, so the call ends inside the tool's 10-minute limit with everything so far in
# $OUT/gpu-bench.log and one JSON line per step in $OUT/steps.jsonl (its peak GPU memory
# sampled by nvidia-smi, exit status, seconds). Every training step's JSON line has the
# kernels one step launches (`kernels_per_step`), flow's and PyTorch's. Sections, in order:
#   cuda     flow on CUDA (NVRTC) beside PyTorch eager (transformers LlamaForCausalLM, SDPA;
#            PEFT), `small` and `large`, full and LoRA r=16, bf16 autocast then f32
#   7b       Llama-2-7B's shape, seq 4096, micro-batch 1, checkpointed, bf16: flow's full
#            finetuning with LionW and the moment in bf16 (66 GiB counted: must stay under
#            80 GB), LoRA r=256; PyTorch's full finetuning with the same checkpointing,
#            optimizer and moment type (benches/train_torch.py's LionW)
#   attention  one layer of the 7B shape's attention (seq 4096, 32 heads of 128): flow's fused
#            kernels (what the checkpointed 7B rows attend with) and materialized scores,
#            forward and backward, beside PyTorch's SDPA in f32 and bf16
#   profile  where a step's time goes, kernel by kernel: flow on CUDA and PyTorch, `large`
#            full finetuning in bf16 (`--kernels`: each kernel's device time in one step)
#   eval     flow's device decoder beside transformers `generate` and forward scoring
#   parity   the device's optimizer against the CPU engine's after 7 AdamW steps, f32 and
#            bf16 moments
#   wgpu     flow on wgpu in f32 and f16: Vulkan through cubecl's SPIR-V compiler (the benches
#            are built with `spirv`: tensor-core matmuls where the driver has cooperative
#            matrices), beside PyTorch in f16
#   smoke    the paper's math_cpt study at smoke size, stage by stage (needs .devbin/flow)
# What it runs comes from scripts/gpu-prepare.sh: .devbin/{train-bench,generate-bench,flow}.xz,
# .gl (Vulkan's loader) and .shared-data (the smoke study's records, linked as ../shared/data).
# The tree that travels holds 64 MiB at most, so one call carries the benches and .gl
# (`scripts/gpu-bench.sh 540`), another, if time is left, .devbin/flow.xz and .shared-data
# (`scripts/gpu-bench.sh 300 smoke`). A first CUDA step that fails skips the other CUDA
# steps (its error is in the log). Only the log and steps.jsonl are written under $OUT (the
# device tool brings back 8 files at most).
set -u
budget=${1:-540}
shift || true
sections=${*:-cuda 7b attention profile eval parity wgpu smoke}
start=$SECONDS
out=${OUT:-/tmp/gpu-bench}
mkdir -p "$out"
exec > >(tee -a "$out/gpu-bench.log") 2>&1

for f in .devbin/*.xz; do
  [ -f "$f" ] || continue
  xz -dc "$f" >"${f%.xz}" 2>/dev/null ||
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "${f%.xz}"
  chmod +x "${f%.xz}"
done
for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$VK_DRIVER_FILES" ] || unset VK_DRIVER_FILES
# NVRTC and the headers from the toolkit beside nvcc where it is not at /usr/local/cuda.
if [ ! -d /usr/local/cuda ] && command -v nvcc >/dev/null; then
  CUDA_PATH=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  export CUDA_PATH
fi
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
if [ ! -d ../shared/data ] && [ -d .shared-data ]; then
  mkdir -p ../shared && ln -s "$PWD/.shared-data" ../shared/data
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'

# step LIMIT CMD...: CMD under at most LIMIT seconds (less if the budget has less), its last
# lines, and a JSON line with its peak GPU memory, exit status and seconds.
step() {
  local limit=$1 left=$((budget - (SECONDS - start)))
  shift
  if [ "$left" -lt 30 ]; then
    echo "skipped (budget spent): $*"
    return 99
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $* (at most ${limit}s)"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$work/smi.txt" &
  local smi=$! began=$SECONDS
  timeout "$limit" "$@" >"$work/step.txt" 2>&1
  local rc=$?
  kill $smi
  wait $smi 2>/dev/null
  grep -v WARN "$work/step.txt" | tail -4
  local line
  line=$(printf '{"step": "%s", "peak_gpu_used_mib": %s, "rc": %d, "seconds": %d}' \
    "$*" "$(sort -n "$work/smi.txt" | tail -1)" "$rc" $((SECONDS - began)))
  echo "$line" | tee -a "$out/steps.jsonl"
  return $rc
}
has() { [[ " $sections " == *" $1 "* ]]; }
flow_train() { step "$1" .devbin/train-bench --one "${@:2}"; }
torch_train() { step "$1" python3 benches/train_torch.py --device cuda "${@:2}"; }

cuda=0
if [ -x .devbin/train-bench ]; then
  if flow_train 120 small full --device cuda --precision bf16; then cuda=1; fi
fi
if has cuda && [ $cuda = 1 ]; then
  torch_train 90 --config small --modes full --precision bf16
  for prec in bf16 f32; do for cfg in small large; do for mode in full lora16; do
    [ "$prec $cfg $mode" = "bf16 small full" ] && continue
    flow_train 120 $cfg $mode --device cuda --precision $prec
    torch_train 90 --config $cfg --modes $mode --precision $prec
  done; done; done
fi
if has 7b && [ $cuda = 1 ]; then
  flow_train 240 7b full --device cuda --precision bf16 --checkpointing --bf16-state
  torch_train 240 --config 7b --modes full --precision bf16 --checkpointing --optimizer lion --bf16-state
  flow_train 180 7b lora256 --device cuda --precision bf16 --checkpointing
fi
if has attention && [ $cuda = 1 ]; then
  step 120 .devbin/train-bench --attention 1,32,4096,128 --device cuda
  for prec in f32 bf16; do
    torch_train 60 --attention 1,32,4096,128 --precision $prec
  done
fi
if has profile && [ $cuda = 1 ]; then
  flow_train 120 large full --device cuda --precision bf16 --kernels
  torch_train 90 --config large --modes full --precision bf16 --kernels
fi
if has eval && [ -x .devbin/generate-bench ]; then
  shape=4096,4,32,32,11008,32000 # the 7B's layers, 4 of them
  for dev in cuda; do
    [ $cuda = 1 ] || continue
    step 120 .devbin/generate-bench --device $dev --shape $shape --batch 8 --prompt 128 --new 64 --precision bf16
  done
  step 120 python3 benches/eval_torch.py --device cuda --shape $shape --batch 8 --prompt 128 --new 64 --dtype bfloat16
fi
if has parity && [ $cuda = 1 ]; then
  # The last one recomputes blocks through the fused attention kernels (gpu/flash.rs).
  for st in "" --bf16-state --checkpointing; do
    # shellcheck disable=SC2086
    flow_train 120 small full --device cuda --compare $st
  done
fi
if has wgpu && [ -x .devbin/train-bench ]; then
  for prec in f16 f32; do for cfg in small large; do for mode in full lora16; do
    flow_train 120 $cfg $mode --device wgpu --precision $prec
  done; done; done
  torch_train 90 --config large --modes full --precision f16
fi
if has smoke && [ -x .devbin/flow ] && [ -d ../shared/data ] && [ $cuda = 1 ]; then
  # Every stage of math_cpt's paper profile at smoke size, on a 4-layer slice of the 7B
  # shape (the whole 7B writes a 27 GB model per trained model, more than the disk holds
  # for the study); the log and `flow status` give each stage's time.
  step 540 .devbin/flow run pipelines/math_cpt.toml --profile paper --profile paper-smoke \
    --set stage.pretrained.layers=4 --device cuda --cache "$work/smoke-cache"
fi
echo "done in $((SECONDS - start))s of ${budget}s"
