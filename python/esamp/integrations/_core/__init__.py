"""The engine-independent core behind esamp's engine adapters (vLLM V1 and V2 runners, SGLang, ...).

What every adapter needs lives here once: settings and their checks (:mod:`.config`), the distiller slot
manager (:mod:`.slots`), post-import hooks (:mod:`.hooks`), the capture points inside a decoder (:mod:`.capture`) and the runtime of one model
replica (:mod:`.runtime`: per-request options, warm start, latent mixing, reweight, training, counters).  An
adapter only translates its engine's request lifecycle and batch layout into :class:`ESampCore`'s calls.
Importing :mod:`.config`, :mod:`.slots` or :mod:`.hooks` imports neither torch nor an engine.
"""
