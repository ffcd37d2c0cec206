"""``ESampSampler``: SGLang's ``Sampler`` with ESamp rows resampled (``--sampling-backend esamp``)."""
from __future__ import annotations

import logging
from typing import Any, List, Optional

import torch
from sglang.srt.layers.sampler import Sampler
from sglang.srt.runtime_context import get_exec

from ._config import EngineConfig, resolve_engine_config

logger = logging.getLogger("sglang.esamp")


class ESampSampler(Sampler):
    """Rows without ESamp are sampled by SGLang's own code with ``base_backend`` (``pytorch`` by default);
    ESamp rows are replaced inside it (see _runtime).  Without an attached runtime (ESamp forced off, an
    unsupported configuration, a draft model runner) it is exactly SGLang's sampler with ``base_backend``."""

    def __init__(self, cfg: Optional[EngineConfig] = None):
        super().__init__()
        self.esamp_config = cfg
        self.base_backend = cfg.base_backend if cfg is not None else "pytorch"
        self.esamp_runtime = None
        self._esamp_return_logprob = False
        self.esamp_disabled_reason: Optional[str] = None if cfg is not None else "ESamp is switched off (ESAMP_SGLANG)"

    # The runtime keeps the preprocessed logits of its rows (custom logit processors, NaN sanitising) before
    # SGLang's sampler divides them by the temperature in place.
    def _preprocess_logits(self, logits: torch.Tensor, sampling_info: Any) -> torch.Tensor:
        logits = super()._preprocess_logits(logits, sampling_info)
        rt = self.esamp_runtime
        step = rt._step if rt is not None else None
        if step is not None and step.l is None and logits.shape[0] >= int(step.rows_np.max()) + 1:
            step.l = logits.index_select(0, step.rows)
        return logits

    def _sample_from_probs(self, probs, sampling_info, positions, simple_sampling_case):
        with get_exec().kernel.override(sampling_backend=self.base_backend):
            ids, capture = super()._sample_from_probs(probs, sampling_info, positions, simple_sampling_case)
        rt = self.esamp_runtime
        step = rt._step if rt is not None else None
        if step is not None:
            ids = rt.apply(step, probs, ids, sampling_info, positions, self._esamp_return_logprob)
        return ids, capture

    def forward(self, logits_output, sampling_info, return_logprob: bool, top_logprobs_nums: List[int],
                token_ids_logprobs: List[List[int]], positions: torch.Tensor, **kwargs):
        rt = self.esamp_runtime
        step = None
        if rt is not None and not sampling_info.is_all_greedy and logits_output.next_token_logits is not None:
            step = rt.begin_step(logits_output.next_token_logits, positions)
        if step is None:
            return super().forward(logits_output, sampling_info, return_logprob, top_logprobs_nums,
                                   token_ids_logprobs, positions, **kwargs)
        rt._step = step
        self._esamp_return_logprob = bool(return_logprob)
        try:
            out = super().forward(logits_output, sampling_info, return_logprob, top_logprobs_nums,
                                  token_ids_logprobs, positions, **kwargs)
        finally:
            rt._step = None
        rt.end_step(step)
        return out


def make_sampler() -> ESampSampler:
    """The factory registered with ``register_sampler_backend("esamp", ...)``.  A malformed ESAMP_SGLANG_CONFIG
    fails the engine start here, with the message naming the key."""
    return ESampSampler(resolve_engine_config())
