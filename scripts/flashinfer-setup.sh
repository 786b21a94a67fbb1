#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# FlashInfer for bench/peers/flashinfer_bench.py on the device machine, which has no
# network and takes at most 64 MiB of carried files a call.  FlashInfer travels
# as one pruned archive, .whl/flashinfer-<version>-py312-sm90.tar.xz (about
# 16 MB; .whl/ is git-ignored and carried: carry [".whl"]), holding
#   flashinfer-python 0.6.18.post1 (PyPI, pure Python + kernel sources) and
#   apache-tvm-ffi 0.1.15.post2 (PyPI, its only dependency import needs that
#   the device image lacks), pruned to what paged-KV batch decode needs, plus
#   ahead-of-time builds (sm_90a, nvcc 13.0) of the two modules it runs,
#   batch_decode (CUDA cores) and the fa2 batch_prefill module
#   (use_tensor_cores=True), for bf16 q and output with a bf16 KV cache and
#   with an fp8 e4m3 one (torch.float8_e4m3fn; --kv-dtype fp8), head_dim
#   64/128/256 each: 12 modules.  Other configurations are JIT-compiled there
#   with nvcc into /tmp/fi-ws, offline.
#
# On the device, before the benchmark:
#   source scripts/flashinfer-setup.sh      # unpacks to /tmp/fi-site, exports
#   python3 bench/peers/flashinfer_bench.py ...
# or, in another shell:  eval "$(scripts/flashinfer-setup.sh)"
# Without the archive it says so on stderr and changes nothing (status 0).
#
# Here, to make the archive again (needs network, pip, nvcc 13.0, and a Python
# 3.12 that has torch and FlashInfer's light runtime dependencies, ninja among
# them, since FlashInfer itself is installed --no-deps; e.g.
#   python3.12 -m venv v && v/bin/pip install torch==2.11.0 packaging numpy ninja \
#     requests tqdm einops click tabulate nvidia-ml-py
# then, ~15 minutes on 2 cores):
#   FI_BUILD_PYTHON=v/bin/python scripts/flashinfer-setup.sh --build

_fi_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_fi_version=0.6.18.post1
_fi_tvm_ffi=0.1.15.post2
_fi_bundle=$_fi_root/.whl/flashinfer-$_fi_version-py312-sm90.tar.xz
_fi_site=${FI_SITE:-/tmp/fi-site}

_fi_build() (
    set -euo pipefail
    py=${FI_BUILD_PYTHON:-python3}
    "$py" -c 'import sys, torch; assert sys.version_info[:2] == (3, 12), sys.version'
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp/wheels" \
        "flashinfer-python==$_fi_version" "apache-tvm-ffi==$_fi_tvm_ffi"
    rm -rf "$_fi_site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$_fi_site" "$tmp"/wheels/*.whl
    cd "$_fi_site"
    # prune: what paged-KV decode (and its fa2/fa3 tensor-core path) never reads
    rm -rf build_backend.py build_utils.py bin \
        flashinfer/data/build_backend.py flashinfer/data/build_utils.py \
        flashinfer/data/cutlass/{python,examples,test} \
        tvm_ffi/3rdparty tvm_ffi/src
    # other kernels' sources (MoE, MLA-XQA, KDA, FMHA-v2, NVFP4, ...): the
    # decode and prefill generators read only csrc's top-level files
    find flashinfer/data/csrc -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
    # ahead-of-time modules, loaded from flashinfer/data/aot/<name>/<name>.so
    FLASHINFER_WORKSPACE_BASE=$tmp/ws FLASHINFER_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) \
    PYTHONPATH=$_fi_site "$py" - <<'EOF'
import os, shutil, time, torch
from flashinfer.jit import env
from flashinfer.jit.attention import gen_batch_decode_module, gen_batch_prefill_module
bf = torch.bfloat16
# the names plan() looks up (decode.py, FlashInfer 0.6.18): q, kv, o, index
# dtypes, head_dim qk/vo, no posenc/window/soft cap (/fp16 qk reduction).  For
# bf16 q with an fp8 KV cache, use_tensor_cores=True's "auto" backend is fa2
# (FA3 wants fp8 q too); the CUDA-core decode takes the fp8 cache directly.
for kv in (bf, torch.float8_e4m3fn):
    for d in (64, 128, 256):
        for spec in (gen_batch_decode_module(bf, kv, bf, torch.int32, d, d, 0, False, False),
                     gen_batch_prefill_module("fa2", bf, kv, bf, torch.int32, d, d, 0, False, False, False)):
            t = time.time()
            spec.build()
            dst = env.FLASHINFER_AOT_DIR / spec.name
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(spec.jit_library_path, dst / f"{spec.name}.so")
            print(f"aot {spec.name}: {time.time() - t:.0f} s", flush=True)
EOF
    find . -name __pycache__ -prune -exec rm -rf {} +
    mkdir -p "$(dirname "$_fi_bundle")"
    rm -f "$_fi_root"/.whl/flashinfer-*.tar.xz
    tar -C "$_fi_site" -cf - . | xz -T0 -9 >"$_fi_bundle"
    ls -l "$_fi_bundle"
)

_fi_setup() {
    if [ ! -f "$_fi_bundle" ]; then
        echo "# flashinfer-setup: no $_fi_bundle (make it here with --build)" >&2
        return 0
    fi
    # name and size: an archive rebuilt under the same name (more AOT modules)
    # is unpacked again on a machine that holds the older one
    local tag
    tag="$(basename "$_fi_bundle") $(stat -c %s "$_fi_bundle")"
    if [ ! -f "$_fi_site/.fi-bundle" ] || [ "$(cat "$_fi_site/.fi-bundle")" != "$tag" ]; then
        rm -rf "$_fi_site" && mkdir -p "$_fi_site" &&
            tar -C "$_fi_site" -xJf "$_fi_bundle" &&
            echo "$tag" >"$_fi_site/.fi-bundle" ||
            { echo "# flashinfer-setup: unpacking $_fi_bundle failed" >&2; return 0; }
    fi
    local cuda=${CUDA_HOME:-/usr/local/cuda}
    local pybin
    pybin=$(dirname "$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null || echo /usr/bin/python3)")
    _fi_exports=(
        "PYTHONPATH=$_fi_site${PYTHONPATH:+:$PYTHONPATH}"
        "FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fi-ws}"
        "FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0}"
        "MAX_JOBS=${MAX_JOBS:-$(nproc)}"
        "CUDA_HOME=$cuda"
        "PATH=$cuda/bin:$pybin:$PATH"
    )
}

if [ "${1:-}" = --build ]; then
    _fi_build
    exit $?
fi
_fi_exports=()
_fi_setup
if [ "${BASH_SOURCE[0]}" != "$0" ]; then  # sourced: set them here
    for _fi_e in "${_fi_exports[@]}"; do export "$_fi_e"; done
    unset _fi_e
else                                      # run: print them for eval
    for _fi_e in "${_fi_exports[@]}"; do printf 'export %q\n' "$_fi_e"; done
fi
unset _fi_exports _fi_root _fi_version _fi_tvm_ffi _fi_bundle _fi_site
unset -f _fi_build _fi_setup
