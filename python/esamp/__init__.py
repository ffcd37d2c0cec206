"""esamp: Exploratory Sampling (ESamp) for LLM inference engines.

    import esamp
    tokens, logprobs = esamp.ops.reweight(logits, pred_hidden, lm_head_weight, beta=0.25, seed=0)
    d = esamp.Distiller(hidden_size=576, rank=64, layers=2, slots=8)
    out = esamp.hf.generate(model, tokenizer, ["Write a haiku"], n=8, esamp=esamp.ESampConfig())
"""
import importlib as _importlib

from . import _ops as ops  # noqa: F401  (loads torch.ops.esamp.*)
from .config import ESampConfig  # noqa: F401
from .distiller import Distiller  # noqa: F401
from .sampler import ESamp  # noqa: F401
from .trainer import Trainer  # noqa: F401

__version__ = "0.1.0"
__all__ = ["ops", "Distiller", "Trainer", "ESampConfig", "ESamp", "hf", "models", "metrics", "eval", "__version__"]

# Submodules that pull in optional dependencies (transformers, matplotlib, vLLM) load on first use.
_LAZY = {"hf", "models", "metrics", "eval", "cli", "demo", "integrations", "reference"}


def __getattr__(name):
    if name in _LAZY:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'esamp' has no attribute {name!r}")
