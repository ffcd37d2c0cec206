"""The process environment under which tests/test_vllm.py and tests/test_sglang.py import their engine: vLLM's CPU
platform (SGLang imports vLLM's modules too), Triton's interpreter, quiet logging, no CUDA device when torch sees
none.  Applied only around the imports and restored afterwards, so both suites run in one pytest process in either
order and nothing leaks into the other tests."""
import contextlib
import os

import torch


@contextlib.contextmanager
def cpu_engine_environ():
    env = {"TRITON_INTERPRET": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_LOGGING_LEVEL": "WARNING"}
    if not torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
