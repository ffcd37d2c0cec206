#!/usr/bin/env bash
# Installs SGLang 0.5.23's Python side into the ACTIVE Python environment for esamp's SGLang integration tests.
#
# SGLang's wheel pulls in GPU-only wheels (flashinfer, sgl-kernel, deep-gemm, ...) and pins transformers 5.19 and
# tokenizers 0.23.2, so it is installed with --no-deps, followed by the pure-Python (or plain-wheel) requirements
# that the modules esamp.integrations.sglang and tests/test_sglang.py use need to IMPORT on a CPU machine: the
# plugin loader, SamplingParams, the sampler and logits processor, the model runner, the Llama/Qwen2 models, the
# scheduler and its output streamer, the tokenizer manager, ServerArgs and the Engine entry point.  SGLang's CUDA
# kernels (sgl_kernel, flashinfer) stay absent on a CPU machine; that is expected (its CPU paths do not need them).
# Every package already installed (torch, transformers, numpy, tokenizers, huggingface_hub, vLLM's requirements,
# ...) is held at its current version by a constraints file, so this script never changes the project's torch
# and cannot break vLLM's imports.
# Idempotent: returns at once when everything already imports.
set -euo pipefail
SGLANG_VERSION=${SGLANG_VERSION:-0.5.23}
. "$(dirname "$0")/_install_nodeps.sh"

CHECK="
import importlib.metadata as md
assert md.version('sglang') == '${SGLANG_VERSION}', md.version('sglang')
import sglang.srt.plugins, sglang.srt.plugins.hook_registry, sglang.srt.sampling.sampling_params
import sglang.srt.layers.sampler, sglang.srt.layers.logits_processor, sglang.srt.model_executor.model_runner
import sglang.srt.models.llama, sglang.srt.models.qwen2, sglang.srt.managers.scheduler
import sglang.srt.managers.scheduler_components.output_streamer, sglang.srt.managers.tokenizer_manager
import sglang.srt.server_args, sglang.srt.entrypoints.engine
"
# SGLang's requirements that the modules in CHECK import at module level (found by importing them on a CPU
# machine and mapping sys.modules to distributions).  Unpinned on purpose: the constraints file holds what is
# installed, and the machine's package store does not carry all of SGLang's exact pins (transformers 5.19,
# xgrammar 0.2.7, ...); the imports are what the tests need.  torchvision resolves to the build matching the held
# torch.
REQS=(orjson msgspec pyzmq aiohttp fastapi uvicorn uvloop pybase64 psutil pillow requests regex einops
      partial-json-parser openai sentencepiece setproctitle xgrammar scipy gguf compressed-tensors dill ipython
      torchvision)
install_nodeps install_sglang sglang "$SGLANG_VERSION" "$CHECK" all "${REQS[@]}"
