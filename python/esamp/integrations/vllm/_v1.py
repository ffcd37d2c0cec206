"""ESamp on vLLM's V1 model runner family (``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` and subclasses such as
the CPU runner, which overrides ``load_model`` without calling the base class's).

Attached right after the runner's ``load_model`` (every override is wrapped, see ``__init__.py``).  Per runner:

* ``_update_states`` (instance attribute): requests finished or aborted in this scheduler output leave the core
  (slot release); new requests enter it with their SamplingParams.  Preempted requests keep their cached state in
  the V1 runner, and so keep their slot and distiller.
* ``execute_model`` (instance attribute) marks the one ``compute_logits`` call that produces the logits to sample
  (prompt-logprob and dummy/profiling calls happen outside it and are left alone).
* ``model.compute_logits`` (instance attribute of the unwrapped model): the batch's rows (the persistent batch's
  first ``num_reqs`` requests, one logits row each, at ``query_start_loc[1:] - 1``) go to ``core.begin_step``,
  which may replace the LM-head input of latent-mixing rows; the logits are bound to the step.
* the sampler (``vllm.v1.sample.sampler.Sampler``; ``forward`` and ``sample`` as instance attributes): for the
  bound logits, ``sample`` copies the ESamp rows' processed logits (after penalties, bias, bad words, allowed
  tokens and the non-argmax-invariant logits processors, before temperature, min-p, top-k and top-p, which vLLM
  applies in place), lets vLLM sample the batch, then replaces the ESamp rows' tokens by ``core.sample`` (and, in
  processed-logprobs modes, their processed logits/logprobs by ESamp's mixed ones); ``forward`` ends the step
  (distiller update) after vLLM gathered the logprobs.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .._core.capture import ComputeLogitsHook
from .._core.config import EngineConfig
from .._core.runtime import WarmInfo
from ._common import (PROCESSED_MODES, STATUS_ATTR, build_core, engine_adjusts_logits, logger, mark_inactive,
                      request_options, unsupported_reason)
from ._config import ConfigError, resolve_engine_config

RUNNER = "V1 model runner"


def layout_reason(runner: Any) -> Optional[str]:
    """Why this V1 runner's layout is not the one the adapter knows (None when it is)."""
    need = ("vllm_config", "input_batch", "query_start_loc", "sampler", "_update_states", "execute_model",
            "max_num_reqs", "max_num_tokens", "device")
    missing = [a for a in need if not hasattr(runner, a)]
    if missing:
        return f"the runner {type(runner).__name__} lacks {', '.join(missing)}"
    s = runner.sampler
    if not (callable(getattr(s, "sample", None)) and callable(getattr(s, "forward", None))):
        return f"the runner's sampler {type(s).__name__} has no sample/forward"
    ib = runner.input_batch
    for a in ("req_ids", "num_reqs", "num_computed_tokens_cpu", "num_prompt_tokens"):
        if not hasattr(ib, a):
            return f"the runner's input batch ({type(ib).__name__}) lacks {a}"
    if getattr(runner, "speculative_config", None) is not None:
        return "speculative decoding is configured (the rejection sampler is not ESamp-aware)"
    if getattr(runner, "is_pooling_model", False):
        return "a pooling model"
    return None


