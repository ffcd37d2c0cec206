"""Loads the compiled operators (torch.ops.esamp.*), registers their fake kernels, and exposes thin
typed wrappers (esamp.ops.*).  Higher layers use these wrappers, never the C++ library directly."""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "reweight",
    "reweight_logits",
    "mix_hidden",
    "capture",
    "distiller_forward",
    "distiller_train_step",
    "distiller_reset",
    "derive_row_seeds",
    "has_cuda_kernels",
    "build_info",
    "torch_mismatch",
]


def _find_library() -> Optional[str]:
    """Path of the compiled library _C.so: beside this file (installed package, or tools/build_inplace.sh's link),
    else wherever the import system places esamp._C (an editable install keeps this file in the source tree and
    the built library in site-packages)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.so")
    if os.path.exists(here):
        return here
    try:
        spec = importlib.util.find_spec(f"{__package__}._C")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and os.path.exists(spec.origin):
        return spec.origin
    return None


def _torch_release(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1' (the C++ ABI of libtorch is tied to the release, the local tag is CUDA's)."""
    return version.split("+", 1)[0]


def _cuda_major(v) -> Optional[str]:
    return str(v).split(".", 1)[0] if v else None


def torch_mismatch(info: dict, *, version: Optional[str] = None, cxx11_abi: Optional[bool] = None,
                   cuda: Optional[str] = "unset") -> Optional[str]:
    """Why the torch given (default: the running one) cannot load a library built with `info` (the build's
    _build_info.json), or None when it can: the torch release (X.Y.Z), its C++11 ABI flag and, for a build with
    CUDA kernels, its CUDA major version must match the build's."""
    version = torch.__version__ if version is None else version
    cxx11_abi = bool(torch._C._GLIBCXX_USE_CXX11_ABI) if cxx11_abi is None else bool(cxx11_abi)
    cuda = torch.version.cuda if cuda == "unset" else cuda
    problems = []
    if _torch_release(info["torch_version"]) != _torch_release(version):
        problems.append(f"torch {info['torch_version']} was used to build it, torch {version} is installed")
    if bool(int(info["torch_cxx11_abi"])) != cxx11_abi:
        problems.append(f"C++11 ABI {int(info['torch_cxx11_abi'])} at build time, {int(cxx11_abi)} now")
    if str(info.get("cuda_kernels", "OFF")).upper() in ("ON", "TRUE", "1") and \
            _cuda_major(info.get("torch_cuda")) != _cuda_major(cuda):
        problems.append(f"it holds CUDA kernels built for CUDA {info.get('torch_cuda')}, the installed torch has "
                        f"CUDA {cuda or 'none (CPU-only build)'}")
    return "; ".join(problems) or None


_REBUILD = ("rebuild esamp against the installed torch: from the source tree, "
            "`pip install --no-build-isolation --no-deps --force-reinstall .` (or tools/build_inplace.sh for a "
            "development build)")


