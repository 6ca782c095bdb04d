#!/usr/bin/env bash
# Source ON the GPU machine, from the project root, at the start of a command:
#   . scripts/device_env.sh
# Installs whatever carried folders are present (see scripts/fetch-wheels.sh) into /tmp/site,
# exports PYTHONPATH/PATH, and points flashinfer's JIT at /tmp/fi. flash-attn-4 arrives in two
# calls: one that carries .fa4a stashes part 1 in /root/stage; the next one (while the machine
# is still warm) carries .fa4b and completes the install. Compiled flashinfer kernels that
# earlier runs brought back (.fi_cache/<name>.tgz.part-*, one archive per run) are installed as flashinfer's AOT
# modules, which skips their compile.
mkdir -p /root/stage /tmp/site /tmp/fi
[ -d .fa4a ] && cp .fa4a/* /root/stage/
if [ -d .fa4b ]; then
  for p in .fa4b/*.part.ab; do
    n=$(basename "$p" .part.ab)
    [ -f /root/stage/"$n".part.aa ] && cat /root/stage/"$n".part.aa "$p" > /root/stage/"$n" \
      && rm -f /root/stage/"$n".part.aa
  done
fi
# The embedded model's GGUF (98 MB) is more than one call may carry: three consecutive calls carry
# .gguf1, .gguf2, .gguf3 (a third each; the machine keeps what earlier calls left while it is warm)
if [ -d .gguf1 ] && [ -d .gguf2 ] && [ -d .gguf3 ]; then
  cat .gguf1/* .gguf2/* .gguf3/* > /tmp/smollm2.gguf && export AENGINE_FP8_LL_MODEL=/tmp/smollm2.gguf
fi
whls=$(ls .whl/*.whl /root/stage/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')
[ -n "$whls" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site $whls
export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:/usr/local/cuda/bin:$PATH
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export FLASHINFER_WORKSPACE_BASE=/tmp/fi
# an installed package normally has its bytecode compiled; here (read-only site-packages, wheels
# installed --no-compile) every process would compile the sources it imports again: seconds of
# every engine's start-up. Both engines get the cache. No hub on this machine: never ask it.
export PYTHONPYCACHEPREFIX=/tmp/pyc HF_HUB_OFFLINE=1
unset PYTHONDONTWRITEBYTECODE
if ls .fi_cache/*.tgz.part-* >/dev/null 2>&1 && [ -d /tmp/site/flashinfer ]; then
  mkdir -p /tmp/site/flashinfer/data/aot
  for a in $(ls .fi_cache/*.tgz.part-* | sed 's/\.part-[a-z]*$//' | sort -u); do  # one archive per run
    cat "$a".part-* | tar xz -C /tmp/site/flashinfer/data/aot
  done
fi
true
