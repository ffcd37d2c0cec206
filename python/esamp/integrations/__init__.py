"""Engine integrations of esamp.  Each submodule imports its engine lazily, so importing this package never
imports an engine.

* :mod:`esamp.integrations.vllm` -- a vLLM general plugin (the V1 model runner family, CPU included, and Model
  Runner V2).
* :mod:`esamp.integrations._core` -- the engine-independent core the adapters share.
"""
