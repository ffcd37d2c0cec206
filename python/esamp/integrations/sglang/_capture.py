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

The class swap itself is the engine-independent one (esamp.integrations._core.capture, modes "layer_input" and
"first_rows"); this module names SGLang's two capture points.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from .._core.capture import (BUFFER_NAME, captured_base, find_decoder, install_layer_capture,  # noqa: F401
                             remove_layer_capture as remove_capture)


def install_input_capture(layer: nn.Module, buffer: torch.Tensor) -> None:
    """``buffer[:N]`` = the residual stream entering ``layer`` (its input boundary's updated residual)."""
    install_layer_capture(layer, buffer, mode="layer_input")


def install_output_capture(norm: nn.Module, buffer: torch.Tensor) -> None:
    """``buffer[:N]`` = the output of ``norm`` (the first element when it returns a tuple)."""
    install_layer_capture(norm, buffer, mode="first_rows")


def layer_takes_capture(layer: nn.Module) -> bool:
    """Whether the layer's own forward accepts the ``capture_output`` callback (SGLang 0.5.23 Llama / Qwen2)."""
    try:
        return "capture_output" in inspect.signature(captured_base(type(layer)).forward).parameters
    except (TypeError, ValueError):
        return False
