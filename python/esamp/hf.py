"""Hugging Face integration: esamp.hf.generate (own decoding loop) and ESampLogitsProcessor (for model.generate).

How the pieces of a model are found (any ``*ForCausalLM`` that follows the usual transformers layout):
- base model: ``model.base_model`` (``model.model`` for Llama/Qwen2/Mistral, ``model.transformer`` for GPT-2);
  its ``last_hidden_state`` output is the LM-head input (after the final norm) at every position.
- decoder layers: the first of ``layers``, ``h``, ``decoder.layers``, ``blocks``, ``block`` on the base model that is
  an ``nn.ModuleList``; failing that, the ``nn.ModuleList`` of ``config.num_hidden_layers`` modules.
- LM head: ``model.get_output_embeddings()`` (weight [V, H], optional bias [V]).
- final norm (only to initialise the distiller's output scale): ``norm``, ``final_layernorm``, ``ln_f``,
  ``final_layer_norm`` or ``norm_f`` on the base model, when its weight has shape [H].

Hooks (registered for the duration of a call, removed afterwards):
- a forward hook on decoder layer ``source_layer`` captures the residual stream x (its output hidden states);
- a forward hook on the base model captures the LM-head input t at every position (warm start at prefill);
- a forward pre-hook on the LM head takes t at the last position, asks the distiller for t_hat and, when no filter
  is active, replaces the LM-head input by (1 + beta) t - beta t_hat (latent mixing: no extra LM-head work).
"""
from __future__ import annotations

import inspect
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from . import _ops as ops
from .config import ESampConfig
from .sampler import ESamp, filters_active, row_seeds, sample_tokens

__all__ = ["generate", "GenerationOutput", "ESampLogitsProcessor", "find_decoder_layers", "find_lm_head",
           "find_final_norm", "make_sampler"]

_DEFAULT = object()


# ----------------------------------------------------------------------------------------------------------
# Locating the parts of a model
# ----------------------------------------------------------------------------------------------------------
def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _getpath(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (see the module docstring for the search order)."""
    base = _base_model(model)
    for path in ("layers", "h", "decoder.layers", "blocks", "block", "model.layers", "transformer.h"):
        mod = _getpath(base, path)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return mod
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if n:
        for mod in base.modules():
            if isinstance(mod, nn.ModuleList) and len(mod) == n:
                return mod
    raise ValueError(f"model: could not find the decoder layer list of {type(model).__name__} (looked for "
                     "base_model.layers / .h / .decoder.layers / .blocks / .block and a ModuleList of "
                     "config.num_hidden_layers modules)")


def find_lm_head(model: nn.Module) -> nn.Module:
    """The LM head (``model.get_output_embeddings()``), a module with weight [V, H] and optional bias [V]."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    w = getattr(head, "weight", None)
    if not isinstance(head, nn.Module) or not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"model: could not find an LM head with a 2-D weight on {type(model).__name__} "
                         "(get_output_embeddings() / lm_head)")
    return head


def find_final_norm(model: nn.Module) -> Optional[torch.Tensor]:
    """The final norm's weight [H] if the base model has one under a usual name, else None."""
    base = _base_model(model)
    H = find_lm_head(model).weight.shape[1]
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f"):
        mod = getattr(base, name, None)
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) == (H,):
            return w
    return None


def make_sampler(model: nn.Module, config: Optional[ESampConfig] = None, *, slots: Optional[int] = None,
                 ring_rows: int = 1024) -> ESamp:
    """An esamp.ESamp sized for `model` (hidden size and device of its LM head; distiller output scale initialised
    with the model's final-norm weight when one is found)."""
    head = find_lm_head(model)
    return ESamp(config, hidden_size=int(head.weight.shape[1]), device=head.weight.device, slots=slots,
                 gamma_init=find_final_norm(model), ring_rows=ring_rows)


def _layer_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    h = getattr(out, "last_hidden_state", None)
    if h is None and hasattr(out, "hidden_states"):
        h = out.hidden_states
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"esamp.hf: cannot read hidden states from a module output of type {type(out).__name__}")
    return h