def _read_build_info(lib: str) -> Optional[dict]:
    path = os.path.join(os.path.dirname(os.path.realpath(lib)), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _load() -> dict:
    lib = _find_library()
    if lib is None:
        raise ImportError(
            "esamp: compiled library _C.so not found beside esamp/_ops.py nor on the import path. Install the "
            "package with `pip install --no-build-isolation .` (or run tools/build_inplace.sh for a development "
            "build).")
    info = _read_build_info(lib)
    if info is not None and os.environ.get("ESAMP_SKIP_TORCH_CHECK", "") in ("", "0"):
        why = torch_mismatch(info)
        if why is not None:
            raise ImportError(
                f"esamp: the compiled extension {lib} does not match the installed torch ({why}). Either install "
                f"the torch it was built against (pip install torch=={_torch_release(info['torch_version'])}"
                + (f", a CUDA {info['torch_cuda']} build" if str(info.get("cuda_kernels")).upper() == "ON" else "")
                + f") or {_REBUILD}.  (ESAMP_SKIP_TORCH_CHECK=1 tries to load it anyway.)")
    try:
        torch.ops.load_library(lib)
    except OSError as e:
        built = f"built against torch {info['torch_version']}" if info else "build information missing"
        raise ImportError(f"esamp: could not load the compiled extension {lib} ({built}; installed torch "
                          f"{torch.__version__}): {e}.  Likely cause: a torch other than the build's; {_REBUILD}.") \
            from e
    return dict(info or {}, library=lib)


_BUILD_INFO = _load()


def build_info() -> dict:
    """What the loaded extension was built with: torch_version, torch_cxx11_abi, torch_cuda, cuda_kernels,
    cuda_archs, python, compiler, and the library's path ("library")."""
    return dict(_BUILD_INFO)


_ops = torch.ops.esamp


def has_cuda_kernels(op: str = "reweight") -> bool:
    """True when this build registered a CUDA kernel for esamp::<op> (whether or not a GPU is present)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"esamp::{op}", "CUDA")


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels: repeat the C++ shape checks with torch._check so that torch.compile and
# torch.library.opcheck see the same contract.
# --------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_reweight_shapes(logits, pred_hidden, lm_head_weight, lm_head_bias, row_params):
    torch._check(logits.dim() == 2, lambda: f"logits: expected a 2-D tensor [B, V], got {tuple(logits.shape)}")
    torch._check(logits.dtype in _FLOAT_DTYPES, lambda: f"logits: expected a float dtype, got {logits.dtype}")
    B, V = logits.shape
    torch._check(
        pred_hidden.dim() == 2 and pred_hidden.shape[0] == B,
        lambda: f"pred_hidden: expected [B, H] with B = {B}, got {tuple(pred_hidden.shape)}",
    )
    H = pred_hidden.shape[1]
    torch._check(
        lm_head_weight.dim() == 2 and lm_head_weight.shape[0] == V and lm_head_weight.shape[1] == H,
        lambda: f"lm_head_weight: expected [V, H] = [{V}, {H}], got {tuple(lm_head_weight.shape)}",
    )
    if lm_head_bias is not None:
        torch._check(
            lm_head_bias.dim() == 1 and lm_head_bias.shape[0] == V,
            lambda: f"lm_head_bias: expected [V] = [{V}], got {tuple(lm_head_bias.shape)}",
        )
    for name, t, dt in row_params:
        torch._check(
            t.dim() == 1 and t.shape[0] == B,
            lambda: f"{name}: expected a 1-D tensor of length B = {B}, got {tuple(t.shape)}",
        )
        torch._check(t.dtype == dt, lambda: f"{name}: expected dtype {dt}, got {t.dtype}")
    return B, V


@torch.library.register_fake("esamp::reweight")
def _reweight_fake(logits, pred_hidden, lm_head_weight, lm_head_bias, beta, temperature, top_k, top_p, min_p,
                   seed, step):
    B, _ = _check_reweight_shapes(
        logits, pred_hidden, lm_head_weight, lm_head_bias,
        [("beta", beta, torch.float32), ("temperature", temperature, torch.float32),
         ("top_k", top_k, torch.int64), ("top_p", top_p, torch.float32), ("min_p", min_p, torch.float32),
         ("seed", seed, torch.int64), ("step", step, torch.int64)],
    )
    return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32))


@torch.library.register_fake("esamp::reweight_logits")
def _reweight_logits_fake(logits, pred_hidden, lm_head_weight, lm_head_bias, beta, temperature, top_k, top_p,
                          min_p):
    B, V = _check_reweight_shapes(
        logits, pred_hidden, lm_head_weight, lm_head_bias,
        [("beta", beta, torch.float32), ("temperature", temperature, torch.float32),
         ("top_k", top_k, torch.int64), ("top_p", top_p, torch.float32), ("min_p", min_p, torch.float32)],
    )
    return logits.new_empty((B, V), dtype=torch.float32)


@torch.library.register_fake("esamp::mix_hidden")
def _mix_hidden_fake(hidden, pred_hidden, beta):
    torch._check(hidden.dim() == 2, lambda: f"hidden: expected [B, H], got {tuple(hidden.shape)}")
    torch._check(
        pred_hidden.shape == hidden.shape,
        lambda: f"pred_hidden: expected shape {tuple(hidden.shape)}, got {tuple(pred_hidden.shape)}",
    )
    torch._check(beta.dim() == 1 and beta.shape[0] == hidden.shape[0], lambda: "beta: expected [B]")
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _params_per_slot(H, rank, layers):
    return layers * (3 * H * rank + rank) + H


@torch.library.register_fake("esamp::distiller_forward")
def _distiller_forward_fake(params, x, slot_ids, rank, layers, norm_eps, out_dtype=None):
    torch._check(x.dim() == 2, lambda: f"x: expected [N, H], got {tuple(x.shape)}")
    N, H = x.shape
    torch._check(
        params.dim() == 2 and params.shape[1] == _params_per_slot(H, rank, layers),
        lambda: f"params: expected [S, {_params_per_slot(H, rank, layers)}], got {tuple(params.shape)}",
    )
    torch._check(slot_ids.dim() == 1 and slot_ids.shape[0] == N, lambda: "slot_ids: expected [N]")
    return x.new_empty((N, H), dtype=out_dtype if out_dtype is not None else x.dtype)


@torch.library.register_fake("esamp::distiller_train_step")
def _distiller_train_step_fake(params, exp_avg, exp_avg_sq, step, losses, stats, x, target, slot_ids, rank, layers,
                               norm_eps, lr, beta1, beta2, adam_eps, clip):
    torch._check(x.dim() == 2, lambda: f"x: expected [N, H], got {tuple(x.shape)}")
    torch._check(target.shape == x.shape, lambda: "target: expected the shape of x")
    torch._check(
        params.dim() == 2 and params.shape[1] == _params_per_slot(x.shape[1], rank, layers),
        lambda: "params: wrong number of parameters per slot",
    )
    return None


@torch.library.register_fake("esamp::distiller_reset")
def _distiller_reset_fake(params, exp_avg, exp_avg_sq, step, slot_ids, hidden_size, rank, layers, seed,
                          gamma_init):
    return None


@torch.library.register_fake("esamp::capture")
def _capture_fake(hidden, residual, out):
    torch._check(hidden.dim() == 2, lambda: f"hidden: expected [N, H], got {tuple(hidden.shape)}")
    torch._check(
        out.dim() == 2 and out.shape[1] == hidden.shape[1] and out.shape[0] >= hidden.shape[0],
        lambda: f"out: expected [M >= {hidden.shape[0]}, {hidden.shape[1]}], got {tuple(out.shape)}",
    )
    return None


# --------------------------------------------------------------------------------------------
# Python wrappers (SPEC 7)
# --------------------------------------------------------------------------------------------
Scalar = Union[float, int]
RowArg = Union[Scalar, torch.Tensor, Sequence[Scalar]]

_MASK64 = (1 << 64) - 1


def derive_row_seeds(seed: int, n: int) -> torch.Tensor:
    """Distinct per-row seeds from one user seed: seed_i = splitmix64(seed + i) (mod 2^64), as int64.

    splitmix64 is a bijection of 64-bit integers, so the n seeds are distinct for any seed.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int or an int64 tensor, got {type(seed).__name__}")
    with np.errstate(over="ignore"):
        x = (np.uint64(int(seed) & _MASK64) + np.arange(n, dtype=np.uint64)).astype(np.uint64)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy(x.view(np.int64).copy())


def _row(value: RowArg, name: str, B: int, dtype: torch.dtype, device: torch.device, check=None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.device != device:
            raise ValueError(f"{name}: expected a tensor on {device}, got {value.device}")
        if value.dim() == 0:
            value = value.reshape(1).expand(B)
        if value.dim() != 1 or value.shape[0] != B:
            raise ValueError(f"{name}: expected a scalar or a 1-D tensor of length B = {B}, got shape "
                             f"{tuple(value.shape)}")
        if value.dtype != dtype:
            if dtype == torch.int64 and value.dtype.is_floating_point:
                raise TypeError(f"{name}: expected an integer tensor, got {value.dtype}")
            value = value.to(dtype)
        return value.contiguous()
    if isinstance(value, (list, tuple)):
        return _row(torch.tensor(value, dtype=dtype, device=device), name, B, dtype, device, check)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number or a tensor, got {type(value).__name__}")
    if dtype == torch.int64 and not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if check is not None:
        check(value)
    return torch.full((B,), value, dtype=dtype, device=device)


def _expect(cond_fn, name, what):
    def check(v):
        if not cond_fn(v):
            raise ValueError(f"{name}: expected {what}, got {v!r}")
    return check


_finite_nonneg = lambda v: v == v and v >= 0 and v != float("inf")  # noqa: E731


def _filter_rows(logits, beta, temperature, top_k, top_p, min_p):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-D tensor [B, V], got shape {tuple(logits.shape)}")
    B, dev = logits.shape[0], logits.device
    return (
        _row(beta, "beta", B, torch.float32, dev, _expect(_finite_nonneg, "beta", "a finite value >= 0")),
        _row(temperature, "temperature", B, torch.float32, dev,
             _expect(_finite_nonneg, "temperature", "a finite value >= 0")),
        _row(top_k, "top_k", B, torch.int64, dev),
        _row(top_p, "top_p", B, torch.float32, dev, _expect(lambda v: 0 < v <= 1, "top_p", "a value in (0, 1]")),
        _row(min_p, "min_p", B, torch.float32, dev, _expect(lambda v: 0 <= v < 1, "min_p", "a value in [0, 1)")),
    )


def reweight(logits: torch.Tensor, pred_hidden: torch.Tensor, lm_head_weight: torch.Tensor, *,
             lm_head_bias: Optional[torch.Tensor] = None, beta: RowArg = 0.25, temperature: RowArg = 1.0,
             top_k: RowArg = 0, top_p: RowArg = 1.0, min_p: RowArg = 0.0,
             seed: Union[int, torch.Tensor] = 0, step: Union[int, torch.Tensor] = 0):
    """Fused ESamp sampling step (SPEC 3): returns (tokens int64 [B], logprobs float32 [B]).

    A Python int ``seed`` is expanded to distinct per-row seeds with :func:`derive_row_seeds`; pass an
    int64 tensor [B] to control every row (e.g. the n samples of a prompt, or inside a CUDA graph).
    """
    rows = _filter_rows(logits, beta, temperature, top_k, top_p, min_p)
    B, dev = logits.shape[0], logits.device
    if isinstance(seed, torch.Tensor):
        seed_t = _row(seed, "seed", B, torch.int64, dev)
    else:
        seed_t = derive_row_seeds(seed, B).to(dev)
    step_t = _row(step, "step", B, torch.int64, dev)
    return _ops.reweight(logits, pred_hidden, lm_head_weight, lm_head_bias, *rows, seed_t, step_t)


def reweight_logits(logits: torch.Tensor, pred_hidden: torch.Tensor, lm_head_weight: torch.Tensor, *,
                    lm_head_bias: Optional[torch.Tensor] = None, beta: RowArg = 0.25, temperature: RowArg = 1.0,
                    top_k: RowArg = 0, top_p: RowArg = 1.0, min_p: RowArg = 0.0) -> torch.Tensor:
    """Mixed logits m (float32 [B, V]) on the candidate set, -inf elsewhere; sample them at T = 1."""
    rows = _filter_rows(logits, beta, temperature, top_k, top_p, min_p)
    return _ops.reweight_logits(logits, pred_hidden, lm_head_weight, lm_head_bias, *rows)


def mix_hidden(hidden: torch.Tensor, pred_hidden: torch.Tensor, beta: RowArg = 0.25) -> torch.Tensor:
    """Latent mixing (1 + beta) * hidden - beta * pred_hidden, in hidden's dtype."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError("hidden: expected a 2-D tensor [B, H]")
    b = _row(beta, "beta", hidden.shape[0], torch.float32, hidden.device,
             _expect(_finite_nonneg, "beta", "a finite value >= 0"))
    return _ops.mix_hidden(hidden, pred_hidden, b)


def capture(hidden: torch.Tensor, residual: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """out[:N] = hidden (+ residual) in out's dtype (engine capture point; torch.compile/CUDA-graph safe)."""
    _ops.capture(hidden, residual, out)


def distiller_forward(params, x, slot_ids, *, rank: int, layers: int, norm_eps: float = 1e-6, out_dtype=None):
    return _ops.distiller_forward(params, x, slot_ids, rank, layers, norm_eps, out_dtype)


def distiller_train_step(params, exp_avg, exp_avg_sq, step, losses, stats, x, target, slot_ids, *, rank: int,
                         layers: int, norm_eps: float = 1e-6, lr: float = 4e-4, beta1: float = 0.9,
                         beta2: float = 0.999, adam_eps: float = 1e-4, clip: float = 0.5) -> None:
    _ops.distiller_train_step(params, exp_avg, exp_avg_sq, step, losses, stats, x, target, slot_ids, rank, layers,
                              norm_eps, lr, beta1, beta2, adam_eps, clip)


def distiller_reset(params, exp_avg, exp_avg_sq, step, slot_ids, *, hidden_size: int, rank: int, layers: int,
                    seed: int = 0, gamma_init=None) -> None:
    _ops.distiller_reset(params, exp_avg, exp_avg_sq, step, slot_ids, hidden_size, rank, layers, seed, gamma_init)
