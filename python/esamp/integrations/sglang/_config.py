"""Configuration of the SGLang backend (engine-wide, from the environment) and of one request
(``SamplingParams.custom_params``).

Pure Python: no SGLang or torch import, so the plugin's entry point stays cheap in every process.
ConfigError and the value checks are the adapters' common ones (esamp.integrations._core.config); the key
names and validation rules are those of the vLLM adapter where the engines allow it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

from .._core.config import (_FALSE, _TRUE, ConfigError, _as_bool, _as_float, _as_int,  # noqa: F401
                            parse_request_options)

BACKEND = "esamp"                      # --sampling-backend esamp
ENV_ENABLE = "ESAMP_SGLANG"            # "0"/"false"/"off" forces ESamp off even with --sampling-backend esamp
ENV_CONFIG = "ESAMP_SGLANG_CONFIG"     # JSON object with the keys of EngineConfig
BASE_BACKENDS = ("pytorch", "flashinfer")

# custom_params keys (nested form {"esamp": {...}} and flat forms)
REQUEST_KEYS = ("enabled", "beta", "warmup_steps", "seed")
FLAT_KEYS = ("esamp_beta", "esamp_warmup_steps", "esamp_seed")
GROUP_KEY = "esamp_group"      # requests with the same value share one distiller slot (set for n > 1 automatically)
INDEX_KEY = "esamp_index"      # sample index inside the group (seed offset), set for n > 1 automatically


@dataclass
class EngineConfig:
    """Engine-wide settings (JSON in ``ESAMP_SGLANG_CONFIG``)."""
    enabled: bool = True
    beta: float = 0.25              # default beta for requests that do not set one
    default_on: bool = True         # requests without custom_params["esamp"] use ESamp (random sampling rows only)
    mode: str = "per_prompt"        # "per_prompt": one slot per request group; "shared": one slot for all
    slots: int = 0                  # 0: max_running_requests (per_prompt), 1 (shared)
    rank: int = 0                   # 0: 64 per_prompt, 384 shared (SPEC 2)
    layers: int = 2
    lr: float = 4e-4
    adam_eps: float = 1e-4
    clip: float = 0.5
    seed: int = 0                   # distiller initialisation seed
    capture_layer: int = 0          # decoder layer whose output residual stream is the source x
    capture_rows: int = 0           # rows of the capture buffers; 0: the largest forward SGLang schedules
    ring_rows: int = 0              # trainer ring rows; 0: max(64, slots, warm-start row cap)
    warmup_steps: int = 30          # warm start (SPEC 2) on the prompt's (x, t) pairs; 0 disables
    warmup_max_rows: int = 1024     # prompt positions per warm start (the last ones)
    base_backend: str = "pytorch"   # SGLang backend that samples the rows without ESamp
    log_interval_s: float = 10.0    # periodic counter log; 0 disables

    def resolved_slots(self, max_running_requests: int) -> int:
        if self.mode == "shared":
            return 1
        return self.slots if self.slots > 0 else max(1, int(max_running_requests))

    def resolved_rank(self) -> int:
        if self.rank > 0:
            return self.rank
        return 384 if self.mode == "shared" else 64

    def to_dict(self) -> dict:
        return asdict(self)


def _check_engine(cfg: EngineConfig) -> EngineConfig:
    cfg.enabled = _as_bool("enabled", cfg.enabled)
    cfg.default_on = _as_bool("default_on", cfg.default_on)
    cfg.beta = _as_float("beta", cfg.beta, lo=0.0)
    if cfg.mode not in ("per_prompt", "shared"):
        raise ConfigError(f"esamp.mode: expected 'per_prompt' or 'shared', got {cfg.mode!r}")
    for k in ("slots", "rank", "seed", "capture_layer", "capture_rows", "ring_rows", "warmup_steps"):
        setattr(cfg, k, _as_int(k, getattr(cfg, k), lo=0))
    cfg.layers = _as_int("layers", cfg.layers, lo=1)
    cfg.warmup_max_rows = _as_int("warmup_max_rows", cfg.warmup_max_rows, lo=1)
    for k in ("lr", "adam_eps", "clip"):
        setattr(cfg, k, _as_float(k, getattr(cfg, k), lo=0.0, lo_open=True))
    cfg.log_interval_s = _as_float("log_interval_s", cfg.log_interval_s, lo=0.0)
    if cfg.base_backend not in BASE_BACKENDS:
        raise ConfigError(f"esamp.base_backend: expected one of {BASE_BACKENDS}, got {cfg.base_backend!r}")
    return cfg


def resolve_engine_config(environ: Optional[Mapping[str, str]] = None) -> Optional[EngineConfig]:
    """The engine config for an engine started with ``--sampling-backend esamp``, or None when forced off
    (``ESAMP_SGLANG=0`` or ``"enabled": false``)."""
    env = os.environ if environ is None else environ
    flag = env.get(ENV_ENABLE)
    if flag is not None and flag.strip().lower() not in _TRUE | _FALSE:
        raise ConfigError(f"{ENV_ENABLE}: expected one of 1/0/true/false/on/off, got {flag!r}")
    if flag is not None and flag.strip().lower() in _FALSE:
        return None
    merged: dict = {}
    raw = env.get(ENV_CONFIG)
    if raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{ENV_CONFIG}: expected a JSON object, got {raw!r} ({e})") from None
        if not isinstance(parsed, Mapping):
            raise ConfigError(f"{ENV_CONFIG}: expected a JSON object of ESamp settings, got {parsed!r}")
        known = {f.name for f in fields(EngineConfig)}
        for k, v in parsed.items():
            if k not in known:
                raise ConfigError(f"{ENV_CONFIG}: unknown key {k!r} (known: {', '.join(sorted(known))})")
            merged[k] = v
    cfg = _check_engine(EngineConfig(**merged))
    return cfg if cfg.enabled else None


@dataclass(frozen=True)
class RequestConfig:
    enabled: bool
    beta: float
    warmup_steps: Optional[int] = None   # None: the engine's warmup_steps
    seed: Optional[int] = None           # None: SamplingParams.sampling_seed, else derived from the request id
    group: Optional[str] = None          # None: the request is its own group
    index: int = 0                       # sample index in its group (added to the seed)


def request_config(custom_params: Optional[Mapping[str, Any]], engine: EngineConfig) -> RequestConfig:
    """Per-request settings from ``SamplingParams.custom_params``: the forms of the vLLM adapter
    (_core.config.parse_request_options) with one more key, ``seed`` (``{"esamp": {"enabled": bool, "beta":
    float, "warmup_steps": int, "seed": int}}`` or flat ``esamp_beta`` / ``esamp_warmup_steps`` / ``esamp_seed``).
    ``esamp_group`` / ``esamp_index`` group requests on one slot (the plugin sets them for the n samples of an
    ``n > 1`` request).  Raises ConfigError on bad values.
    """
    o = parse_request_options(custom_params, source="custom_params", default_on=engine.default_on,
                              beta=engine.beta, keys=REQUEST_KEYS)
    group, index = None, 0
    if custom_params and isinstance(custom_params, Mapping):
        if GROUP_KEY in custom_params:
            g = custom_params[GROUP_KEY]
            if not isinstance(g, str) or not g:
                raise ConfigError(f"custom_params[{GROUP_KEY!r}]: expected a non-empty string, got {g!r}")
            group = g
        if INDEX_KEY in custom_params:
            index = _as_int(INDEX_KEY, custom_params[INDEX_KEY], lo=0)
    return RequestConfig(o["enabled"], o["beta"], o["warmup_steps"], o["seed"], group, index)


def validate_custom_params(custom_params: Optional[Mapping[str, Any]]) -> None:
    """Raises ConfigError if the ESamp keys of custom_params are malformed (engine defaults do not matter)."""
    keys = ("esamp",) + FLAT_KEYS + (GROUP_KEY, INDEX_KEY)
    if custom_params and isinstance(custom_params, Mapping) and any(k in custom_params for k in keys):
        request_config(custom_params, EngineConfig())
