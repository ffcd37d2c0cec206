"""esamp: Exploratory Sampling (ESamp) for LLM inference engines.

    import esamp
    tokens, logprobs = esamp.ops.reweight(logits, pred_hidden, lm_head_weight, beta=0.25, seed=0)
    d = esamp.Distiller(hidden_size=576, rank=64, layers=2, slots=8)
"""
from . import _ops as ops  # noqa: F401  (loads torch.ops.esamp.*)
from .distiller import Distiller  # noqa: F401
from .trainer import Trainer  # noqa: F401

__version__ = "0.1.0"
__all__ = ["ops", "Distiller", "Trainer", "__version__"]
