"""esamp.ESampConfig: every knob of the ESamp sampler in one validated, immutable object."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:  # torch loads only where a dtype is given: `esamp demo` checks its arguments without it
    import torch

__all__ = ["ESampConfig"]

_MODES = ("per_prompt", "shared")
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}

# Defaults of the distiller rank per mode (SPEC 2, the paper's choices).
DEFAULT_RANK = {"per_prompt": 64, "shared": 384}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class ESampConfig:
    """Configuration of Exploratory Sampling.

    beta           mixing strength: logits m = (1 + beta) l - beta d (0 = vanilla sampling, finite >= 0).
    mode           "per_prompt": one distiller slot per prompt, shared by that prompt's n samples, reset for every
                   new request; "shared": one slot for every request, never reset between requests.
    rank           distiller rank R (None: 64 per_prompt, 384 shared).
    layers         number of low-rank gated residual blocks L (>= 1).
    lr, adam_eps, clip   Adam learning rate, epsilon and gradient-norm clip of the per-slot update.
    slots          size of the distiller bank (None: as many as the call needs -- the number of prompts in
                   per_prompt mode, 1 in shared mode).  shared mode requires slots in (None, 1).
    source_layer   index of the decoder layer whose output residual stream is the distiller input x (0 = the first
                   layer; negative values count from the end, as in Python).
    warmup_steps   warm start: optimizer steps taken at prefill on the prompt's own (x, t) pairs, every valid prompt
                   position, before the first token is sampled (0 = no warm start, as in the paper).
    dtype          dtype in which x and t are handed to the distiller (None: the model's hidden-state dtype).  The
                   distiller's parameters and optimizer state are float32 whatever this says.
    async_trainer  run the distiller updates on the persistent trainer esamp.Trainer (SPEC 6: a worker thread on
                   CPU, a high-priority stream on CUDA) instead of synchronously after each step.  Predictions still
                   see every earlier update, so both settings give the same tokens.
    init_seed      seed of the distiller initialisation (the sampling seed is given per call).
    explore_tokens (experimental) > 0: ESamp mixes only while a row has generated fewer than this many tokens;
                   later tokens are sampled from the unmixed distribution (the distiller keeps training).
                   0 (default) = every token, as in the paper.
    gate_rel_err   (experimental) a row is mixed only when its distiller is locally informative: its relative
                   error ||t - t_hat||^2 / ||t||^2 at this step is <= gate_rel_err (rows above it, where the
                   prediction is no better than noise, are sampled unmixed).  None (default) = no gate.
    """

    beta: float = 0.25
    mode: str = "per_prompt"
    rank: Optional[int] = None
    layers: int = 2
    lr: float = 4e-4
    adam_eps: float = 1e-4
    clip: float = 0.5
    slots: Optional[int] = None
    source_layer: int = 0
    warmup_steps: int = 30
    dtype: Optional[Union[torch.dtype, str]] = None
    async_trainer: bool = False
    init_seed: int = 0
    explore_tokens: int = 0
    gate_rel_err: Optional[float] = None

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"ESampConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        if not _is_num(self.beta) or not (math.isfinite(self.beta) and self.beta >= 0):
            bad("beta", "a finite number >= 0")
        if self.mode not in _MODES:
            bad("mode", f"one of {_MODES}")
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            bad("rank", "None or an int >= 1")
        if not _is_int(self.layers) or self.layers < 1:
            bad("layers", "an int >= 1")
        if not _is_num(self.lr) or not (math.isfinite(self.lr) and self.lr >= 0):
            bad("lr", "a finite number >= 0")
        if not _is_num(self.adam_eps) or not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            bad("adam_eps", "a finite number > 0")
        if not _is_num(self.clip) or not (self.clip > 0):
            bad("clip", "a number > 0 (math.inf disables clipping)")
        if self.slots is not None and (not _is_int(self.slots) or self.slots < 1):
            bad("slots", "None or an int >= 1")
        if self.mode == "shared" and self.slots not in (None, 1):
            bad("slots", "None or 1 in shared mode (one distiller serves every request)")
        if not _is_int(self.source_layer):
            bad("source_layer", "an int (decoder layer index; negative counts from the end)")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            bad("warmup_steps", "an int >= 0")
        if self.dtype is not None:
            import torch

            named = isinstance(self.dtype, str) and self.dtype in _DTYPE_NAMES
            dt = getattr(torch, _DTYPE_NAMES[self.dtype]) if named else self.dtype
            if dt not in (torch.float32, torch.bfloat16, torch.float16):
                bad("dtype", "None, torch.float32, torch.bfloat16 or torch.float16 (or their names)")
            object.__setattr__(self, "dtype", dt)
        if not isinstance(self.async_trainer, bool):
            bad("async_trainer", "a bool")
        if not _is_int(self.init_seed):
            bad("init_seed", "an int")
        if not _is_int(self.explore_tokens) or self.explore_tokens < 0:
            bad("explore_tokens", "an int >= 0 (0 = mix every token)")
        if self.gate_rel_err is not None and (not _is_num(self.gate_rel_err) or not (self.gate_rel_err > 0)
                                              or not math.isfinite(self.gate_rel_err)):
            bad("gate_rel_err", "None or a finite number > 0")

    @property
    def effective_rank(self) -> int:
        return self.rank if self.rank is not None else DEFAULT_RANK[self.mode]

    def replace(self, **changes) -> "ESampConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        d["rank"] = self.effective_rank
        # the experimental options appear only when set, so that records (and the evaluation's cache keys) of
        # configurations without them stay as they were
        if d["explore_tokens"] == 0:
            del d["explore_tokens"]
        if d["gate_rel_err"] is None:
            del d["gate_rel_err"]
        return d
