"""ESamp settings of one engine (``EngineConfig``) and of one request (``RequestConfig``, from the request's
``extra_args``), shared by every engine adapter.

Pure Python: no engine or torch import, so an engine plugin's entry point stays cheap in every process.  Where
the settings come from (vLLM's ``additional_config`` and environment variables, ...) is the adapter's business
(``esamp.integrations.vllm._config``); this module only checks and merges them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A bad plugin or request configuration (names the key, the expectation and the value given)."""


@dataclass
class EngineConfig:
    """Engine-wide settings (for vLLM: ``additional_config={"esamp": {...}}`` or the JSON of
    ``ESAMP_VLLM_CONFIG``, the former winning key by key)."""
    enabled: bool = True
    beta: float = 0.25              # default beta for requests that do not set one
    default_on: bool = True         # requests without extra_args["esamp"] use ESamp (random sampling rows only)
    mode: str = "per_prompt"        # "per_prompt": one distiller slot per request group; "shared": one slot
    slots: int = 0                  # 0: max_num_seqs for per_prompt, 1 for shared
    rank: int = 0                   # 0: 64 per_prompt, 384 shared (SPEC 2)
    layers: int = 2
    lr: float = 4e-4
    adam_eps: float = 1e-4
    clip: float = 0.5
    seed: int = 0
    capture_layer: int = 0          # index of the decoder layer whose output residual stream is the source x
    ring_rows: int = 0              # trainer ring buffer rows; 0: max_num_seqs (at least 64), and at least the
                                    # warm-start row cap when warm start is on
    warmup_steps: int = 30          # warm start (SPEC 2): optimizer steps on the prompt's (x, t) pairs before a
                                    # request group's first sampled token; 0 disables (and installs no capture)
    warmup_max_rows: int = 1024     # prompt positions per warm start, the last ones (bounds the trainer ring)
    log_interval_s: float = 10.0    # periodic counter log; 0 disables
    latent_mixing: bool = True      # rows with no filter (and nothing that needs the unmixed logits) mix the
                                    # LM-head input, (1+beta) t - beta t_hat, before the LM head (SPEC 3), instead
                                    # of the fused reweight computing d = W t_hat over the whole vocabulary
    fallback: bool = False          # when ESamp cannot attach to the engine: serve requests that ask for it with
                                    # the engine's own sampler (True) or reject them with an error (False)

    def resolved_slots(self, max_num_seqs: int) -> int:
        if self.mode == "shared":
            return 1
        return self.slots if self.slots > 0 else max(1, int(max_num_seqs))

    def resolved_rank(self) -> int:
        if self.rank > 0:
            return self.rank
        return 384 if self.mode == "shared" else 64

    def to_dict(self) -> dict:
        return asdict(self)


def _as_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ConfigError(f"esamp.{key}: expected a boolean, got {v!r}")