def _forward_kwargs(model: nn.Module) -> Dict[str, bool]:
    params = inspect.signature(model.forward).parameters
    return {
        "cache": "cache" in params,
        "position_ids": "position_ids" in params,
        "logits_to_keep": "logits_to_keep" in params,
    }


def _eos_ids(model, tokenizer) -> List[int]:
    ids: List[int] = []
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
              getattr(getattr(model, "config", None), "eos_token_id", None),
              getattr(tokenizer, "eos_token_id", None)):
        if v is None:
            continue
        for i in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)
    return ids


def _pad_id(model, tokenizer, eos: List[int]) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None),
              getattr(getattr(model, "generation_config", None), "pad_token_id", None)):
        if isinstance(v, int) and v >= 0:
            return v
    return eos[0] if eos else 0


def _encode(tokenizer, prompts: Sequence[Union[str, Sequence[int]]], chat: bool) -> List[List[int]]:
    out: List[List[int]] = []
    template = chat and getattr(tokenizer, "chat_template", None) is not None
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if template:
                text = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=False)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(p)["input_ids"]
        elif isinstance(p, torch.Tensor):
            ids = p.reshape(-1).tolist()
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
        else:
            raise TypeError(f"prompts[{i}]: expected a str or a list of token ids, got {type(p).__name__}")
        if len(ids) == 0:
            raise ValueError(f"prompts[{i}]: the prompt is empty after tokenisation")
        out.append([int(t) for t in ids])
    return out


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------
@dataclass
class GenerationOutput:
    """texts[p][j]: sample j of prompt p (decoded, special tokens skipped).  token_ids[p][j] / logprobs[p][j]: the
    generated ids (the stop token included when one was sampled) and the log-probability of each under the
    distribution actually sampled from (0 for greedy rows).  stats: timings, counts and trainer counters."""

    texts: List[List[str]]
    token_ids: List[List[List[int]]]
    logprobs: List[List[List[float]]]
    stats: Dict[str, Any] = field(default_factory=dict)
    prompt_token_ids: List[List[int]] = field(default_factory=list)
    base_logprobs: Optional[List[List[List[float]]]] = None


# ----------------------------------------------------------------------------------------------------------
# Hook state shared by generate() and ESampLogitsProcessor
# ----------------------------------------------------------------------------------------------------------
class _Taps:
    """Forward hooks capturing x (source layer output) and t (base-model output); optional LM-head pre-hook."""

    def __init__(self, model: nn.Module, source_layer: int, on_lm_head=None, capture_mask: bool = False):
        layers = find_decoder_layers(model)
        if not -len(layers) <= source_layer < len(layers):
            raise ValueError(f"source_layer: expected an index into the {len(layers)} decoder layers of "
                             f"{type(model).__name__}, got {source_layer}")
        self.x_seq: Optional[torch.Tensor] = None
        self.t_seq: Optional[torch.Tensor] = None
        self.attention_mask: Optional[torch.Tensor] = None
        base = _base_model(model)
        self._handles = [
            layers[source_layer].register_forward_hook(self._on_layer),
            base.register_forward_hook(self._on_base),
        ]
        if capture_mask:
            self._handles.append(base.register_forward_pre_hook(self._on_base_pre, with_kwargs=True))
        if on_lm_head is not None:
            self._handles.append(find_lm_head(model).register_forward_pre_hook(on_lm_head))

    def _on_layer(self, module, args, out):
        self.x_seq = _layer_output(out)

    def _on_base(self, module, args, out):
        self.t_seq = _layer_output(out)

    def _on_base_pre(self, module, args, kwargs):
        self.attention_mask = kwargs.get("attention_mask")

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


