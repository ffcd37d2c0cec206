"""Capture points inside a decoder model (engine-independent; the layout is the one vLLM's and SGLang's text models
share: a ``layers`` ModuleList beside ``start_layer``, layers returning ``(hidden, residual)``).

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
* LM-head input of the logit rows: :class:`ComputeLogitsHook` wraps ``model.compute_logits`` on the instance (it
  runs eagerly, outside compiled graphs and CUDA graphs, in every engine this adapter knows).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from ... import _ops  # noqa: F401  (registers torch.ops.esamp.*)

BUFFER_NAME = "esamp_capture_buffer"
# "sum": buffer[:N] = hidden + residual of a layer returning (hidden, residual) (vLLM's decoder layers);
# "first": buffer[:N] = the output, or its first element when it returns a tuple (a final norm);
# "first_rows": as "first", but only the first rows of a forward longer than the buffer (SGLang's final norm);
# "layer_input": the residual stream entering the layer, from the ``capture_output`` callback the layer's input
#   boundary calls (SGLang's EAGLE-3 hook; a callback the caller passed is chained), first rows as "first_rows".
CAPTURE_MODES = ("sum", "first", "first_rows", "layer_input")
_CAPTURE_CLASSES: Dict[tuple, type] = {}


def _forward_for(base_forward: Callable, mode: str) -> Callable:
    if mode == "sum":
        def forward(self, *args, **kwargs):
            out = base_forward(self, *args, **kwargs)
            if isinstance(out, tuple):
                torch.ops.esamp.capture(out[0], out[1], getattr(self, BUFFER_NAME))
            else:
                torch.ops.esamp.capture(out, None, getattr(self, BUFFER_NAME))
            return out
    elif mode in ("first", "first_rows"):
        clip = mode == "first_rows"   # "first" leaves a too-long forward to the op's own row check

        def forward(self, *args, **kwargs):
            out = base_forward(self, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
            buf = getattr(self, BUFFER_NAME)
            torch.ops.esamp.capture(h[: buf.shape[0]] if clip else h, None, buf)
            return out
    else:  # layer_input
        def forward(self, *args, **kwargs):
            buf = getattr(self, BUFFER_NAME)
            user = kwargs.get("capture_output")

            def capture_output(value, owned=False):
                torch.ops.esamp.capture(value[: buf.shape[0]], None, buf)
                if user is not None:
                    user(value, owned=owned)

            kwargs["capture_output"] = capture_output
            return base_forward(self, *args, **kwargs)
    return forward


_CLASS_PREFIX = {"sum": "ESampCapture", "first": "ESampCaptureOut", "first_rows": "ESampOutputCapture",
                 "layer_input": "ESampInputCapture"}


def _capture_class(base: type, mode: str = "sum") -> type:
    if getattr(base, "_esamp_capture_class", False):
        if base._esamp_capture_mode != mode:
            raise ValueError(f"mode: this module already captures in mode {base._esamp_capture_mode!r}, "
                             f"got {mode!r}")
        return base
    sub = _CAPTURE_CLASSES.get((base, mode))
    if sub is not None:
        return sub
    name = _CLASS_PREFIX[mode]
    sub = type(f"{name}{base.__name__}", (base,),
               {"forward": _forward_for(base.forward, mode), "_esamp_capture_class": True,
                "_esamp_capture_mode": mode, "__module__": base.__module__,
                "__qualname__": f"{name}{base.__qualname__}"})
    _CAPTURE_CLASSES[(base, mode)] = sub
    return sub


def captured_base(cls: type) -> type:
    """The model's own class of a module (the class below ours when a capture is installed)."""
    return cls.__mro__[1] if getattr(cls, "_esamp_capture_class", False) else cls


def install_layer_capture(layer: nn.Module, buffer: torch.Tensor, mode: str = "sum") -> None:
    """Make ``layer`` write into ``buffer`` on every forward, as ``mode`` says (CAPTURE_MODES): hidden +
    residual ("sum", for a decoder layer returning (hidden, residual)), the first element / the tensor itself
    ("first", for a final norm; "first_rows" clips to the buffer's rows), or the residual entering the layer
    ("layer_input")."""
    if mode not in CAPTURE_MODES:
        raise ValueError(f"mode: expected one of {CAPTURE_MODES}, got {mode!r}")
    if buffer.dim() != 2:
        raise ValueError(f"buffer: expected a 2-D tensor [rows, H], got shape {tuple(buffer.shape)}")
    layer.__class__ = _capture_class(type(layer), mode)
    if BUFFER_NAME in layer._buffers:
        layer._buffers[BUFFER_NAME] = buffer
    else:
        layer.register_buffer(BUFFER_NAME, buffer, persistent=False)


def remove_layer_capture(layer: nn.Module) -> None:
    layer.__class__ = captured_base(type(layer))
    layer._buffers.pop(BUFFER_NAME, None)


def find_decoder(model: nn.Module) -> Optional[nn.Module]:
    """The module holding the decoder layers (``layers`` ModuleList next to ``start_layer``), as vLLM's and
    SGLang's text models lay them out (LlamaModel, Qwen2Model, MistralModel, ...).  Multimodal wrappers hold it
    deeper; the first match in module order is the language model."""
    for m in model.modules():
        if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "start_layer"):
            return m
    return None


def final_norm_unsupported_reason(decoder: nn.Module) -> Optional[str]:
    """Why the LM-head input of every token cannot be captured at ``decoder.norm`` (None when it can)."""
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, nn.Module):
        return "the decoder has no final 'norm' module"
    if type(norm).__name__ == "PPMissingLayer" or type(norm).forward is nn.Module.forward:
        return f"the decoder's final norm ({type(norm).__name__}) has no forward of its own"
    return None


class ComputeLogitsHook:
    """Wraps ``model.compute_logits`` on the instance: ``hook(orig, hidden_states, *args, **kwargs)`` is called
    instead of it and must return the logits (calling ``orig`` itself).  ``remove()`` restores the original."""

    def __init__(self, model: nn.Module, hook: Callable[..., torch.Tensor]):
        self._model = model
        orig = model.compute_logits
        self.calls = 0

        def compute_logits(hidden_states, *args, **kwargs):
            self.calls += 1
            return hook(orig, hidden_states, *args, **kwargs)

        compute_logits._esamp_hook = self  # type: ignore[attr-defined]
        model.compute_logits = compute_logits

    def remove(self) -> None:
        if getattr(self._model.__dict__.get("compute_logits"), "_esamp_hook", None) is self:
            del self._model.__dict__["compute_logits"]
