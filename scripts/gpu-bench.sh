#!/usr/bin/env bash
# The training benchmark on a GPU machine (run by hand, or by the device tool): flow's burn
# trainer on wgpu/Vulkan next to PyTorch on CUDA, same configurations, peak GPU memory sampled
# with nvidia-smi for both. Expects the bench binary at .devbin/train-bench (built elsewhere:
# `cargo bench -p flow-stages --bench train --no-run --features cuda`, so it has wgpu and
# CUDA) and Vulkan loaders in .gl/*.deb. CUDA takes NVRTC and its headers from PyTorch's
# python environment (gpu/cuda.rs), the headers it lacks from .cuda-headers.tgz (below).
set -u
out=${OUT:-/tmp/gpu-bench}; mkdir -p "$out"
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$VK_DRIVER_FILES" ] || unset VK_DRIVER_FILES
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
peak() { # peak memory.used (MiB) while "$@" runs
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$out/smi.txt" &
  local s=$!; "$@"; local rc=$?; kill $s; wait $s 2>/dev/null
  echo "{\"peak_gpu_used_mib\": $(sort -n "$out/smi.txt" | tail -1), \"rc\": $rc}"
}
chmod +x .devbin/train-bench
# CUDA through NVRTC (issue 19 item 6). PyTorch's environment has NVRTC and the runtime's
# headers; nvcc's crt/ and CCCL's cuda/ headers come from .cuda-headers.tgz, made where pip
# works: `cd "$(python3 -c 'import nvidia; print(nvidia.__path__[0])')" && tar czf
# .../.cuda-headers.tgz cuda_nvcc/include cuda_cccl/include` (1.6 MB).
nv=$(python3 -c 'import nvidia; print(nvidia.__path__[0])' 2>/dev/null)
[ -n "$nv" ] && [ -f .cuda-headers.tgz ] && tar xzf .cuda-headers.tgz -C "$nv"
for prec in f32 bf16; do for cfg in small large; do for mode in full lora16; do
  peak timeout 150 .devbin/train-bench --one $cfg $mode --device cuda --precision $prec 2>&1 | grep -v WARN | tail -2
done; done; done
# The device's optimizer against the CPU engine's (the reference) after 7 AdamW steps on
# `small`: f32 moments, then bf16 ones (rounded to nearest-even on both sides).
for st in "" --bf16-state; do
  timeout 150 .devbin/train-bench --one small full --device cuda --compare $st 2>&1 | grep -v WARN | tail -1
done
# Llama-2-7B's shape with LionW, as `--profile paper` trains it: full finetuning with the
# moment in bf16 (at least 65 GiB counted; it must stay under 80 GB), and with it in f32
# (78 GiB counted: over an H100's memory, under this H200's); LoRA r=256.
peak timeout 400 .devbin/train-bench --one 7b full --device cuda --precision bf16 --checkpointing --bf16-state 2>&1 | grep -v WARN | tail -2
for mode in full lora256; do
  peak timeout 400 .devbin/train-bench --one 7b $mode --device cuda --precision bf16 --checkpointing 2>&1 | grep -v WARN | tail -2
done
# f32, and f16 autocast (flow's `precision`; WGSL has no bf16, PyTorch is run in both).
for prec in f32 f16; do for cfg in small large; do for mode in full lora16; do
  peak timeout 150 .devbin/train-bench --one $cfg $mode --device wgpu --precision $prec 2>&1 | grep -v WARN | tail -2
done; done; done
# Activation checkpointing: peak memory against time, large config in f16.
for mode in full lora16; do
  peak timeout 150 .devbin/train-bench --one large $mode --device wgpu --precision f16 --checkpointing 2>&1 | grep -v WARN | tail -2
done
# Llama-2-7B's shape, seq 4096, micro-batch 1 (issue 19 item 7: full finetuning within
# 80 GB with f16 and checkpointing; LoRA r=256 on all seven projections in much less).
for mode in full lora256; do
  peak timeout 400 .devbin/train-bench --one 7b $mode --device wgpu --precision f16 --checkpointing 2>&1 | grep -v WARN | tail -2
  peak timeout 400 python3 benches/train_torch.py --device cuda --config 7b --modes $mode --precision bf16 --checkpointing 2>&1 | grep '"impl"'
done
peak timeout 120 .devbin/train-bench --lora-linear 4096 4096 --device wgpu 2>&1 | tail -2
for prec in f32 f16 bf16; do for cfg in small large; do for mode in full lora16; do
  peak timeout 150 python3 benches/train_torch.py --device cuda --config $cfg --modes $mode --precision $prec 2>&1 | grep '"impl"'
done; done; done
# Evaluation (issue 20): flow's device decoder against transformers `generate` and forward
# scoring, same shape, batch and lengths; build the binary with
# `cargo bench -p flow-stages --bench generate --no-run` and copy it to .devbin/generate-bench.
if [ -x .devbin/generate-bench ] || chmod +x .devbin/generate-bench 2>/dev/null; then
  for shape in 256,4,8,8,704,4096 4096,4,32,32,11008,32000; do
    for prec in f32 f16; do
      peak timeout 150 .devbin/generate-bench --device wgpu --shape $shape --batch 8 --prompt 128 --new 64 --precision $prec 2>&1 | grep '"impl"'
    done
    for dt in float32 float16 bfloat16; do
      peak timeout 150 python3 benches/eval_torch.py --device cuda --shape $shape --batch 8 --prompt 128 --new 64 --dtype $dt 2>&1 | grep '"impl"'
    done
  done
fi
# The paper's study at smoke size (issue 20, item 5): every stage of math_cpt on this GPU,
# timed stage by stage (the run's log and `flow status`). The full 7B shape writes a 27 GB
# f32 model per trained model, more than this machine's disk holds for the whole study, so
# this runs a 4-layer slice of it; every other shape and setting is the profile's (bf16
# training, so on CUDA: WGSL has no bf16). Needs the flow binary at .devbin/flow (built
# with `--features cuda`) and the test data at ../shared/data (or --set the files).
if [ -x .devbin/flow ] || chmod +x .devbin/flow 2>/dev/null; then
  if [ -d ../shared/data ]; then
    timeout 540 .devbin/flow run pipelines/math_cpt.toml --profile paper --profile paper-smoke \
      --set stage.pretrained.layers=4 --device cuda --cache "$out/smoke-cache" 2>&1 | tail -90
  fi
fi
