#!/usr/bin/env bash
# llama.cpp with CUDA, built for one GPU architecture from the sources that the pinned
# llama-cpp-python ships (its sdist's vendor/llama.cpp), as the shared libraries that binding loads
# from LLAMA_CPP_LIB_PATH. Used by `make llamacpp-cuda` (ahead of time, on a CPU machine with nvcc)
# and by gpu_check.sh (on the GPU machine, only when the prebuilt libraries fail to load there).
#
#   workflows/scripts/build_llamacpp_cuda.sh [--arch 90] [--jobs 2] [--cpu-variants x64,haswell,skylakex]
#                                            [--out .gpu/llama-cuda]
#
# Why each choice:
# * shared backends loaded at run time (GGML_BACKEND_DL) with several x86 CPU variants
#   (GGML_CPU_ALL_VARIANTS, as llama.cpp's own Linux releases, cut to --cpu-variants): the GPU
#   machine's CPU is not this one, and llama.cpp's CPU part must run at that CPU's best ISA to be a
#   fair baseline; the default keeps the generic, AVX2 and AVX-512 variants, which is what F32
#   weights use (the others add VNNI / BF16 / AMX, for quantized and bf16 types);
# * one CUDA architecture, machine code only (sm_90 = H100/H200, no PTX), no FlashAttention
#   kernels (the suite runs llama.cpp with flash_attn off, as the engine's attention is eager), no
#   NCCL: a small, quicker build;
# * cuBLAS from the CUDA toolkit, else from the installed `nvidia-cublas` Python package, else its
#   wheel fetched by pip (this toolkit ships nvcc and cudart only); libcuda.so from the driver or
#   the toolkit's stub, else a stub with only the soname (its symbols resolve at load time);
# * the sources travel as a pruned tarball (.gpu/llama-cpp-src-VERSION.tar.xz, about 2 MB), so a
#   GPU machine without network can rebuild.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ARCH=90
JOBS=2
CPU_VARIANTS=x64,haswell,skylakex
OUT="$ROOT/.gpu/llama-cuda"
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=$2; shift 2;;
    --jobs) JOBS=$2; shift 2;;
    --cpu-variants) CPU_VARIANTS=$2; shift 2;;
    --out) OUT=$2; shift 2;;
    -h|--help) sed -n 2,20p "$0"; exit 0;;
    *) echo "error: unknown argument $1; allowed: --arch N, --jobs N, --cpu-variants A,B, --out DIR" >&2; exit 2;;
  esac
done
case "$ARCH" in (*[!0-9a]*|'') echo "error: --arch=$ARCH is not allowed; expected a CUDA architecture such as 90" >&2; exit 2;; esac
case "$JOBS" in (*[!0-9]*|''|0) echo "error: --jobs=$JOBS is not allowed; expected an integer >= 1" >&2; exit 2;; esac

PY=${PYTHON:-python3}
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")
[ -n "$VERSION" ] || { echo "error: no llama-cpp-python==X pin in pyproject.toml" >&2; exit 2; }
GPU="$ROOT/.gpu"
SRC_TAR="$GPU/llama-cpp-src-$VERSION.tar.xz"
WORK="$GPU/build"
mkdir -p "$GPU" "$WORK"
export GIT_CEILING_DIRECTORIES="$WORK"      # llama.cpp's build info must not read this repository's git
NVCC=$(command -v nvcc || true)
[ -n "$NVCC" ] || { echo "error: nvcc not found on PATH; a CUDA toolkit is needed" >&2; exit 2; }

