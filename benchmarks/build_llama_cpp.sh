#!/usr/bin/env bash
# Build llama.cpp (the speed peer; benchmark-only) and a venv for its converter, into DIR.
# Source: the llama-cpp-python sdist from PyPI, which vendors llama.cpp and convert_hf_to_gguf.py.
# AMX instructions fault in this VM although the CPU advertises them, so they are disabled;
# AVX512 and VNNI stay on where the CPU has them. llama-server is the serving peer (bench_serve.py).
set -euo pipefail
dir=${1:?usage: build_llama_cpp.sh DIR}
version=0.3.36
mkdir -p "$dir" && cd "$dir"
[ -f "llama_cpp_python-$version.tar.gz" ] || pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d .
[ -d src ] || { tar xzf "llama_cpp_python-$version.tar.gz" && mv "llama_cpp_python-$version/vendor/llama.cpp" src; }
flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S src -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TESTS=OFF -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" >/dev/null
cmake --build build -j"$(nproc)" --target llama-bench llama-quantize llama-completion llama-server
# The converter's tested environment: transformers 4.57, CPU torch, the vendored gguf-py.
[ -d venv ] || python3 -m venv venv
venv/bin/pip install -q torch==2.13.0 "transformers==4.57.*" numpy sentencepiece safetensors protobuf
venv/bin/pip install -q -e src/gguf-py
echo "llama.cpp tools in $dir/build/bin, converter python in $dir/venv"
