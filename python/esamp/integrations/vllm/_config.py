"""Where the vLLM plugin's settings come from: ``additional_config={"esamp": {...}}`` and the environment.

The settings themselves (``EngineConfig``, ``RequestConfig`` and their checks) are engine-independent and live in
:mod:`esamp.integrations._core.config`; they are re-exported here.  Pure Python: no vLLM or torch import.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from .._core.config import (_FALSE, _TRUE, ConfigError, EngineConfig, RequestConfig,  # noqa: F401
                            check_engine_config, merge_engine_settings, request_config, validate_extra_args)

ENV_ENABLE = "ESAMP_VLLM"          # "1"/"true"/"on" enables with defaults, "0"/"false"/"off" forces off
ENV_CONFIG = "ESAMP_VLLM_CONFIG"   # JSON object with the keys of EngineConfig (implies enabled unless it says otherwise)
ADDITIONAL_CONFIG_KEY = "esamp"    # vllm additional_config={"esamp": {...}}


def resolve_engine_config(additional_config: Any = None, environ: Optional[Mapping[str, str]] = None
                          ) -> Optional[EngineConfig]:
    """The engine config, or None when ESamp is off.

    On when ESAMP_VLLM is true, or ESAMP_VLLM_CONFIG is set, or additional_config has an "esamp" entry --
    unless ESAMP_VLLM is explicitly false or the merged config says enabled=false.
    """
    env = os.environ if environ is None else environ
    flag = env.get(ENV_ENABLE)
    if flag is not None and flag.strip().lower() not in _TRUE | _FALSE:
        raise ConfigError(f"{ENV_ENABLE}: expected one of 1/0/true/false/on/off, got {flag!r}")
    forced_off = flag is not None and flag.strip().lower() in _FALSE
    merged: dict = {}
    on = flag is not None and flag.strip().lower() in _TRUE
    raw = env.get(ENV_CONFIG)
    if raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{ENV_CONFIG}: expected a JSON object, got {raw!r} ({e})") from None
        merge_engine_settings(merged, parsed, ENV_CONFIG)
        on = True
    section = None
    if isinstance(additional_config, Mapping):
        section = additional_config.get(ADDITIONAL_CONFIG_KEY)
    if section is not None:
        if isinstance(section, bool):
            section = {"enabled": section}
        merge_engine_settings(merged, section, f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]")
        on = True
    if not on or forced_off:
        return None
    cfg = check_engine_config(EngineConfig(**merged))
    return cfg if cfg.enabled else None