class V1Adapter:
    def __init__(self, runner: Any, cfg: EngineConfig):
        self.runner = runner
        self.model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        self.core = build_core(cfg, runner.vllm_config, self.model, runner.device, runner.max_num_reqs,
                               runner.max_num_tokens, name=f"{RUNNER} {type(runner).__name__}")
        sampler = runner.sampler
        self.logprobs_mode = getattr(sampler, "logprobs_mode", None) or getattr(
            runner.vllm_config.model_config, "logprobs_mode", "raw_logprobs")
        self.engine_adjusts = engine_adjusts_logits(runner.vllm_config)
        self._expect = False     # inside execute_model, before its compute_logits
        self._active = None      # the step whose logits vLLM's sampler is processing
        self._install(runner, sampler)

    # ------------------------------------------------------------------ hooks
    def _install(self, runner: Any, sampler: Any) -> None:
        core = self.core
        orig_update = runner._update_states
        orig_execute = runner.execute_model
        orig_forward = sampler.forward
        orig_sample = sampler.sample

        def _update_states(scheduler_output, *args, **kwargs):
            for req_id in getattr(scheduler_output, "finished_req_ids", ()) or ():
                core.remove_request(req_id)
            out = orig_update(scheduler_output, *args, **kwargs)
            for nr in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
                core.add_request(nr.req_id, request_options(nr.sampling_params, self.logprobs_mode,
                                                            self.engine_adjusts))
            return out

        def execute_model(*args, **kwargs):
            self._expect = True
            try:
                return orig_execute(*args, **kwargs)
            finally:
                self._expect = False

        def compute_logits(orig, hidden_states, *args, **kwargs):
            if not self._expect:
                return orig(hidden_states, *args, **kwargs)
            self._expect = False
            core.step = None
            hidden = self._begin(hidden_states)
            logits = orig(hidden, *args, **kwargs)
            core.bind(logits)
            return logits

        def forward(logits, sampling_metadata, *args, **kwargs):
            step = core.step_for(logits)
            if step is None:
                if core.key_of:   # ESamp rows whose LM-head input is unknown are sampled by vLLM: count them
                    ib = runner.input_batch
                    n = int(logits.shape[0])
                    if n == int(ib.num_reqs):
                        core.counters["rows_no_lm_input"] += int((core.keys_for(ib.req_ids[:n]) >= 0).sum())
                return orig_forward(logits, sampling_metadata, *args, **kwargs)
            self._active = step
            try:
                out = orig_forward(logits, sampling_metadata, *args, **kwargs)
            finally:
                self._active = None
            core.end_step(step)
            return out

        def sample(logits, sampling_metadata, *args, **kwargs):
            step = self._active
            if step is None:
                return orig_sample(logits, sampling_metadata, *args, **kwargs)
            self._active = None
            rows = step.rows
            l = logits.index_select(0, rows)   # a copy: vLLM's temperature/top-k/top-p work in place
            sampled, processed = orig_sample(logits, sampling_metadata, *args, **kwargs)
            override = kwargs.get("logprobs_mode_override", args[0] if args else None)
            mode = override or getattr(sampler, "logprobs_mode", None) or self.logprobs_mode
            want = processed is not None and mode in PROCESSED_MODES
            tokens, mixed = core.sample(step, l, want_mixed=want)
            sampled = sampled.clone()
            sampled.index_copy_(0, rows, tokens.to(sampled.dtype))
            if want:
                processed = processed.to(torch.float32, copy=True)
                processed.index_copy_(0, rows, mixed if mode == "processed_logits" else
                                      torch.log_softmax(mixed, dim=-1))
            return sampled, processed

        runner._update_states = _update_states
        runner.execute_model = execute_model
        sampler.forward = forward
        sampler.sample = sample
        self.hook = ComputeLogitsHook(self.model, compute_logits)

    def _begin(self, hidden: torch.Tensor) -> torch.Tensor:
        core, runner = self.core, self.runner
        n = int(hidden.shape[0])
        if not core.key_of:            # no live ESamp request: nothing to do this step
            core.counters["rows_plain"] += n
            return hidden
        ib = runner.input_batch
        if n != int(ib.num_reqs):      # not one logits row per request (e.g. speculative decoding)
            core.skip_step()
            return hidden
        keys = core.keys_for(ib.req_ids[:n])
        qsl = np.asarray(runner.query_start_loc.np[:n + 1], dtype=np.int64)
        done = np.asarray(ib.num_computed_tokens_cpu[:n], dtype=np.int64)
        end = qsl[1:]
        token_index = end - 1
        positions = done + (end - qsl[:-1]) - 1

        def warm_info() -> WarmInfo:
            prompt = np.asarray(ib.num_prompt_tokens[:n], dtype=np.int64)
            prefilling = done < prompt
            return WarmInfo(start=qsl[:-1], end=end, completes=prefilling & (done + (end - qsl[:-1]) >= prompt),
                            partial=done > 0)

        return core.begin_step(keys, hidden, token_index, positions, warm_info)

    def stats(self, sync: bool = False):
        s = self.core.stats(sync)
        s["runner"] = RUNNER
        return s


def attach(runner: Any) -> None:
    """After a V1 runner's load_model: attach ESamp if it is enabled for this engine (once per runner)."""
    if runner.__dict__.get(STATUS_ATTR) is not None or not hasattr(runner, "vllm_config"):
        return
    cfg = resolve_engine_config(getattr(runner.vllm_config, "additional_config", None))
    if cfg is None:
        return
    try:
        model = runner.get_model() if hasattr(runner, "get_model") else getattr(runner, "model", None)
        reason = layout_reason(runner) or unsupported_reason(runner.vllm_config, model, cfg)
        if reason is None:
            setattr(runner, STATUS_ATTR, V1Adapter(runner, cfg))
            return
    except ConfigError:
        raise
    except Exception as e:  # never break vLLM: report, and reject ESamp requests (unless fallback)
        logger.exception("ESamp: attaching to %s failed", type(runner).__name__)
        reason = f"attaching to {type(runner).__name__} failed ({type(e).__name__}: {e})"
    mark_inactive(runner, cfg, reason, RUNNER)