# ----------------------------------------------------------------------------------------------------------
# generate()
# ----------------------------------------------------------------------------------------------------------
class _Runner:
    """Per-call state of generate(): the LM-head pre-hook does predict / warm start / latent mixing."""

    def __init__(self, es: ESamp, taps_source_layer: int, model, latent: bool, temperature: float):
        self.es = es
        self.latent = latent
        self.temperature = temperature
        self.model = model
        self.taps = _Taps(model, taps_source_layer, on_lm_head=self._on_lm_head)
        self.slots: Optional[torch.Tensor] = None      # slot id of every row of the current forward
        self.warm: Optional[Dict[str, torch.Tensor]] = None   # prefill only: valid-position mask and slots
        self.x = self.t = self.t_hat = None
        self.betas: Optional[torch.Tensor] = None
        self.position = 0          # tokens generated so far by every row of the current forward
        self.warmup_s = 0.0

    def _on_lm_head(self, module, args):
        hidden = args[0]
        x_seq = self.taps.x_seq
        if x_seq is None or x_seq.shape[:2] != self.taps.t_seq.shape[:2]:
            raise RuntimeError("esamp.hf: the source-layer hook did not fire in this forward pass")
        if self.warm is not None:
            t0 = time.perf_counter()
            mask = self.warm["mask"]
            self.es.warm_start(x_seq[mask], self.taps.t_seq[mask], self.warm["slots"])
            self.warmup_s += time.perf_counter() - t0
            self.warm = None
        x = x_seq[:, -1].clone()
        t = hidden[:, -1]
        t_hat = self.es.predict(x, self.slots)
        self.x, self.t, self.t_hat = x, t.clone(), t_hat
        c = self.es.config
        self.betas = None
        if c.explore_tokens > 0 or c.gate_rel_err is not None:
            self.betas = self.es.row_betas(self.temperature, t.shape[0], t.device, t=t, t_hat=t_hat,
                                           position=self.position)
        if not self.latent:
            return None
        mixed = self.es.mix(t, t_hat, self.temperature, beta=self.betas)
        if hidden.shape[1] == 1:
            return (mixed.unsqueeze(1),)
        new = hidden.clone()
        new[:, -1] = mixed
        return (new,)

    def remove(self):
        self.taps.remove()


def _growing_cache(model, capacity: int):
    """A transformers DynamicCache whose full-attention layers write into key/value buffers pre-allocated for
    `capacity` positions (returned as views), instead of concatenating a new tensor at every step: the default
    DynamicLayer copies the whole cache twice per layer and step (at 256 rows x 400 positions of a 0.5B model,
    ~65 ms per tensor on one CPU core, more than the attention itself).  Same values, same results."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class _GrowingLayer(DynamicLayer):
        def __init__(self, cap: int):
            super().__init__()
            self._cap = int(cap)
            self._kb = self._vb = None
            self._n = 0

        def _views(self):
            self.keys = self._kb[:, :, :self._n]
            self.values = self._vb[:, :, :self._n]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            q = key_states.shape[-2]
            if self._kb is None or self._n + q > self._kb.shape[-2] or self._kb.shape[0] != key_states.shape[0]:
                old = self._kb.shape[-2] if self._kb is not None else 0
                cap = max(self._n + q, self._cap, 2 * old)
                B, H, _, D = key_states.shape
                kb, vb = key_states.new_empty(B, H, cap, D), value_states.new_empty(B, H, cap, D)
                if self._n:
                    kb[:, :, :self._n] = self.keys
                    vb[:, :, :self._n] = self.values
                self._kb, self._vb = kb, vb
            self._kb[:, :, self._n:self._n + q] = key_states
            self._vb[:, :, self._n:self._n + q] = value_states
            self._n += q
            self._views()
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self._n:
                self._kb = self._kb.repeat_interleave(repeats, dim=0)
                self._vb = self._vb.repeat_interleave(repeats, dim=0)
                self._views()

        def batch_select_indices(self, indices) -> None:
            if self._n:
                self._kb, self._vb = self._kb[indices], self._vb[indices]
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)
            if self._kb is not None and self.is_initialized:
                self._n = self.keys.shape[-2]

        def reset(self) -> None:
            self._kb = self._vb = None
            self._n = 0
            super().reset()

    cache = DynamicCache(config=model.config)
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer:
                layers[i] = _GrowingLayer(capacity)
    return cache


def _head_logits(h: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Unmixed LM-head logits of rows h [B, H] (for base-model log-probabilities on the latent-mixing path)."""
    out = h.to(W.dtype) @ W.t()
    return out if bias is None else out + bias


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