def _as_float(key: str, v: Any, *, lo: Optional[float] = None, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"esamp.{key}: expected a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f) or (lo is not None and (f <= lo if lo_open else f < lo)):
        bound = f"{'>' if lo_open else '>='} {lo}" if lo is not None else "finite"
        raise ConfigError(f"esamp.{key}: expected a finite number {bound}, got {v!r}")
    return f


def _as_int(key: str, v: Any, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = ("" if lo is None else f" >= {lo}") if hi is None else f" in [{lo}, {hi}]"
        raise ConfigError(f"esamp.{key}: expected an int{rng}, got {v!r}")
    return int(v)


def check_engine_config(cfg: EngineConfig) -> EngineConfig:
    """Checks and normalises every field (ConfigError naming the key, the expectation and the value)."""
    cfg.enabled = _as_bool("enabled", cfg.enabled)
    cfg.default_on = _as_bool("default_on", cfg.default_on)
    cfg.beta = _as_float("beta", cfg.beta, lo=0.0)
    if cfg.mode not in ("per_prompt", "shared"):
        raise ConfigError(f"esamp.mode: expected 'per_prompt' or 'shared', got {cfg.mode!r}")
    cfg.slots = _as_int("slots", cfg.slots, lo=0)
    cfg.rank = _as_int("rank", cfg.rank, lo=0)
    cfg.layers = _as_int("layers", cfg.layers, lo=1)
    cfg.lr = _as_float("lr", cfg.lr, lo=0.0, lo_open=True)
    cfg.adam_eps = _as_float("adam_eps", cfg.adam_eps, lo=0.0, lo_open=True)
    cfg.clip = _as_float("clip", cfg.clip, lo=0.0, lo_open=True)
    cfg.seed = _as_int("seed", cfg.seed, lo=0)
    cfg.capture_layer = _as_int("capture_layer", cfg.capture_layer, lo=0)
    cfg.ring_rows = _as_int("ring_rows", cfg.ring_rows, lo=0)
    cfg.warmup_steps = _as_int("warmup_steps", cfg.warmup_steps, lo=0)
    cfg.warmup_max_rows = _as_int("warmup_max_rows", cfg.warmup_max_rows, lo=1)
    cfg.log_interval_s = _as_float("log_interval_s", cfg.log_interval_s, lo=0.0)
    cfg.latent_mixing = _as_bool("latent_mixing", cfg.latent_mixing)
    cfg.fallback = _as_bool("fallback", cfg.fallback)
    return cfg


def merge_engine_settings(dst: dict, src: Any, origin: str) -> None:
    """Copies the ESamp settings of ``src`` (a mapping) into ``dst``; ``origin`` names the source in errors.
    Keys starting with "_" are annotations an adapter wrote (e.g. the capture point) and are skipped."""
    if not isinstance(src, Mapping):
        raise ConfigError(f"{origin}: expected a JSON object / dict of ESamp settings, got {src!r}")
    known = {f.name for f in fields(EngineConfig)}
    for k, v in src.items():
        if isinstance(k, str) and k.startswith("_"):
            continue
        if k not in known:
            raise ConfigError(f"{origin}: unknown key {k!r} (known: {', '.join(sorted(known))})")
        dst[k] = v


@dataclass(frozen=True)
class RequestConfig:
    enabled: bool
    beta: float
    warmup_steps: Optional[int] = None   # None: the engine's warmup_steps


def parse_request_options(params: Optional[Mapping[str, Any]], *, source: str, default_on: bool, beta: float,
                          keys: tuple = ("enabled", "beta", "warmup_steps")) -> dict:
    """The per-request parser both engines share.  ``params`` is the engine's per-request dict (vLLM's
    ``SamplingParams.extra_args``, SGLang's ``custom_params``), named ``source`` in errors.

    Accepted forms: ``{"esamp": True/False}`` (also 0/1 and "on"/"off"/"true"/"false", as the OpenAI servers'
    extra fields cannot carry booleans), ``{"esamp": {key: value}}`` with ``keys`` (a subset of enabled, beta,
    warmup_steps, seed) and the flat ``{"esamp_<key>": value}`` for every key but enabled.  A request that sets a
    beta without "enabled" opts in even when default_on is false.  Returns {"enabled", "beta", "warmup_steps",
    "seed"} (warmup_steps / seed None where the request leaves them to the engine); raises ConfigError.
    """
    out = {"enabled": default_on, "beta": beta, "warmup_steps": None, "seed": None}
    if not params or not isinstance(params, Mapping):
        return out
    checks = {"beta": lambda k, x: _as_float(k, x, lo=0.0),
              "warmup_steps": lambda k, x: _as_int(k, x, lo=0),
              "seed": lambda k, x: _as_int(k, x, lo=-(2**63), hi=2**63 - 1),
              "enabled": _as_bool}
    shape = f"a dict with {'/'.join(repr(k) for k in keys)}"
    v = params.get("esamp")
    if v is not None:
        if isinstance(v, (bool, int, str)):
            try:
                out["enabled"] = _as_bool("esamp", v)
            except ConfigError:
                raise ConfigError(f"{source}['esamp']: expected a bool (or 0/1, 'on'/'off') or {shape}, "
                                  f"got {v!r}") from None
        elif isinstance(v, Mapping):
            unknown = set(v) - set(keys)
            if unknown:
                raise ConfigError(f"{source}['esamp']: unknown key(s) {sorted(unknown)} "
                                  f"(known: {', '.join(repr(k) for k in sorted(keys))})")
            for k in ("warmup_steps", "seed", "beta"):   # "enabled" last: it wins over the opt-in a beta implies
                if k in keys and k in v:
                    out[k] = checks[k](k, v[k])
            if "beta" in v:
                out["enabled"] = True
            if "enabled" in v:
                out["enabled"] = _as_bool("enabled", v["enabled"])
        else:
            raise ConfigError(f"{source}['esamp']: expected a bool or {shape}, got {v!r}")
    for k in keys:
        flat = f"esamp_{k}"
        if k != "enabled" and flat in params:
            out[k] = checks[k](flat, params[flat])
            if k == "beta" and v is None:
                out["enabled"] = True
    out["enabled"], out["beta"] = bool(out["enabled"]), float(out["beta"])
    return out


def request_config(extra_args: Optional[Mapping[str, Any]], engine: EngineConfig) -> RequestConfig:
    """Per-request settings from ``SamplingParams.extra_args`` (forms: parse_request_options).  Raises
    ConfigError on bad values (the plugin validates this at SamplingParams construction, so the engine never sees
    them)."""
    o = parse_request_options(extra_args, source="extra_args", default_on=engine.default_on, beta=engine.beta)
    return RequestConfig(o["enabled"], o["beta"], o["warmup_steps"])


def validate_extra_args(extra_args: Optional[Mapping[str, Any]]) -> None:
    """Raises ConfigError if the ESamp keys of extra_args are malformed (engine defaults do not matter)."""
    keys = ("esamp", "esamp_beta", "esamp_warmup_steps")
    if extra_args and isinstance(extra_args, Mapping) and any(k in extra_args for k in keys):
        request_config(extra_args, EngineConfig())
