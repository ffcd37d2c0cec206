"""Engine integrations of esamp.  Each submodule imports its engine lazily, so importing this package never
imports an engine.

* :mod:`esamp.integrations.vllm` -- a vLLM general plugin (Model Runner V2).
"""
