"""Capture points inside a vLLM model.

* Layer-0 residual stream: the decoder layer's class is swapped for a subclass whose forward calls the
  original forward and then ``torch.ops.esamp.capture(hidden, residual, buffer)`` (buffer[:N] =
  hidden + residual).  The op is a real graph node, so it is traced by torch.compile(fullgraph=True), kept by
  functionalization (it mutates only the persistent buffer) and recorded into CUDA graphs; replaying a FULL
  graph re-executes it, which a Python hook would not.  It runs before the next layer's fused add-norm
  overwrites ``residual`` in place.  The buffer is registered as a non-persistent module buffer, so dynamo
  lifts it as a graph input with a fixed address and it never enters a state dict.
* LM-head input of every scheduled token (warm start): the decoder's final norm gets the same class swap in
  "first" mode: ``torch.ops.esamp.capture(out, None, buffer)`` on its output (the first element when it returns
  ``(normed, residual)``, as vLLM's fused add-norm does).  That output is the model's hidden states, of which
  the runner hands ``hidden_states[logits_indices]`` to ``compute_logits``.
* LM-head input of the logit rows: ``model.compute_logits`` is wrapped on the instance to remember its last input
  together with a weak reference to the logits it returned; the sampler takes the record only for those very logits.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from ... import _ops  # noqa: F401  (registers torch.ops.esamp.*)

BUFFER_NAME = "esamp_capture_buffer"
CAPTURE_MODES = ("sum", "first")
_CAPTURE_CLASSES: Dict[tuple, type] = {}


def _capture_class(base: type, mode: str = "sum") -> type:
    if getattr(base, "_esamp_capture_class", False):
        if base._esamp_capture_mode != mode:
            raise ValueError(f"mode: this module already captures in mode {base._esamp_capture_mode!r}, "
                             f"got {mode!r}")
        return base
    sub = _CAPTURE_CLASSES.get((base, mode))
    if sub is not None:
        return sub
    base_forward = base.forward

    if mode == "sum":
        def forward(self, *args, **kwargs):
            out = base_forward(self, *args, **kwargs)
            if isinstance(out, tuple):
                torch.ops.esamp.capture(out[0], out[1], getattr(self, BUFFER_NAME))
            else:
                torch.ops.esamp.capture(out, None, getattr(self, BUFFER_NAME))
            return out
        name = "ESampCapture"
    else:
        def forward(self, *args, **kwargs):
            out = base_forward(self, *args, **kwargs)
            torch.ops.esamp.capture(out[0] if isinstance(out, tuple) else out, None, getattr(self, BUFFER_NAME))
            return out
        name = "ESampCaptureOut"

    sub = type(f"{name}{base.__name__}", (base,),
               {"forward": forward, "_esamp_capture_class": True, "_esamp_capture_mode": mode,
                "__module__": base.__module__, "__qualname__": f"{name}{base.__qualname__}"})
    _CAPTURE_CLASSES[(base, mode)] = sub
    return sub


def install_layer_capture(layer: nn.Module, buffer: torch.Tensor, mode: str = "sum") -> None:
    """Make ``layer`` write its output into ``buffer`` on every forward: hidden + residual ("sum", for a decoder
    layer returning (hidden, residual)) or the first element / the tensor itself ("first", for a final norm)."""
    if mode not in CAPTURE_MODES:
        raise ValueError(f"mode: expected one of {CAPTURE_MODES}, got {mode!r}")
    if buffer.dim() != 2:
        raise ValueError(f"buffer: expected a 2-D tensor [max_num_tokens, H], got shape {tuple(buffer.shape)}")
    layer.__class__ = _capture_class(type(layer), mode)
    if BUFFER_NAME in layer._buffers:
        layer._buffers[BUFFER_NAME] = buffer
    else:
        layer.register_buffer(BUFFER_NAME, buffer, persistent=False)


def remove_layer_capture(layer: nn.Module) -> None:
    cls = type(layer)
    if getattr(cls, "_esamp_capture_class", False):
        layer.__class__ = cls.__mro__[1]
    layer._buffers.pop(BUFFER_NAME, None)


def find_decoder(model: nn.Module) -> Optional[nn.Module]:
    """The module holding the decoder layers (``layers`` ModuleList next to ``start_layer``), as vLLM's
    text models lay them out (LlamaModel, Qwen2Model, MistralModel, ...).  Multimodal wrappers hold it
    deeper; the first match in module order is the language model."""
    for m in model.modules():
        if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "start_layer"):
            return m
    return None


class LMHeadInputRecorder:
    """Wraps ``model.compute_logits`` on the instance and remembers (its input, a weak reference to its
    output).  ``take(logits)`` returns the input only for the very logits tensor the sampler was handed:
    vLLM's runner computes the logits and passes that same tensor to the sampler (grammar masks are applied
    in place), while prompt-logprob and other compute_logits calls produce other tensors and are ignored."""

    def __init__(self, model: nn.Module):
        self._model = model
        self._orig: Callable = model.compute_logits
        self._last: Optional[torch.Tensor] = None
        self._last_out: Optional[weakref.ref] = None
        self.calls = 0
        orig = self._orig

        def compute_logits(hidden_states, *args, **kwargs):
            logits = orig(hidden_states, *args, **kwargs)
            if isinstance(logits, torch.Tensor):
                self._last, self._last_out = hidden_states, weakref.ref(logits)
            self.calls += 1
            return logits

        compute_logits._esamp_recorder = self  # type: ignore[attr-defined]
        model.compute_logits = compute_logits

    def take(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        last, ref = self._last, self._last_out
        if ref is None or ref() is not logits:
            return None
        self._last, self._last_out = None, None
        if last.dim() != 2 or last.shape[0] != logits.shape[0]:
            return None
        return last

    def clear(self) -> None:
        self._last, self._last_out = None, None

    def remove(self) -> None:
        if getattr(self._model.__dict__.get("compute_logits"), "_esamp_recorder", None) is self:
            del self._model.__dict__["compute_logits"]
