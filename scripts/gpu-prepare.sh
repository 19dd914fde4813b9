#!/usr/bin/env bash
# Builds and packs here what scripts/gpu-bench.sh runs on a lent GPU machine, so that the
# machine's few minutes go to measuring: the train and generate benches and the flow binary,
# built with `cuda` and wgpu (the benches with `spirv` too: wgpu on Vulkan then compiles
# through SPIR-V, the GPU path issue 19 benchmarks), stripped and xz-compressed into .devbin/; the Vulkan loaders
# into .gl/; the smoke study's records (../shared/data, which does not travel) into
# .shared-data/. All are ignored (.git/info/exclude) and travel as the device tool's `carry`
# (NVRTC and the CUDA headers are the machine's toolkit, found beside its nvcc). The working tree
# that travels may hold 64 MiB in all: the script prints what each call would carry.
#
# The lent machines run driver 580 (CUDA 13) with a CUDA 13 NVRTC: the binaries are built
# with cudarc's CUDA 13 bindings, which look NVRTC up as libnvrtc.so.13 as well as .so.12
# (README, "CUDA without LLVM"), in a target directory of their own so the everyday CUDA 12.8
# build stays cached. Usage: scripts/gpu-prepare.sh [train|generate|flow ...] (default all).
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
export CARGO_TARGET_DIR=${FLOW_DEVICE_TARGET:-$HOME/.cache/flow-device-target}
for d in /.devbin/ /.gl/ /.shared-data/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
done
mkdir -p .devbin
wanted=${*:-train generate flow}

# The executable cargo built for one bench or binary, from its JSON messages.
built() {
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" | tail -1
}
pack() { # pack EXECUTABLE NAME: stripped and compressed to .devbin/NAME.xz
  strip -o ".devbin/$2" "$1"
  xz -T2 -6 -f ".devbin/$2"
  ls -l ".devbin/$2.xz"
}
for what in $wanted; do
  case $what in
    train | generate)
      exe=$(cargo bench -p flow-stages --bench "$what" --no-run --features cuda,spirv \
        --message-format=json | built "$what")
      pack "$exe" "$what-bench" ;;
    flow)
      exe=$(cargo build --release --features cuda --message-format=json | built flow)
      pack "$exe" flow ;;
    *) echo "unknown: $what (train, generate, flow)" >&2; exit 2 ;;
  esac
done

if [ ! -d .gl ]; then # the Vulkan loaders (the device tool's README)
  mkdir -p .gl /tmp/amd64/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  # shellcheck disable=SC2086
  apt-get $o update -qq && (cd .gl && apt-get $o download libvulkan1)
fi
if [ ! -d .shared-data ]; then # what the studies' paper-smoke profiles read
  mkdir -p .shared-data
  cp -r ../shared/data/{gsm8k,hellaswag,arc,winogrande,humaneval} .shared-data/
fi
echo "carry sizes (64 MiB in all with the tracked files, $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) bytes):"
du -cb .devbin/*.xz .gl .shared-data
