"""esamp: Exploratory Sampling (ESamp) for LLM inference engines.

    import esamp
    tokens, logprobs = esamp.ops.reweight(logits, pred_hidden, lm_head_weight, beta=0.25, seed=0)
    d = esamp.Distiller(hidden_size=576, rank=64, layers=2, slots=8)
    out = esamp.hf.generate(model, tokenizer, ["Write a haiku"], n=8, esamp=esamp.ESampConfig())
"""
import importlib as _importlib
import sys as _sys

__version__ = "0.1.0"
__all__ = ["ops", "Distiller", "Trainer", "ESampConfig", "ESamp", "hf", "models", "metrics", "eval", "__version__"]

# The core: `import esamp` loads torch and registers torch.ops.esamp.* (and torch.classes.esamp.Trainer).
_CORE = {"ops": ("._ops", None), "ESampConfig": (".config", "ESampConfig"), "Distiller": (".distiller", "Distiller"),
         "ESamp": (".sampler", "ESamp"), "Trainer": (".trainer", "Trainer")}
# Submodules that pull in optional dependencies (transformers, matplotlib, vLLM) load on first use.
_LAZY = {"hf", "models", "metrics", "eval", "cli", "demo", "integrations", "reference"}


def _load_core() -> None:
    """Binds the core names (loading torch and the extension).  Eager at `import esamp`, except under the `esamp`
    console script (esamp_cli), which checks its arguments first and then calls this."""
    g = globals()
    for name, (module, attr) in _CORE.items():
        if name not in g:
            mod = _importlib.import_module(module, __name__)
            g[name] = mod if attr is None else getattr(mod, attr)


def __getattr__(name):
    if name in _CORE:   # only reached while the console script defers the core
        _load_core()
        return globals()[name]
    if name in _LAZY:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'esamp' has no attribute {name!r}")


if not getattr(_sys.modules.get("esamp_cli"), "DEFER_CORE", False):
    _load_core()
