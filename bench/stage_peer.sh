#!/usr/bin/env bash
# Stage, in the root of the checkout a GPU session sends, what bench/gpu_sweep.py needs for the peer side:
#   .whl/              the release's pinned wheels for the GPU machine's Python 3.12 (x86-64), ~14 MB
#   .peer/ControlLLM/  the release's src/controlllm/{utils,configs} at 7657b9f (read there, never committed)
#   .whl_ours/         what our side needs that the GPU image lacks (grain and its array-record, portpicker), ~4.5 MB
# All three are git-ignored; name them in the device call's `carry`. Usage, from the repository root:
#   bench/stage_peer.sh RELEASE
# RELEASE is a checkout of linkedin/ControlLLM at 7657b9f, or its bare git directory (what the session's
# `fetch github:linkedin/ControlLLM` returns).
set -euo pipefail
release=${1:?usage: bench/stage_peer.sh RELEASE (a checkout of linkedin/ControlLLM at 7657b9f, or its git dir)}
commit=7657b9f82188245f08142eccaed1fd68433ec3a4
expander_blob=c5cf8ad698b426e19ce6b5079132508f6f1227a5   # src/controlllm/utils/model_expander.py at $commit
# transformers 4.49.0 and liger-kernel 0.5.6 as W1 pins them; tokenizers, huggingface-hub and accelerate because
# the image's own (0.23, 1.x, 1.15) are outside what transformers 4.49 accepts or was built against.
wheels=(transformers==4.49.0 liger-kernel==0.5.6 tokenizers==0.21.4 huggingface-hub==0.36.2 accelerate==1.4.0)
ours=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0)
platforms=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)

rm -rf .whl .whl_ours .peer/ControlLLM
mkdir -p .whl .whl_ours .peer/ControlLLM
python3 -m pip download --no-deps "${platforms[@]}" -d .whl "${wheels[@]}"
python3 -m pip download --no-deps "${platforms[@]}" -d .whl_ours "${ours[@]}"

paths=(src/controlllm/utils src/controlllm/configs)
if [ -d "$release/src/controlllm" ]; then
  for p in "${paths[@]}"; do mkdir -p ".peer/ControlLLM/$(dirname "$p")"; cp -r "$release/$p" ".peer/ControlLLM/$p"; done
else
  git --git-dir="$release" archive "$commit" "${paths[@]}" | tar -x -C .peer/ControlLLM
fi
got=$(git hash-object .peer/ControlLLM/src/controlllm/utils/model_expander.py)
[ "$got" = "$expander_blob" ] || { echo "RELEASE $release: model_expander.py is not the one of $commit ($got)" >&2; exit 1; }
du -sh .whl .whl_ours .peer