class _StopStrings:
    """Per-row detection of stop strings in the generated text: the text of each token id (cached) is appended
    to a short per-row tail, which is searched for the stop strings.  A stop string spanning tokens is found;
    decoding token by token can differ from decoding the whole sequence only inside multi-byte characters."""

    def __init__(self, tokenizer, stop: Sequence[str], rows: int):
        self.tok = tokenizer
        self.stop = list(stop)
        self.keep = max(len(s) for s in self.stop) - 1
        self.tails = [""] * rows
        self.text: Dict[int, str] = {}

    def update(self, rows: torch.Tensor, tokens: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        hit = []
        for r, t, f in zip(rows.tolist(), tokens.tolist(), finished.tolist()):
            if f:
                hit.append(False)
                continue
            piece = self.text.get(t)
            if piece is None:
                piece = self.text[t] = self.tok.decode([t], skip_special_tokens=True)
            tail = self.tails[r] + piece
            hit.append(any(s in tail for s in self.stop))
            self.tails[r] = tail[-self.keep:] if self.keep > 0 else ""
        return torch.tensor(hit, dtype=torch.bool, device=tokens.device)


def _validate_sampling(n, max_new_tokens, temperature, top_k, top_p, min_p, seed):
    def bad(name, exp, v):
        raise ValueError(f"{name}: expected {exp}, got {v!r}")

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        bad("n", "an int >= 1", n)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        bad("max_new_tokens", "an int >= 1", max_new_tokens)
    if not isinstance(temperature, (int, float)) or not (0 <= temperature < float("inf")):
        bad("temperature", "a finite number >= 0", temperature)
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        bad("top_k", "an int (<= 0 means off)", top_k)
    if not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
        bad("top_p", "a number in (0, 1]", top_p)
    if not isinstance(min_p, (int, float)) or not (0 <= min_p < 1):
        bad("min_p", "a number in [0, 1)", min_p)
    if not isinstance(seed, int) or isinstance(seed, bool):
        bad("seed", "an int", seed)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Union[str, Sequence[Union[str, Sequence[int]]]], *, n: int = 1,
             max_new_tokens: int = 128, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, seed: int = 0, esamp: Union[ESampConfig, ESamp, None] = _DEFAULT,
             chat: bool = True, progress: bool = True, ignore_eos: bool = False,
             desc: Optional[str] = None, stop: Optional[Sequence[str]] = None, base_logprobs: bool = False,
             compact: bool = True) -> GenerationOutput:
    """Sample `n` continuations of every prompt with ESamp (or vanilla sampling when ``esamp=None``).

    prompts: a str, a list of str (chat-formatted with the tokenizer's chat template when ``chat`` and the tokenizer
    has one) or a list of token-id lists (used as given).  All prompts x n rows decode in one batch with a KV cache;
    prompts are left-padded and prefilled once each (the cache is then repeated n times).  Row p * n + j samples
    with seed ``esamp.ops.derive_row_seeds(seed, P * n)[p * n + j]`` and step = index of the generated token, so
    ``esamp=None`` and ``esamp=ESampConfig(beta=0)`` give the same tokens.  Rows stop at an end-of-sequence token
    (``model.generation_config.eos_token_id`` / ``tokenizer.eos_token_id``; ``ignore_eos=True`` disables this) or
    after `max_new_tokens`.  ``esamp`` may also be an :class:`esamp.ESamp` to reuse (its per-prompt slots are
    re-initialised for every prompt; a shared-mode distiller keeps learning across calls).

    ``stop``: strings that end a row once its generated text contains one (the text is cut before it; the token
    that completed it is the row's last).  ``base_logprobs=True`` also returns, per generated token, its
    log-probability under the base model at T = 1 with no filter (``out.base_logprobs``; on the latent-mixing path
    this costs one extra LM-head product per step).  ``compact`` drops finished rows from the batch and the KV
    cache once they make up 1/8 of it (no token changes; False keeps every row to the end).
    """
    if esamp is _DEFAULT:
        esamp = ESampConfig()
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"prompts: expected a non-empty list of prompts, got {prompts!r}")
    _validate_sampling(n, max_new_tokens, temperature, top_k, top_p, min_p, seed)
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not all(isinstance(x, str) and x for x in stop):
            raise ValueError(f"stop: expected a list of non-empty strings, got {stop!r}")
        stop = list(stop)
    if esamp is not None and not isinstance(esamp, (ESampConfig, ESamp)):
        raise TypeError(f"esamp: expected an esamp.ESampConfig, an esamp.ESamp or None, got {type(esamp).__name__}")

    t_start = time.perf_counter()
    head = find_lm_head(model)
    W = head.weight
    bias = getattr(head, "bias", None)
    V = W.shape[0]
    device = W.device
    fw = _forward_kwargs(model)
    eos = [] if ignore_eos else _eos_ids(model, tokenizer)
    pad = _pad_id(model, tokenizer, _eos_ids(model, tokenizer))

    prompt_ids = _encode(tokenizer, prompts, chat)
    P = len(prompt_ids)
    B = P * n
    L = max(len(p) for p in prompt_ids)
    input_ids = torch.full((P, L), pad, dtype=torch.long, device=device)
    attn = torch.zeros((P, L), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        input_ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        attn[i, L - len(p):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)

    # ESamp state
    es: Optional[ESamp] = None
    runner: Optional[_Runner] = None
    latent = False
    request_ids: List[Any] = []
    if esamp is not None:
        # largest update: all prompt positions (warm start) or all rows (decode)
        ring_rows = max(B, sum(len(p) for p in prompt_ids))
        if isinstance(esamp, ESampConfig):
            es = make_sampler(model, esamp, slots=P, ring_rows=max(1024, ring_rows))
        else:
            es = esamp
            if es.hidden_size != W.shape[1]:
                raise ValueError(f"esamp: the ESamp's hidden_size {es.hidden_size} does not match the model's "
                                 f"LM-head input size {W.shape[1]}")
        es.ensure_slots(P, rows=ring_rows)
        latent = es.latent_mixing(top_k=top_k, top_p=top_p, min_p=min_p, vocab_size=V) and temperature > 0
        runner = _Runner(es, es.config.source_layer, model, latent, temperature)   # validates source_layer
        call_id = next(_CALLS)
        slot_list: List[int] = []
        try:
            for p in range(P):
                slot_list.append(es.acquire(("esamp.hf.generate", call_id, p)))
                request_ids.append(("esamp.hf.generate", call_id, p))
        except BaseException:
            runner.remove()
            for r in request_ids:
                es.release(r)
            raise
        prompt_slots = torch.tensor(slot_list, dtype=torch.long, device=device)
        row_slots = prompt_slots.repeat_interleave(n)

    seeds = row_seeds(seed, B, device)
    out_tok = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    out_lp = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    out_blp = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if base_logprobs else None
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    stopper = _StopStrings(tokenizer, stop, B) if stop else None
    # Row compaction: `rows` maps the positions of the current batch to the original rows; finished rows are
    # dropped from the batch (and from the KV cache) once they make up 1/8 of it, so a few long samples do not
    # keep the whole batch running.  Tokens, seeds and steps are per original row, so compaction changes no token.
    rows = torch.arange(B, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    row_seed = seeds
    from transformers import DynamicCache  # local import: esamp itself does not need transformers

    can_compact = compact and hasattr(DynamicCache, "batch_select_indices")

    def fwd(ids, mask, position_ids, cache):
        kw: Dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
        kw["cache" if fw["cache"] else "past_key_values"] = cache
        if fw["position_ids"]:
            kw["position_ids"] = position_ids
        if fw["logits_to_keep"]:
            kw["logits_to_keep"] = 1
        out = model(**kw)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1, :], new_cache

    cache = _growing_cache(model, L + max_new_tokens)
    step_times: List[float] = []
    prefill_s = decode_s = 0.0
    steps_done = 0
    compactions = 0
    label = desc or ("esamp" if es is not None else "vanilla")
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of transformers
        tqdm = None
    bar = tqdm(total=max_new_tokens, desc=label, unit="tok", disable=not progress, leave=False) if tqdm else None
    try:
        tokens = None
        for k in range(max_new_tokens):
            t0 = time.perf_counter()
            if runner is not None:
                runner.position = k
            if k == 0:
                if runner is not None:
                    runner.slots = prompt_slots
                    runner.warm = {"mask": attn.bool(), "slots": prompt_slots.repeat_interleave(attn.sum(1))}
                logits, cache = fwd(input_ids, attn, pos, cache)
                # expand the prompts' cache, mask and positions to their n samples
                logits = logits.repeat_interleave(n, 0) if n > 1 else logits
                if n > 1:
                    cache.batch_repeat_interleave(n)
                attn = attn.repeat_interleave(n, 0)
                last_pos = pos[:, -1].repeat_interleave(n, 0)
                if runner is not None:
                    x_rows, t_rows, t_hat = runner.x, runner.t, runner.t_hat
                    train_x, train_t, train_slots = x_rows, t_rows, prompt_slots   # one row per prompt
                    base_t = t_rows.repeat_interleave(n, 0) if n > 1 else t_rows
                    if n > 1:
                        t_hat = t_hat.repeat_interleave(n, 0)
                    runner.slots = row_slots
            else:
                attn = torch.cat([attn, torch.ones((attn.shape[0], 1), dtype=attn.dtype, device=device)], dim=1)
                last_pos = last_pos + 1
                logits, cache = fwd(tokens[:, None], attn, last_pos[:, None], cache)
                if runner is not None:
                    t_hat = runner.t_hat
                    base_t = runner.t
                    active = ~finished
                    if bool(active.all()):
                        train_x, train_t, train_slots = runner.x, runner.t, runner.slots
                    else:
                        idx = active.nonzero().squeeze(1)
                        train_x, train_t, train_slots = runner.x[idx], runner.t[idx], runner.slots[idx]
            if es is not None:
                betas = runner.betas
                if betas is not None and k == 0 and n > 1:
                    betas = betas.repeat_interleave(n, 0)
                rw = getattr(es, "recent_window", 0)    # samplers that look at each row's own recent tokens
                if rw:
                    es.set_recent(out_tok[rows, max(0, k - rw):k])
                tok, lp = es.sample(logits, t_hat, W, latent_mixed=latent, lm_head_bias=bias, temperature=temperature,
                                    top_k=top_k, top_p=top_p, min_p=min_p, seeds=row_seed, step=k, beta=betas)
                es.update(train_x, train_t, train_slots)
            else:
                tok, lp = sample_tokens(logits, W, lm_head_bias=bias, beta=0.0, temperature=temperature, top_k=top_k,
                                        top_p=top_p, min_p=min_p, seeds=row_seed, step=k)
            tokens = torch.where(finished, torch.full_like(tok, pad), tok)
            out_tok[rows, k] = tokens
            out_lp[rows, k] = torch.where(finished, torch.zeros_like(lp), lp)
            if out_blp is not None:
                base = logits if (es is None or not latent) else _head_logits(base_t, W, bias)
                blp = torch.log_softmax(base.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
                out_blp[rows, k] = torch.where(finished, torch.zeros_like(blp), blp)
            hit = torch.zeros_like(finished)
            if eos_t is not None:
                hit = torch.isin(tokens, eos_t)
            if stopper is not None:
                hit = hit | stopper.update(rows, tokens, finished)
            hit = hit & ~finished
            if bool(hit.any()):
                lengths[rows[hit]] = k + 1
                finished = finished | hit
            dt = time.perf_counter() - t0
            step_times.append(dt)
            if k == 0:
                prefill_s = dt
            else:
                decode_s += dt
            steps_done = k + 1
            if bar is not None:
                bar.update(1)
                if k % 8 == 0:
                    bar.set_postfix(done=f"{B - rows.numel() + int(finished.sum())}/{B}")
            if bool(finished.all()):
                break
            nf = int(finished.sum())
            if can_compact and nf > 0 and nf * 8 >= finished.numel() and k + 1 < max_new_tokens:
                keep = (~finished).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                attn, last_pos, tokens = attn[keep], last_pos[keep], tokens[keep]
                rows, row_seed, finished = rows[keep], row_seed[keep], finished[keep]
                if runner is not None:
                    runner.slots = runner.slots[keep]
                compactions += 1
    finally:
        if bar is not None:
            bar.close()
        if runner is not None:
            runner.remove()
        if es is not None:
            for r in request_ids:
                es.release(r)

    total_s = time.perf_counter() - t_start
    lens = lengths.clamp(max=steps_done).tolist()
    tok_list = out_tok.tolist()
    lp_list = out_lp.tolist()
    blp_list = out_blp.tolist() if out_blp is not None else None
    texts: List[List[str]] = []
    token_ids: List[List[List[int]]] = []
    logprobs: List[List[List[float]]] = []
    base_lps: Optional[List[List[List[float]]]] = [] if blp_list is not None else None
    for p in range(P):
        tp, ip, lpp, bpp = [], [], [], []
        for j in range(n):
            r = p * n + j
            ids = tok_list[r][: lens[r]]
            ip.append(ids)
            lpp.append(lp_list[r][: lens[r]])
            if blp_list is not None:
                bpp.append(blp_list[r][: lens[r]])
            text_ids = [t for t in ids if t not in eos]
            text = tokenizer.decode(text_ids, skip_special_tokens=True)
            if stop:
                text = _cut_at_stop(text, stop)
            tp.append(text)
        texts.append(tp)
        token_ids.append(ip)
        logprobs.append(lpp)
        if base_lps is not None:
            base_lps.append(bpp)
    generated = int(sum(lens))
    gen_s = prefill_s + decode_s
    stats: Dict[str, Any] = {
        "method": "esamp" if es is not None else "vanilla",
        "prompts": P, "n": n, "rows": B, "steps": steps_done,
        "generated_tokens": generated,
        "mean_length": generated / B,
        "prefill_s": prefill_s, "decode_s": decode_s, "total_s": total_s,
        "tokens_per_s": generated / gen_s if gen_s > 0 else float("nan"),
        "row_steps_per_s": B * steps_done / gen_s if gen_s > 0 else float("nan"),
        "step_times": step_times,
        "latent_mixing": latent,
        "compactions": compactions,
        "filters": {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p},
    }
    if es is not None:
        stats["warmup_s"] = runner.warmup_s if runner is not None else 0.0
        stats["esamp"] = es.config.to_dict()
        stats["trainer"] = es.stats()
    return GenerationOutput(texts=texts, token_ids=token_ids, logprobs=logprobs, stats=stats,
                            prompt_token_ids=prompt_ids, base_logprobs=base_lps)


_CALLS = itertools.count()


# ----------------------------------------------------------------------------------------------------------
# LogitsProcessor for model.generate
# ----------------------------------------------------------------------------------------------------------
try:
    from transformers import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # pragma: no cover
    _LogitsProcessorBase = object


class ESampLogitsProcessor(_LogitsProcessorBase):
    """ESamp for ``model.generate(...)`` users.

    Ordering caveat: transformers runs custom logits processors BEFORE its own sampling warpers (temperature, top-k,
    top-p, min-p).  ESamp's filters are defined on the unmixed logits (SPEC 3), so give temperature and the filters
    to THIS processor and switch the warpers off in ``generate``::

        proc = ESampLogitsProcessor(model, ESampConfig(), num_return_sequences=8, temperature=0.8, min_p=0.05)
        with proc:
            out = model.generate(**inputs, logits_processor=[proc], do_sample=True, num_return_sequences=8,
                                 temperature=1.0, top_k=0, top_p=1.0)

    The processor returns the mixed logits m = ((1 + beta) l - beta d) / T on the candidate set and -inf elsewhere,
    so transformers' multinomial sampling at temperature 1 draws from exactly the ESamp distribution (with torch's
    RNG, not esamp's Philox stream).  It computes d = W t_hat for the candidate set, i.e. with no filter it does one
    extra LM-head product per row (esamp.hf.generate avoids that with latent mixing).  The processor registers hooks
    on the model: use it as a context manager or call ``close()``.  Rows are grouped into prompts by
    ``num_return_sequences`` (transformers expands prompt p to rows p * n ... p * n + n - 1); a new generate call
    (detected by a shorter input or a different batch size) re-initialises the slots.
    """

    def __init__(self, model: nn.Module, config: Optional[ESampConfig] = None, *, num_return_sequences: int = 1,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None, sampler: Optional[ESamp] = None):
        _validate_sampling(num_return_sequences, 1, temperature, top_k, top_p, min_p, 0)
        self.model = model
        self.config = config if config is not None else (sampler.config if sampler is not None else ESampConfig())
        self.es = sampler if sampler is not None else make_sampler(model, self.config)
        self.n = num_return_sequences
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        head = find_lm_head(model)
        self.W, self.bias = head.weight, getattr(head, "bias", None)
        if eos_token_id is None:
            eos_token_id = _eos_ids(model, None)
        self.eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.taps = _Taps(model, self.config.source_layer, capture_mask=True)
        self._last_len = None
        self._batch = None
        self._requests: List[Any] = []
        self._row_slots: Optional[torch.Tensor] = None
        self._finished: Optional[torch.Tensor] = None

    def _begin(self, B: int):
        for r in self._requests:
            self.es.release(r)
        self._requests = []
        if B % self.n != 0:
            raise ValueError(f"ESampLogitsProcessor: batch of {B} rows is not a multiple of "
                             f"num_return_sequences = {self.n}")
        P = B // self.n
        # the prefill pass of the first row of every prompt (for the warm start)
        x_seq, t_seq = self.taps.x_seq, self.taps.t_seq
        warm = self.es.config.warmup_steps > 0 and x_seq is not None and x_seq.shape[1] > 1
        if warm:
            rows = torch.arange(0, B, self.n, device=x_seq.device)
            mask = self.taps.attention_mask
            if mask is None or mask.dim() != 2:
                valid = torch.ones((P, x_seq.shape[1]), dtype=torch.bool, device=x_seq.device)
            else:
                valid = mask[rows].bool()[:, -x_seq.shape[1]:]
        self.es.ensure_slots(P, rows=max(B, int(valid.sum()) if warm else 0))
        call_id = next(_CALLS)
        self._requests = [("esamp.hf.ESampLogitsProcessor", call_id, p) for p in range(P)]
        slots = torch.tensor([self.es.acquire(r) for r in self._requests], dtype=torch.long, device=self.W.device)
        self._row_slots = slots.repeat_interleave(self.n)
        self._finished = torch.zeros(B, dtype=torch.bool, device=self.W.device)
        self._batch = B
        if warm:
            self.es.warm_start(x_seq[rows][valid], t_seq[rows][valid], slots.repeat_interleave(valid.sum(1)))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, cur = input_ids.shape
        if self._last_len is None or cur <= self._last_len or B != self._batch:
            self._begin(B)
        elif self.eos:
            last = input_ids[:, -1]
            self._finished |= torch.isin(last, torch.tensor(self.eos, device=last.device))
        self._last_len = cur
        x = self.taps.x_seq[:, -1].clone()
        t = self.taps.t_seq[:, -1].clone()
        t_hat = self.es.predict(x, self._row_slots)
        beta = self.es.row_betas(self.temperature, B, scores.device)
        pred = t_hat if t_hat.dtype == self.W.dtype else t_hat.to(self.W.dtype)
        mixed = ops.reweight_logits(scores, pred.contiguous(), self.W, lm_head_bias=self.bias, beta=beta,
                                    temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                    min_p=self.min_p)
        active = ~self._finished
        if bool(active.all()):
            self.es.update(x, t, self._row_slots)
        else:
            idx = active.nonzero().squeeze(1)
            self.es.update(x[idx], t[idx], self._row_slots[idx])
        return mixed.to(scores.dtype)

    def close(self):
        self.taps.remove()
        for r in self._requests:
            self.es.release(r)
        self._requests = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
