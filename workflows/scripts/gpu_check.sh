#!/usr/bin/env bash
# The suite's GPU evidence in one command, on a machine with one CUDA GPU; every stage writes its
# results before the next starts, each under its own time limit (all of them within about 6 min):
#   a  device, driver, torch / CUDA versions, host<->device bandwidth (pinned and pageable)
#   b  pytest -m gpu (junit XML)
#   c  ScheInfer's bench on a generated Mixtral-style F32 GGUF larger than the GPU budget, against
#      Fiddler's policy and llama.cpp partially offloaded (-ngl, --n-cpu-moe) within the same budget
#   d  a hardware profile of this machine for the sim tiers (GEMM, PCIe, memory bandwidth)
#   e  the run record of the whole run (device, versions, tok/s, ratios, stage statuses)
#
#   bash workflows/scripts/gpu_check.sh [--out DIR] [--dry-run] [--budget BYTES] [--model-set K=V,...]
#        [--prompt-tokens 32,128] [--n-predict 16] [--repeats 3]
#
# Results (8 files at most) go to $OUT when it is set, else to --out DIR: a_device.json,
# b_pytest.xml, c_bench.csv, c_bench.json, d_profile.yaml, d_scheinfer_hardware.yaml,
# e_record.json, gpu_check.log. --dry-run needs no GPU: the same stages on a small model, the
# engine's GPU lanes emulated on the CPU, everything labelled emulated (CI runs it).
# The GPU machine runs the project from PYTHONPATH with its own Python 3.12 and torch; what it
# lacks comes as wheels in .whl/ (`make gpu-wheels`), installed here into a private folder, and
# llama.cpp with CUDA comes prebuilt in .gpu/llama-cuda (`make llamacpp-cuda`), rebuilt here from
# .gpu/llama-cpp-src-*.tar.xz only if it does not load. workflows/scripts/GPU_RUN.md has the call.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
ARGS="$*"
DRY=0
DEST=${OUT:-}
BUDGET=""
MODEL_SET=""
PROMPTS=""
NPRED=""
REPEATS=""
# an option's value: present, and not the next option
value() { [ $# -ge 2 ] && [ "${2#--}" = "$2" ] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) value "$@"; DEST=$2; shift 2;;
    --dry-run) DRY=1; shift;;
    --budget) value "$@"; BUDGET=$2; shift 2;;
    --model-set) value "$@"; MODEL_SET=$2; shift 2;;
    --prompt-tokens) value "$@"; PROMPTS=$2; shift 2;;
    --n-predict) value "$@"; NPRED=$2; shift 2;;
    --repeats) value "$@"; REPEATS=$2; shift 2;;
    -h|--help) sed -n 2,23p "$0"; exit 0;;
    *) echo "error: unknown argument $1; allowed: --out DIR, --dry-run, --budget BYTES, --model-set K=V,..., --prompt-tokens A,B, --n-predict N, --repeats R" >&2; exit 2;;
  esac
done
[ -n "$DEST" ] || { echo "error: no result folder: set OUT or pass --out DIR" >&2; exit 2; }
if [ "$DRY" = 1 ]; then       # a small model and budget: seconds on 2 CPU cores
  : "${BUDGET:=5000000}" "${MODEL_SET:=hidden=128,moe_ffn_hidden=256,ffn_hidden=256,num_layers=4,num_heads=4,num_kv_heads=2,head_dim=32}"
  : "${PROMPTS:=8,16}" "${NPRED:=4}" "${REPEATS:=1}"
  CAL="--widths 64,128,256 --rows 1,8,32"
  # stage limits (s): setup (recorded; its one long part, a llama.cpp rebuild, has its own), a, b,
  # c-model, c-cost, c-bench, d, e; DEADLINE: the bench starts no new round after it
  L_SETUP=60 L_A=60 L_B=120 L_C1=60 L_C2=60 L_C3=180 L_D=60 L_E=30 DEADLINE=60
else                          # 4.2 GB of F32 weights (6 layers x 8 experts x 3 x 2048 x 3584) under 2 GiB
  : "${BUDGET:=2147483648}" "${MODEL_SET:=hidden=2048,moe_ffn_hidden=3584,ffn_hidden=3584,num_layers=6,num_heads=16,num_kv_heads=4,head_dim=128}"
  : "${PROMPTS:=32,128}" "${NPRED:=16}" "${REPEATS:=3}"
  CAL="--widths 512,1024,2048,3584 --rows 1,4,16,64,128"
  L_SETUP=20 L_A=20 L_B=70 L_C1=75 L_C2=25 L_C3=120 L_D=20 L_E=10 DEADLINE=50