# ---- 1. the pruned sources of the pinned llama-cpp-python's vendor/llama.cpp
if [ ! -f "$SRC_TAR" ]; then
  echo "[llamacpp-cuda] fetching the llama-cpp-python==$VERSION sdist"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
  v="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
  git -C "$v" log -1 --format='%H %cI' > "$v/UPSTREAM_COMMIT" 2>/dev/null || echo unknown > "$v/UPSTREAM_COMMIT"
  (cd "$v" && tar -cJf "$SRC_TAR.part" UPSTREAM_COMMIT CMakeLists.txt LICENSE licenses cmake include src vendor \
      ggml/CMakeLists.txt ggml/cmake ggml/include ggml/src/*.c ggml/src/*.cpp ggml/src/*.h ggml/src/*.in \
      ggml/src/CMakeLists.txt ggml/src/ggml-cpu ggml/src/ggml-cuda ggml/src/ggml-blas)
  mv "$SRC_TAR.part" "$SRC_TAR"
  rm -rf "$tmp"; trap - EXIT
fi
SRC="$WORK/llama.cpp-$VERSION"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  mkdir -p "$SRC" && tar -xJf "$SRC_TAR" -C "$SRC"
  cp "$SRC/ggml/src/CMakeLists.txt" "$SRC/ggml/src/CMakeLists.txt.orig"
fi
# keep only the chosen x86 CPU variants (each is ~18 objects; all 14 would double the build)
known=$(sed -n 's/^ *ggml_add_cpu_backend_variant(\([a-z0-9_]*\) *.*/\1/p' "$SRC/ggml/src/CMakeLists.txt.orig" | tr '\n' ' ')
for v in ${CPU_VARIANTS//,/ }; do
  case " $known " in (*" $v "*) ;; (*) echo "error: --cpu-variants: $v is not allowed; expected some of: $known" >&2; exit 2;; esac
done
awk -v keep=",$CPU_VARIANTS," '
  /^ *ggml_add_cpu_backend_variant\(/ { name = $0; sub(/^ *ggml_add_cpu_backend_variant\( */, "", name); sub(/[ )].*/, "", name)
    if (name ~ /^(x64|sse42|sandybridge|ivybridge|piledriver|haswell|skylakex|cannonlake|cascadelake|icelake|cooperlake|zen4|alderlake|sapphirerapids)$/ && index(keep, "," name ",") == 0) { print "#" $0; next } }
  { print }' "$SRC/ggml/src/CMakeLists.txt.orig" > "$SRC/ggml/src/CMakeLists.txt.new"
cmp -s "$SRC/ggml/src/CMakeLists.txt.new" "$SRC/ggml/src/CMakeLists.txt" || mv "$SRC/ggml/src/CMakeLists.txt.new" "$SRC/ggml/src/CMakeLists.txt"
rm -f "$SRC/ggml/src/CMakeLists.txt.new"

# ---- 2. cuBLAS headers and libraries, and libcuda for linking
if [ -z "${CUDA_HOME:-}" ]; then           # nvcc may be a wrapper script (as /usr/local/bin/nvcc here)
  for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$NVCC")")")"; do
    [ -x "$c/bin/nvcc" ] && { CUDA_HOME=$c; break; }
  done
fi
[ -x "${CUDA_HOME:-}/bin/nvcc" ] || { echo "error: CUDA_HOME=${CUDA_HOME:-} has no bin/nvcc; set CUDA_HOME" >&2; exit 2; }
NVCC="$CUDA_HOME/bin/nvcc"
DEPS="$WORK/deps"
mkdir -p "$DEPS/lib"
CUBLAS_INC="" CUBLAS_LIB=""
if [ -f "$CUDA_HOME/include/cublas_v2.h" ] && ls "$CUDA_HOME"/lib64/libcublas.so* >/dev/null 2>&1; then
  CUBLAS_INC="$CUDA_HOME/include" CUBLAS_LIB="$CUDA_HOME/lib64"
else
  pkg=$("$PY" - <<'PYEOF' 2>/dev/null || true
import glob, importlib.util, os, sys
for p in sys.path:
    for d in glob.glob(os.path.join(p, "nvidia", "cu1*")):
        if glob.glob(os.path.join(d, "include", "cublas_v2.h")) and glob.glob(os.path.join(d, "lib", "libcublas.so*")):
            print(d); raise SystemExit
PYEOF
)
  if [ -z "$pkg" ]; then
    echo "[llamacpp-cuda] cuBLAS: fetching the nvidia-cublas wheel matching nvcc's CUDA major"
    major=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
    minor=$("$NVCC" --version | sed -n 's/.*release [0-9]*\.\([0-9]*\).*/\1/p')
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEPS" "nvidia-cublas>=$major.$minor,<$major.$((minor + 1))"
    (cd "$DEPS" && unzip -q -o nvidia_cublas-*.whl 'nvidia/*')
    pkg=$(ls -d "$DEPS"/nvidia/cu1* | head -1)
  fi
  CUBLAS_INC="$pkg/include" CUBLAS_LIB="$pkg/lib"
fi
for l in cublas cublasLt; do
  so=$(ls "$CUBLAS_LIB"/lib$l.so.* 2>/dev/null | head -1)
  [ -n "$so" ] || { echo "error: lib$l.so.* not found in $CUBLAS_LIB" >&2; exit 1; }
  ln -sf "$so" "$DEPS/lib/lib$l.so"
done
# A stub libcuda.so.1 exporting the given driver API functions (none at first): the linker records
# libcuda.so.1 as needed only when the stub defines what the library calls (linking is --as-needed),
# and without that entry the driver's symbols (ggml's VMM pool: cuMemCreate, ...) stay unresolved
# when ggml opens the CUDA backend on the GPU machine.
driver_stub() {
  { echo '/* link-time stand-in for the CUDA driver; the real libcuda.so.1 is loaded at run time */'
    for sym in "$@"; do echo "int $sym(void) { return 0; }"; done
    echo 'void ggml_llamacpp_cuda_link_stub(void) {}'; } > "$DEPS/cuda_stub.c.new"
  cmp -s "$DEPS/cuda_stub.c.new" "$DEPS/cuda_stub.c" && [ -f "$DEPS/lib/libcuda.so" ] && { rm -f "$DEPS/cuda_stub.c.new"; return; }
  mv "$DEPS/cuda_stub.c.new" "$DEPS/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$DEPS/lib/libcuda.so" "$DEPS/cuda_stub.c"
}
CUDA_DRIVER=$(ls "$CUDA_HOME"/lib64/stubs/libcuda.so /usr/lib/x86_64-linux-gnu/libcuda.so.1 2>/dev/null | head -1 || true)
STUB=0
if [ -z "$CUDA_DRIVER" ]; then
  STUB=1
  [ -f "$DEPS/lib/libcuda.so" ] || driver_stub
  CUDA_DRIVER="$DEPS/lib/libcuda.so"
fi
echo "[llamacpp-cuda] nvcc $CUDA_HOME, cuBLAS $CUBLAS_LIB, libcuda $CUDA_DRIVER, sm_$ARCH, $JOBS jobs"

# ---- 3. configure and build
B="$WORK/cmake-sm$ARCH"
t0=$(date +%s)
cmake -S "$SRC" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDAToolkit_ROOT="$CUDA_HOME" \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH-real" -DCMAKE_CUDA_FLAGS="-I$CUBLAS_INC" -DCMAKE_CXX_FLAGS="-I$CUBLAS_INC" \
  -DCUDA_cublas_LIBRARY="$DEPS/lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$DEPS/lib/libcublasLt.so" \
  -DCUDA_cuda_driver_LIBRARY="$CUDA_DRIVER" \
  -DGGML_CUDA=ON -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON \
  -DGGML_CPU_ALL_VARIANTS=ON -DGGML_CCACHE=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_OPENSSL=OFF -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON > "$WORK/configure.log"
cmake --build "$B" -j "$JOBS" > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; exit 1; }
driver_calls() { nm -D --undefined-only "$B/bin/libggml-cuda.so" | awk '{print $2}' | grep '^cu[A-Z]' | sort -u; }
if [ "$STUB" = 1 ]; then           # the stub now defines what the backend calls; relink against it
  driver_stub $(driver_calls)
  cmake --build "$B" -j "$JOBS" >> "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; exit 1; }
fi
if [ -n "$(driver_calls)" ] && ! readelf -d "$B/bin/libggml-cuda.so" | grep -q 'NEEDED.*\[libcuda\.so\.1\]'; then
  echo "error: libggml-cuda.so calls the CUDA driver ($(driver_calls | head -3 | tr '\n' ' ')...) but does not" \
       "name libcuda.so.1 as needed: it would not load on a GPU machine" >&2
  exit 1
fi
t1=$(date +%s)

# ---- 4. the libraries the binding loads, stripped, with what they are
rm -rf "$OUT.part" && mkdir -p "$OUT.part"
# each library under its soname (the name the others' DT_NEEDED entries use), and libllama.so
# also under the name the binding opens (a copy: a link would not survive every way of carrying);
# backends (dlopen'ed modules) have no soname
for f in "$B"/bin/lib*.so; do
  soname=$(objdump -p "$f" | sed -n 's/^ *SONAME *//p')
  cp -L "$f" "$OUT.part/${soname:-$(basename "$f")}"
done
cp "$OUT.part"/libllama.so.* "$OUT.part/libllama.so"
find "$OUT.part" -type f -name "*.so*" -exec strip --strip-unneeded {} +
{
  echo "llama-cpp-python $VERSION (vendor/llama.cpp $(cat "$SRC/UPSTREAM_COMMIT"))"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $JOBS jobs, $((t1 - t0)) s (this run; steps an earlier run built are reused)"
  echo "nvcc: $("$NVCC" --version | tail -2 | head -1)"
  echo "cuBLAS headers: $CUBLAS_INC"
  echo "flags: CUDA sm_$ARCH, GGML_BACKEND_DL, CPU variants $CPU_VARIANTS, GGML_CUDA_FA=OFF, GGML_CUDA_NCCL=OFF"
  echo "runtime needs: libcudart.so.13, libcublas.so.13, libcublasLt.so.13 (LD_LIBRARY_PATH), libcuda.so.1 (driver)"
  echo "needed by libggml-cuda.so: $(readelf -d "$OUT.part/libggml-cuda.so" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
} > "$OUT.part/BUILD_INFO.txt"
rm -rf "$OUT" && mv "$OUT.part" "$OUT"
du -sh "$OUT"
cat "$OUT/BUILD_INFO.txt"
