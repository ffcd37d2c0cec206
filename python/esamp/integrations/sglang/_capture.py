"""Capture points inside an SGLang model (Llama / Qwen2 layout: ``model.model.layers`` and ``model.model.norm``).

SGLang 0.5.23's decoder layers take ``layer(positions, hidden_states, forward_batch, capture_output=None)``: the
residual lives in ``forward_batch.residual_stream`` and the next layer's input boundary adds it to the previous
layer's output in one fused add-norm.  ``capture_output`` is the callback EAGLE-3 uses
(``set_eagle3_layers_to_capture([0])`` captures at layer 1): the boundary hands it exactly that updated residual,
i.e. the residual stream after layer 0.

* Source x: layer ``capture_layer + 1`` gets a subclass whose forward passes (or chains) a ``capture_output``
  callback running ``torch.ops.esamp.capture(value, None, buffer)`` (buffer[:N] = value).  The op is a real graph
  node, so it is traced by torch.compile, recorded in CUDA graphs and re-executed on every replay; the buffer is
  a non-persistent module buffer (fixed address, never in a state dict).
* Target t (the LM-head input) of every token: the decoder's final norm gets a subclass capturing its output
  (the normed tensor when it returns (normed, residual)).  For Llama/Qwen2 that output is what the logits processor
  feeds to the LM head (rows [last token of each sequence] for prefill, every row for decode).
A forward with more tokens than the buffer captures its first ``rows`` tokens only; the sampler then leaves rows
whose token lies beyond them to SGLang (counted as ``rows_no_capture``).
"""
from __future__ import annotations

import inspect
from typing import Dict, Optional

import torch
import torch.nn as nn

from ... import _ops  # noqa: F401  (registers torch.ops.esamp.*)

BUFFER_NAME = "esamp_capture_buffer"
_CLASSES: Dict[tuple, type] = {}


def _subclass(base: type, kind: str) -> type:
    if getattr(base, "_esamp_capture_kind", None) is not None:
        if base._esamp_capture_kind != kind:
            raise ValueError(f"kind: this module already captures {base._esamp_capture_kind!r}, got {kind!r}")
        return base
    sub = _CLASSES.get((base, kind))
    if sub is not None:
        return sub
    base_forward = base.forward
    if kind == "layer_input":
        def forward(self, *args, **kwargs):
            buf = getattr(self, BUFFER_NAME)
            user = kwargs.get("capture_output")

            def capture_output(value, owned=False):
                torch.ops.esamp.capture(value[: buf.shape[0]], None, buf)
                if user is not None:
                    user(value, owned=owned)

            kwargs["capture_output"] = capture_output
            return base_forward(self, *args, **kwargs)
        name = "ESampInputCapture"
    else:
        def forward(self, *args, **kwargs):
            out = base_forward(self, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
            buf = getattr(self, BUFFER_NAME)
            torch.ops.esamp.capture(h[: buf.shape[0]], None, buf)
            return out
        name = "ESampOutputCapture"
    sub = type(f"{name}{base.__name__}", (base,),
               {"forward": forward, "_esamp_capture_kind": kind, "__module__": base.__module__,
                "__qualname__": f"{name}{base.__qualname__}"})
    _CLASSES[(base, kind)] = sub
    return sub


def _install(module: nn.Module, buffer: torch.Tensor, kind: str) -> None:
    if buffer.dim() != 2:
        raise ValueError(f"buffer: expected a 2-D tensor [rows, H], got shape {tuple(buffer.shape)}")
    module.__class__ = _subclass(type(module), kind)
    if BUFFER_NAME in module._buffers:
        module._buffers[BUFFER_NAME] = buffer
    else:
        module.register_buffer(BUFFER_NAME, buffer, persistent=False)


def install_input_capture(layer: nn.Module, buffer: torch.Tensor) -> None:
    """``buffer[:N]`` = the residual stream entering ``layer`` (its input boundary's updated residual)."""
    _install(layer, buffer, "layer_input")


def install_output_capture(norm: nn.Module, buffer: torch.Tensor) -> None:
    """``buffer[:N]`` = the output of ``norm`` (the first element when it returns a tuple)."""
    _install(norm, buffer, "output")


def remove_capture(module: nn.Module) -> None:
    cls = type(module)
    if getattr(cls, "_esamp_capture_kind", None) is not None:
        module.__class__ = cls.__mro__[1]
    module._buffers.pop(BUFFER_NAME, None)


def find_decoder(model: nn.Module) -> Optional[nn.Module]:
    """The module holding the decoder layers (a ``layers`` ModuleList beside ``start_layer`` and ``norm``), as
    SGLang's text models lay them out (LlamaModel, Qwen2Model, ...); the first match in module order."""
    for m in model.modules():
        if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "start_layer"):
            return m
    return None


def layer_takes_capture(layer: nn.Module) -> bool:
    cls = type(layer)
    if getattr(cls, "_esamp_capture_kind", None) is not None:  # already ours: ask the model's class
        cls = cls.__mro__[1]
    try:
        return "capture_output" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