fi
case "$BUDGET" in (*[!0-9]*|'') echo "error: --budget=$BUDGET is not allowed; expected bytes (an integer)" >&2; exit 2;; esac
positive() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
for opt in "--n-predict=$NPRED" "--repeats=$REPEATS"; do
  positive "${opt#*=}" || { echo "error: $opt is not allowed; expected a positive integer" >&2; exit 2; }
done
[[ $PROMPTS =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || { echo "error: --prompt-tokens=$PROMPTS is not allowed; expected comma-separated positive token counts, e.g. 32,128" >&2; exit 2; }
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || { echo "error: $PY cannot import torch; set PYTHON to the interpreter of the project's environment (e.g. PYTHON=.venv/bin/python)" >&2; exit 2; }
mkdir -p "$DEST" || exit 2
DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGES="$WORK/stages.tsv"
: > "$STAGES"

# one stage: a command under a time limit; its exit status and time go to the stage table
stage() {
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "== stage $name (limit ${limit} s): $*"
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$STAGES"
  echo "== stage $name: exit $rc after $(( $(date +%s) - t0 )) s"
  return "$rc"
}

# setup: carried wheels, the CUDA libraries' folders, the llama.cpp build (rebuilt only if needed)
setup() {
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
  missing=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in ('gguf', 'jsonschema', 'llama_cpp', 'pytest_timeout', 'hypothesis') if u.find_spec(m) is None))")
  if [ -n "$missing" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    echo "[setup] missing here: $missing; installing the carried wheels (.whl) into a private folder"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$ROOT"/.whl/*.whl \
      && export PYTHONPATH="$ROOT:$WORK/site${PYTHONPATH#"$ROOT"}"
  fi
  # ScheInfer's native CPU kernels (a 20-40 s compile where a compiler and ninja exist) are built
  # here under a limit: a build cut off inside a stage would leave its lock for the next stage to
  # wait on forever; if it does not finish, the run uses torch's kernels and builds nothing more
  if timeout -k 5 60 "$PY" -c "from impl.scheinfer import cpu_kernels as k; print('[setup] native CPU kernels:', k.available() and k.supported_isas() or k.load_error())"; then :
  else
    export SCHEINFER_NATIVE_KERNELS=off
    echo "[setup] native CPU kernels not built within 60 s: torch's kernels (SCHEINFER_NATIVE_KERNELS=off)"
  fi
  nv=$("$PY" -c "
import glob, os, sys
print(':'.join(sorted({d for p in sys.path for d in glob.glob(os.path.join(p, 'nvidia', '*', 'lib'))
                       if glob.glob(os.path.join(d, 'libcu*.so*'))})))" 2>/dev/null)
  [ -n "$nv" ] && export LD_LIBRARY_PATH="$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  lib=${LLAMA_CPP_LIB_PATH:-$ROOT/.gpu/llama-cuda}
  [ -f "$lib/libllama.so" ] && export LLAMA_CPP_LIB_PATH=$lib
  LLAMA=0
  if llama_ok; then LLAMA=1
  elif [ "$DRY" = 0 ] && ls "$ROOT"/.gpu/llama-cpp-src-*.tar.xz >/dev/null 2>&1; then
    echo "[setup] the carried llama.cpp does not offload here; building it (sm_90, $(nproc) jobs, at most 240 s)"
    timeout 240 bash "$ROOT/workflows/scripts/build_llamacpp_cuda.sh" --jobs "$(nproc)" --out "$WORK/llama-cuda" \
      && export LLAMA_CPP_LIB_PATH="$WORK/llama-cuda" && llama_ok && LLAMA=1
  elif [ "$DRY" = 1 ] && [ -n "${LLAMA_CPP_LIB_PATH:-}" ]; then
    unset LLAMA_CPP_LIB_PATH                # the package's own build, if it has one
    llama_ok && LLAMA=1
  fi
  if [ "$LLAMA" = 0 ] && [ -d "$WORK/site/llama_cpp" ]; then
    # a binding without a library fails at import (not an ImportError): hide it, so that what needs
    # llama.cpp skips as where it is not installed
    rm -rf "$WORK"/site/llama_cpp "$WORK"/site/llama_cpp_python-*
    echo "[setup] no usable llama.cpp library: its binding is left out; llama.cpp parts skip"
  fi
  echo "[setup] PYTHONPATH=$PYTHONPATH LLAMA_CPP_LIB_PATH=${LLAMA_CPP_LIB_PATH:-} llama.cpp usable: $LLAMA"
  echo "$LLAMA" > "$WORK/llama"
}

# llama.cpp loads (and, outside a dry run, can offload to the GPU)
llama_ok() {
  "$PY" -c "
import ctypes, os
from baselines.llamacpp.runner import llama_cpp_info
info = llama_cpp_info()
print('[setup] llama.cpp:', info)
cuda_lib = os.path.join(os.environ.get('LLAMA_CPP_LIB_PATH', ''), 'libggml-cuda.so')
if info['gpu_offload'] != 'True' and os.path.isfile(cuda_lib):
    try:                    # ggml skips a backend that fails to load silently: say why
        ctypes.CDLL(cuda_lib)
    except OSError as e:
        print('[setup] libggml-cuda.so does not load:', e)
raise SystemExit(0 if $DRY or info['gpu_offload'] == 'True' else 3)" 2>&1 | tail -4
  return "${PIPESTATUS[0]}"
}

main() {
  echo "gpu_check: $(date -u +%FT%TZ) dry_run=$DRY budget=$BUDGET model=$MODEL_SET results=$DEST work=$WORK"
  local t_setup=$(date +%s)
  setup
  printf 'setup\t0\t%s\t%s\n' "$(( $(date +%s) - t_setup ))" "$L_SETUP" >> "$STAGES"
  local dry=() model="$WORK/model.gguf" llama=()
  [ "$DRY" = 1 ] && dry=(--dry-run)
  [ "$(cat "$WORK/llama")" = 1 ] && llama=(--llamacpp --llamacpp-offload auto)

  stage a-device "$L_A" "$PY" -m impl.experiments.gpu_check device "${dry[@]}" --out "$DEST/a_device.json"
  # the GPU tests, what this run is for first (ScheInfer's CUDA lanes, llama.cpp with CUDA, the
  # dispatchers), then every other file with GPU tests (the launches of NCCL and gloo ranks are
  # the slowest), so that a stage cut short by its limit has run the ones that matter most
  local first=(tests/gpu/test_scheinfer_cuda.py tests/unit/test_scheinfer_engine.py tests/gpu/test_llamacpp_cuda.py
               tests/gpu/test_dispatchers_cuda.py) rest=()
  mapfile -t first < <(for f in "${first[@]}"; do [ -f "$f" ] && echo "$f"; done)
  mapfile -t rest < <(grep -rl --include='test_*.py' 'pytest\.mark\.gpu\b' "$ROOT/tests" | sed "s|^$ROOT/||" | sort \
                      | grep -v -F -x -f <(printf '%s\n' "${first[@]}"))
  stage b-pytest "$L_B" "$PY" -m pytest -m gpu "${first[@]}" "${rest[@]}" -q -rA -p no:cacheprovider --continue-on-collection-errors \
    --timeout=60 --session-timeout=$((L_B - 15)) --junitxml "$DEST/b_pytest.xml"   # ends between tests, XML kept
  local sets=()
  IFS=, read -ra kv <<< "$MODEL_SET"
  for x in "${kv[@]}"; do sets+=(--set "$x"); done
  local hidden
  hidden=$(tr ',' '\n' <<< "$MODEL_SET" | sed -n 's/^hidden=//p')
  stage c-model "$L_C1" "$PY" -m impl.scheinfer.generate_models --kind mixtral --dtype f32 --seed 0 "${sets[@]}" --out "$model" \
    && ls -l "$model"
  # shellcheck disable=SC2086
  stage c-cost "$L_C2" "$PY" -m impl.experiments.scheinfer calibrate --hidden "$hidden" $CAL --out "$WORK/cost.json"
  stage c-bench "$L_C3" "$PY" -m impl.experiments.scheinfer bench --model "$model" --prompt-tokens "$PROMPTS" \
    --n-predict "$NPRED" --policies scheinfer,fiddler --gpu-mem "$BUDGET" --cost "$WORK/cost.json" "${llama[@]}" \
    --gpu-matmul tf32 \
    --repeats "$REPEATS" --deadline-s "$DEADLINE" --no-progress --out-csv "$DEST/c_bench.csv" --out-record "$DEST/c_bench.json"
  rm -f "$model"
  stage d-profile "$L_D" "$PY" -m impl.experiments.gpu_check profile "${dry[@]}" --out "$DEST/d_profile.yaml" \
    --hardware-out "$DEST/d_scheinfer_hardware.yaml"
  stage e-record "$L_E" "$PY" -m impl.experiments.gpu_check record "${dry[@]}" --dir "$DEST" --stages "$STAGES" \
    --out "$DEST/e_record.json" --command "bash workflows/scripts/gpu_check.sh $ARGS"
  local failed
  failed=$(awk -F'\t' '$2 != 0 {print $1}' "$STAGES" | tr '\n' ' ')
  echo "gpu_check: done $(date -u +%FT%TZ); results in $DEST: $(ls "$DEST" | tr '\n' ' ')"
  [ -z "$failed" ] || { echo "gpu_check: stages that failed or timed out: $failed"; return 1; }
}

main "$@" 2>&1 | tee "$DEST/gpu_check.log"
exit "${PIPESTATUS[0]}"
