"""vLLM integration (esamp.integrations.vllm) against vLLM 0.33's real classes, on CPU tensors.

vLLM's Model Runner V2 sampler is made of Triton kernels.  On a machine without a GPU they run here through
the Triton interpreter (TRITON_INTERPRET=1), with vLLM's CPU platform selected (VLLM_TARGET_DEVICE=cpu) and,
when there is no CUDA device, CUDA_VISIBLE_DEVICES="" so that vLLM keeps Triton enabled.  These variables are
set only while the vLLM modules are imported and restored afterwards.  One substitution: vLLM's Triton
top-k/top-p kernel does not run under the interpreter, so vLLM's own PyTorch top-k/top-p implementation
(the path vLLM takes where Triton is unavailable) stands in for it, in the reference sampler and in the
sampler the adapter wraps alike.

Everything else -- Sampler, SamplingStates, RequestState, InputBatch, SamplingParams, NewRequestData,
EngineCoreRequest/ParentRequest, ModelState -- is vLLM's code.  The model is a small vLLM-shaped decoder
(layers beside start_layer, an in-place fused add-norm like vLLM's CUDA op, lm_head.weight, compute_logits).
"""
import dataclasses
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import esamp

from cpu_engine_env import cpu_engine_environ

pytestmark = pytest.mark.vllm

with cpu_engine_environ() as _ENV:
    try:
        import vllm  # noqa: F401
        from vllm.config import VllmConfig
        from vllm.platforms import current_platform
        from vllm.sampling_params import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.triton_utils import HAS_TRITON
        import vllm.v1.worker.cpu.shm  # noqa: F401  (vLLM's CPU platform patches: plain CPU buffers instead of UVA)
        from vllm.v1.core.sched.output import NewRequestData
        from vllm.v1.engine import EngineCoreRequest
        from vllm.v1.engine.input_processor import InputProcessor
        from vllm.v1.engine.parallel_sampling import ParentRequest
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch
        import vllm.v1.worker.gpu.sample.sampler as v2_sampler_mod
        import vllm.v1.worker.gpu.sample.states as v2_states_mod
        from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
        from vllm.v1.worker.gpu.model_states.interface import ModelState
        from vllm.v1.worker.gpu.sample.sampler import Sampler
        from vllm.v1.worker.gpu.states import RequestState
        import vllm.v1.worker.gpu.model_states as v2_model_states
        import vllm.v1.worker.gpu_model_runner as v1_runner_mod
        import vllm.v1.worker.worker_base as worker_base_mod
        from vllm.v1.sample.sampler import Sampler as V1Sampler
        import vllm.v1.sample.ops.topk_topp_sampler as v1_topk_mod
        from vllm.v1.utils import CpuGpuBuffer
        from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch as V1InputBatch
    except ImportError as e:
        pytest.skip(f"vLLM is not importable ({type(e).__name__}: {e}); install it with tools/install_vllm.sh",
                    allow_module_level=True)
    if not (current_platform.is_cpu() and HAS_TRITON):
        pytest.skip("vLLM imported, but its CPU platform with Triton (interpreter) could not be selected",
                    allow_module_level=True)

import esamp.integrations.vllm as plugin  # noqa: E402
from esamp.integrations._core import capture as core_capture  # noqa: E402
from esamp.integrations._core.capture import BUFFER_NAME, install_layer_capture  # noqa: E402
from esamp.integrations._core.slots import SlotManager  # noqa: E402
from esamp.integrations.vllm import _common, _config, _v2  # noqa: E402
from esamp.integrations.vllm._common import group_key  # noqa: E402


def _top_k_top_p(logits, k, p, has_topp_only_rows=True):
    return apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=True)


v2_sampler_mod.apply_top_k_top_p = _top_k_top_p
v2_states_mod.apply_top_k_top_p = _top_k_top_p
v1_topk_mod.apply_top_k_top_p = _top_k_top_p   # the V1 sampler's PyTorch path calls it too

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------------------
# A small vLLM-shaped model
# ------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("esamp_test::fused_add_rms_norm", mutates_args=("x", "residual"))
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """Like vLLM's CUDA op: residual <- x + residual; x <- rms_norm(residual) * weight, both in place."""
    residual.add_(x)
    r = residual.float()
    x.copy_((r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight)


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return None


def rms_norm(x, weight, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class TinyDecoderLayer(nn.Module):
    def __init__(self, H):
        super().__init__()
        self.w_in = nn.Parameter(1 + 0.1 * torch.randn(H))
        self.w_post = nn.Parameter(1 + 0.1 * torch.randn(H))
        self.mix = nn.Linear(H, H, bias=False)   # stands in for attention
        self.mlp = nn.Linear(H, H, bias=False)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = rms_norm(hidden_states, self.w_in)
        else:
            fused_add_rms_norm(hidden_states, residual, self.w_in, 1e-6)
        hidden_states = self.mix(hidden_states) + 0.01 * positions.unsqueeze(-1).to(hidden_states.dtype)
        fused_add_rms_norm(hidden_states, residual, self.w_post, 1e-6)
        hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class TinyRMSNorm(nn.Module):
    """Like vLLM's RMSNorm: norm(x) -> tensor; norm(x, residual) -> (x, residual) through the in-place add-norm."""

    def __init__(self, H):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(H))

    def forward(self, x, residual=None):
        if residual is None:
            return rms_norm(x, self.weight)
        fused_add_rms_norm(x, residual, self.weight, 1e-6)
        return x, residual


class TinyDecoder(nn.Module):
    def __init__(self, V, H, L):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.start_layer, self.end_layer = 0, L
        self.layers = nn.ModuleList(TinyDecoderLayer(H) for _ in range(L))
        self.norm = TinyRMSNorm(H)

    def forward(self, input_ids, positions):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers[self.start_layer:self.end_layer]:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class TinyLM(nn.Module):
    def __init__(self, V=64, H=32, L=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = TinyDecoder(V, H, L)
        self.lm_head = nn.Module()
        self.lm_head.weight = nn.Parameter(torch.randn(V, H) / math.sqrt(H) * 4)
        self.logits_processor = SimpleNamespace(scale=1.0, soft_cap=None, logits_as_input=False)

    def forward(self, input_ids, positions):
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states):
        return torch.nn.functional.linear(hidden_states, self.lm_head.weight)


def ns_config(H, max_reqs, max_tokens, esamp_cfg, dtype=torch.float32):
    mc = SimpleNamespace(get_hidden_size=lambda: H, get_inputs_embeds_size=lambda: H, dtype=dtype,
                         runner_type="generate")
    return SimpleNamespace(
        model_config=mc,
        scheduler_config=SimpleNamespace(max_num_seqs=max_reqs, max_num_batched_tokens=max_tokens),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1,
                                        prefill_context_parallel_size=1, enable_batch_sharded_sampling=False),
        speculative_config=None, watermark_config=None,
        additional_config={} if esamp_cfg is None else {"esamp": esamp_cfg})


class BareState(ModelState):
    """vLLM's ModelState interface with the input-preparation methods stubbed (no attention here)."""

    def prepare_inputs_embeds(self, *args, **kwargs):
        return None

    def prepare_inputs(self, *args, **kwargs):
        return {}

    def prepare_dummy_inputs(self, *args, **kwargs):
        return {}

    def prepare_attn(self, *args, **kwargs):
        return {}


def new_req(req_id, sp, prompt=(1, 2, 3)):
    return NewRequestData(req_id=req_id, prompt_token_ids=list(prompt), mm_features=[], sampling_params=sp,
                          pooling_params=None, block_ids=([],), num_computed_tokens=0, lora_request=None,
                          prefill_token_ids=list(prompt))


def engine_request_ids(external_id, sp):
    """The worker-side request ids vLLM gives a request (and its n children)."""
    req = EngineCoreRequest(request_id=external_id, prompt_token_ids=[1, 2, 3], mm_features=None,
                            sampling_params=sp, pooling_params=None, arrival_time=0.0, lora_request=None,
                            cache_salt=None, data_parallel_rank=None)
    InputProcessor.assign_request_id(req)
    if sp.n == 1:
        return [(req.request_id, sp)]
    parent = ParentRequest(req)
    return [parent.get_child_info(i) for i in range(sp.n)]


class Harness:
    """Runner-like driver: vLLM's V2 Sampler wrapped by the adapter, and an unwrapped reference Sampler."""

    def __init__(self, esamp_cfg, *, V=64, H=32, max_reqs=16, max_tokens=64, logprobs_mode="raw_logprobs",
                 dtype=torch.float32, seed=0):
        self.V, self.H = V, H
        self.model = TinyLM(V, H, seed=seed).to(dtype)
        self.cfg = ns_config(H, max_reqs, max_tokens, esamp_cfg, dtype)
        self.cfg.model_config.logprobs_mode = logprobs_mode
        self.state = _v2.esamp_model_state_cls(BareState)(self.cfg, self.model, None, CPU)
        self.rt = self.state.esamp
        vcfg = VllmConfig()
        self.req_states = RequestState(max_reqs, 256, max_tokens, 0, V, CPU)
        base = Sampler(vcfg, max_reqs, V, CPU, self.req_states, logprobs_mode=logprobs_mode)
        custom = self.state.custom_sampler(base)
        self.sampler = custom[0] if custom else base
        self.ref_req_states = RequestState(max_reqs, 256, max_tokens, 0, V, CPU)
        self.ref = Sampler(vcfg, max_reqs, V, CPU, self.ref_req_states, logprobs_mode=logprobs_mode)
        self.bufs = InputBuffers(max_num_reqs=max_reqs, max_num_tokens=max_tokens, device=CPU)
        self.idx = {}

    def add(self, req_id, sp, prompt=(1, 2, 3), flush=True):
        """As the runner's add_requests: request state, ModelState.add_request, then sampler.add_request."""
        for rs in (self.req_states, self.ref_req_states):
            rs.add_request(req_id=req_id, prompt_len=len(prompt), all_token_ids=list(prompt),
                           num_computed_tokens=0, max_tokens=sp.max_tokens or 16)
        idx = self.req_states.req_id_to_index[req_id]
        assert self.ref_req_states.req_id_to_index[req_id] == idx
        self.state.add_request(idx, new_req(req_id, sp, prompt))
        self.sampler.add_request(idx, sp)
        self.ref.add_request(idx, sp)
        self.idx[req_id] = idx
        if flush:
            self.flush()
        return idx

    def flush(self):
        for x in (self.sampler, self.ref, self.req_states, self.ref_req_states):
            x.apply_staged_writes()

    def remove(self, req_id):
        self.state.remove_request(req_id)
        self.req_states.remove_request(req_id)
        self.ref_req_states.remove_request(req_id)
        self.idx.pop(req_id)

    def batch(self, req_ids, positions, input_ids=None):
        n = len(req_ids)
        ib = InputBatch.make_dummy(n, n, self.bufs)
        idx_np = np.array([self.idx[r] for r in req_ids], dtype=np.intp)
        idx = torch.from_numpy(idx_np.astype(np.int64))
        pos = torch.as_tensor(positions, dtype=torch.int64)
        ib.positions.copy_(pos)
        if input_ids is not None:
            ib.input_ids.copy_(torch.as_tensor(input_ids, dtype=torch.int32))
        return dataclasses.replace(ib, req_ids=list(req_ids), idx_mapping=idx, idx_mapping_np=idx_np,
                                   expanded_idx_mapping=idx)

    def prefill_batch(self, req_ids, chunks, done_before=None, total=None):
        """A prefill step: request i computes the tokens chunks[i] at positions done_before[i]... (0 by
        default); its prefill length is total[i] (default: done_before + len(chunk), i.e. it completes here)."""
        n = len(req_ids)
        lens = np.array([len(c) for c in chunks], dtype=np.int32)
        T = int(lens.sum())
        ib = InputBatch.make_dummy(n, T, self.bufs)
        done = np.zeros(n, np.int32) if done_before is None else np.asarray(done_before, np.int32)
        tot = done + lens if total is None else np.asarray(total, np.int32)
        qsl = np.zeros(n + 1, np.int32)
        np.cumsum(lens, out=qsl[1:])
        ib.positions.copy_(torch.from_numpy(np.concatenate([np.arange(d, d + l) for d, l in zip(done, lens)])))
        ib.input_ids.copy_(torch.as_tensor(np.concatenate([np.asarray(c) for c in chunks]), dtype=torch.int32))
        idx_np = np.array([self.idx[r] for r in req_ids], dtype=np.intp)
        idx = torch.from_numpy(idx_np.astype(np.int64))
        return dataclasses.replace(
            ib, req_ids=list(req_ids), idx_mapping=idx, idx_mapping_np=idx_np, expanded_idx_mapping=idx,
            num_scheduled_tokens=lens, query_start_loc=torch.from_numpy(qsl.copy()), query_start_loc_np=qsl,
            logits_indices=torch.from_numpy(qsl[1:] - 1), num_computed_tokens_np=done.copy(), prefill_len_np=tot,
            num_computed_prefill_tokens_np=done.copy(), is_prefilling_np=done < tot, has_prefill=True,
            seq_lens_cpu_upper_bound=torch.from_numpy(done + lens))

    def run(self, ib):
        """Forward and the adapter's sampler on a prepared batch."""
        hidden, logits = self.forward(ib)
        with torch.inference_mode():
            out = self.sampler(logits, ib)
        return hidden, out

    def forward(self, ib):
        """ModelState.prepare_inputs, the model forward (fills the capture buffer) and compute_logits, as the
        runner does."""
        self.state.prepare_inputs(ib, self.req_states)
        with torch.inference_mode():
            hidden = self.model(ib.input_ids.long(), ib.positions)
            return hidden, self.model.compute_logits(hidden[ib.logits_indices])

    def step(self, req_ids, positions, input_ids=None, *, reference=True):
        ib = self.batch(req_ids, positions, input_ids)
        hidden, logits = self.forward(ib)
        with torch.inference_mode():
            ref = self.ref(logits.clone(), ib) if reference else None
            # The adapter gets the very tensor compute_logits returned, as in vLLM's runner.
            out = self.sampler(logits, ib)
        return ib, hidden, logits.clone(), out, ref


def tokens(out):
    return out.sampled_token_ids.view(-1)


def vllm_candidate_mask(h, ib, logits):
    """vLLM's candidate set per row: its own processed logits (temperature, min-p, top-k, top-p) != -inf."""
    s = h.ref
    pos = ib.positions[ib.logits_indices]
    with torch.inference_mode():
        proc = s.apply_sampling_params(logits.clone(), ib.expanded_idx_mapping, ib.idx_mapping, ib.idx_mapping_np,
                                       pos, ib.input_ids[ib.logits_indices], ib.expanded_local_pos,
                                       ib.seq_lens_cpu_upper_bound.numpy())
    return torch.isfinite(proc), proc


# ------------------------------------------------------------------------------------------------------------
# Configuration and plugin
# ------------------------------------------------------------------------------------------------------------
def test_engine_config_resolution():
    assert _config.resolve_engine_config({}, {}) is None
    assert _config.resolve_engine_config(None, {"ESAMP_VLLM": "0"}) is None
    c = _config.resolve_engine_config(None, {"ESAMP_VLLM": "1"})
    assert c.beta == 0.25 and c.mode == "per_prompt" and c.resolved_rank() == 64 and c.resolved_slots(48) == 48
    c = _config.resolve_engine_config({"esamp": {"beta": 0.5, "slots": 4}},
                                      {"ESAMP_VLLM_CONFIG": '{"beta": 0.1, "rank": 16}'})
    assert (c.beta, c.slots, c.rank) == (0.5, 4, 16)  # additional_config wins key by key
    assert _config.resolve_engine_config({"esamp": {"beta": 0.5}}, {"ESAMP_VLLM": "off"}) is None
    assert _config.resolve_engine_config({"esamp": {"enabled": False}}, {}) is None
    c = _config.resolve_engine_config({"esamp": {"mode": "shared"}}, {})
    assert c.resolved_slots(64) == 1 and c.resolved_rank() == 384
    with pytest.raises(_config.ConfigError, match=r"esamp.beta: expected a finite number >= 0.0, got -1"):
        _config.resolve_engine_config({"esamp": {"beta": -1}}, {})
    with pytest.raises(_config.ConfigError, match="unknown key 'bta'"):
        _config.resolve_engine_config({"esamp": {"bta": 1}}, {})
    with pytest.raises(_config.ConfigError, match="ESAMP_VLLM_CONFIG: expected a JSON object"):
        _config.resolve_engine_config(None, {"ESAMP_VLLM_CONFIG": "{beta"})
    with pytest.raises(_config.ConfigError, match="ESAMP_VLLM: expected one of"):
        _config.resolve_engine_config(None, {"ESAMP_VLLM": "maybe"})


def test_request_config_forms():
    eng = _config.EngineConfig(beta=0.25, default_on=True)
    off = _config.EngineConfig(beta=0.25, default_on=False)
    rc = _config.request_config
    assert rc(None, eng) == _config.RequestConfig(True, 0.25)
    assert rc(None, off) == _config.RequestConfig(False, 0.25)
    assert rc({"esamp": False}, eng).enabled is False
    assert rc({"esamp": True}, off).enabled is True
    assert rc({"esamp": "off"}, eng).enabled is False and rc({"esamp": 1}, off).enabled is True  # vllm_xargs forms
    assert rc({"esamp": {"beta": 0.7}}, off) == _config.RequestConfig(True, 0.7)
    assert rc({"esamp": {"beta": 0.7, "enabled": False}}, eng).enabled is False
    assert rc({"esamp_beta": 0.0}, off) == _config.RequestConfig(True, 0.0)
    assert rc({"other_plugin": 1}, eng) == _config.RequestConfig(True, 0.25)
    with pytest.raises(_config.ConfigError, match=r"esamp.beta: expected a finite number >= 0.0, got 'x'|"
                                                  r"esamp.beta: expected a number, got 'x'"):
        rc({"esamp": {"beta": "x"}}, eng)
    with pytest.raises(_config.ConfigError, match="unknown key"):
        rc({"esamp": {"betta": 1.0}}, eng)


def test_sampling_params_validation_after_register():
    plugin.register()
    plugin.register()  # idempotent
    SamplingParams(temperature=0.8, extra_args={"esamp": {"beta": 0.4}})
    SamplingParams(temperature=0.8, extra_args={"unrelated": {"beta": -4}})
    with pytest.raises(VLLMValidationError, match=r"esamp.beta: expected a finite number >= 0.0, got -0.5"):
        SamplingParams(temperature=0.8, extra_args={"esamp": {"beta": -0.5}})
    with pytest.raises(VLLMValidationError, match=r"extra_args\['esamp'\]: expected a bool"):
        SamplingParams(temperature=0.8, extra_args={"esamp": "yes please"})


def test_model_state_hook_installed_and_disabled_is_identity():
    plugin.register()
    assert getattr(v2_model_states.resolve_model_state_cls, "_esamp_wrapped", False), \
        "register() did not wrap vLLM's resolve_model_state_cls"
    # The wrapper's behaviour, around a stand-in for vLLM's resolution (which needs a real model config).
    calls = []

    def vllm_resolution(cfg, m):
        calls.append(m)
        return BareState

    holder = SimpleNamespace(resolve_model_state_cls=vllm_resolution)
    plugin._patch_model_states(holder)
    wrapped = holder.resolve_model_state_cls
    model = TinyLM()
    assert wrapped(ns_config(32, 4, 16, None), model) is BareState            # disabled: vLLM's class as is
    assert wrapped(ns_config(32, 4, 16, {"enabled": False}), model) is BareState
    cls = wrapped(ns_config(32, 4, 16, {"beta": 0.3}), model)
    assert issubclass(cls, BareState) and cls.__name__ == "ESampBareState"
    assert wrapped(ns_config(32, 4, 16, {}), model) is cls                     # built once per base class
    assert len(calls) == 4


def test_register_is_lazy_and_harmless_in_a_fresh_process():
    """register() imports neither the model runner nor the esamp runtime; the hook fires on vLLM's import."""
    code = textwrap.dedent("""
        import os, sys
        import esamp.integrations.vllm as p
        p.register()
        lazy = ("esamp.integrations.vllm._v1", "esamp.integrations.vllm._v2", "esamp.integrations._core.runtime")
        heavy = [m for m in ("vllm.v1.worker.gpu.model_runner", "vllm.v1.worker.gpu.model_states",
                             "vllm.v1.worker.gpu_model_runner") + lazy if m in sys.modules]
        assert not heavy, heavy
        import vllm.v1.worker.gpu.model_states as ms
        assert ms.resolve_model_state_cls._esamp_wrapped
        import vllm.v1.worker.gpu_model_runner as v1
        assert v1.GPUModelRunner.load_model._esamp_wrapped
        import vllm.v1.worker.worker_base as wb
        assert callable(wb.WorkerBase.esamp_stats)
        assert not [m for m in lazy if m in sys.modules]
        print("OK")
    """)
    env = dict(os.environ, **_ENV)
    # The child imports the same esamp as this process (an installed package or the dev tree).
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(esamp.__file__))),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]


def test_unsupported_configurations_disable_esamp():
    model = TinyLM()
    cfg = _config.EngineConfig()
    base = ns_config(32, 4, 16, {})
    assert _common.unsupported_reason(base, model, cfg) is None
    spec = ns_config(32, 4, 16, {})
    spec.speculative_config = object()
    assert "speculative decoding" in _common.unsupported_reason(spec, model, cfg)
    pp = ns_config(32, 4, 16, {})
    pp.parallel_config.pipeline_parallel_size = 2
    assert "pipeline parallelism" in _common.unsupported_reason(pp, model, cfg)
    capped = TinyLM()
    capped.logits_processor.soft_cap = 30.0
    assert "soft-caps" in _common.unsupported_reason(base, capped, cfg)
    far = _config.EngineConfig(capture_layer=7)
    assert "capture_layer 7 is out of range for 3" in _common.unsupported_reason(base, model, far)
    # An unsupported engine keeps vLLM's sampler untouched.
    spec.additional_config = {"esamp": {}}
    st = _v2.esamp_model_state_cls(BareState)(spec, model, None, CPU)
    assert st.esamp is None and st.custom_sampler(object()) is None
    assert type(model.model.layers[0]) is TinyDecoderLayer and "compute_logits" not in model.__dict__


# ------------------------------------------------------------------------------------------------------------
# Slots
# ------------------------------------------------------------------------------------------------------------
def test_slot_manager_groups_and_exhaustion():
    resets = []
    sm = SlotManager(2, on_reset=resets.extend, group_key=group_key)
    assert group_key("3_abc-1234") == "abc-1234" and group_key("abc-1234") == "abc-1234"
    assert [sm.acquire(r) for r in ("0_p-1", "1_p-1", "q-2")] == [0, 0, 1]
    assert sm.acquire("r-3") == -1 and sm.exhausted == 1
    assert sm.release("0_p-1") is None and resets == []
    assert sm.release("1_p-1") == 0 and resets == [0]
    assert sm.acquire("r-3") == 0
    shared = SlotManager(1, shared=True, on_reset=resets.extend)
    assert [shared.acquire(r) for r in ("a", "b")] == [0, 0]
    assert shared.release("a") is None and shared.release("b") is None and resets == [0]


def test_slot_lifecycle_with_real_requests():
    h = Harness({"beta": 0.3, "slots": 2, "log_interval_s": 0}, max_reqs=8)
    rt = h.rt
    p0 = rt.trainer.state_dict()["params"].clone()
    sp_n = SamplingParams(n=3, temperature=0.9, seed=7, max_tokens=8)
    kids = engine_request_ids("prompt-A", sp_n)
    assert len(kids) == 3 and len({rid for rid, _ in kids}) == 3
    assert [sp.seed for _, sp in kids] == [7, 8, 9]  # vLLM gives each child its own seed
    for rid, sp in kids:
        h.add(rid, sp)
    (rid_b, sp_b), = engine_request_ids("prompt-B", SamplingParams(temperature=1.0, max_tokens=8,
                                                                    extra_args={"esamp": {"beta": 0.6}}))
    h.add(rid_b, sp_b)
    slots = [rt.slot[h.idx[rid]] for rid, _ in kids]
    assert slots == [0, 0, 0] and rt.slot[h.idx[rid_b]] == 1
    assert math.isclose(rt.beta[h.idx[rid_b]], 0.6, rel_tol=1e-6) and math.isclose(rt.beta[h.idx[kids[0][0]]], 0.3,
                                                                                     rel_tol=1e-6)
    # Plain requests: greedy, opted out, and one past the slot budget.
    (rid_g, sp_g), = engine_request_ids("greedy", SamplingParams(temperature=0.0, max_tokens=8))
    (rid_o, sp_o), = engine_request_ids("optout", SamplingParams(temperature=1.0, extra_args={"esamp": False}))
    (rid_c, sp_c), = engine_request_ids("prompt-C", SamplingParams(temperature=1.0))
    for rid, sp in ((rid_g, sp_g), (rid_o, sp_o), (rid_c, sp_c)):
        h.add(rid, sp)
        assert not rt.enabled[h.idx[rid]]
    assert rt.counters["requests_no_slot"] == 1 and rt.slots.exhausted == 1

    # Train both slots a few steps.
    live = [rid for rid, _ in kids] + [rid_b, rid_g, rid_o, rid_c]
    for s in range(3):
        h.step(live, [3 + s] * len(live), reference=False)
    rt.trainer.synchronize()
    p1 = rt.trainer.state_dict()["params"]
    assert not torch.equal(p1[0], p0[0]) and not torch.equal(p1[1], p0[1])
    assert rt.trainer.stats()["rows_trained"] == 3 * 4

    # Children finish one by one: the slot is reset and freed only with the last one.
    h.remove(kids[0][0])
    h.remove(kids[1][0])
    rt.trainer.synchronize()
    assert torch.equal(rt.trainer.state_dict()["params"][0], p1[0]) and rt.slots.resets == 0
    h.remove(kids[2][0])
    rt.trainer.synchronize()
    p2 = rt.trainer.state_dict()["params"]
    assert torch.equal(p2[0], p0[0]), "a released slot must be re-initialised"
    assert torch.equal(p2[1], p1[1]), "other slots are untouched"
    assert rt.trainer.state_dict()["step"][0].item() == 0 and rt.slots.resets == 1
    # The freed slot goes to the next new request group; plain requests leave no trace in the slot table.
    (rid_d, sp_d), = engine_request_ids("prompt-D", SamplingParams(temperature=1.0))
    h.add(rid_d, sp_d)
    assert rt.slot[h.idx[rid_d]] == 0
    for rid in (rid_b, rid_g, rid_o, rid_c, rid_d):
        h.remove(rid)
    assert rt.slots.slots_in_use == 0 and rt.slots.live_requests == 0 and not rt.enabled.any()
    assert rt.counters["requests_finished"] == 5


# ------------------------------------------------------------------------------------------------------------
# Sampling against vLLM's own sampler
# ------------------------------------------------------------------------------------------------------------
FILTERS = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 10, 1.0, 0.0), (0.9, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.05),
    (0.8, 20, 0.9, 0.02), (1.0, 5, 0.5, 0.1), (0.6, 64, 1.0, 0.0),
]


def test_plain_rows_identical_to_vllm_and_greedy_untouched():
    h = Harness({"beta": 0.5, "log_interval_s": 0}, max_reqs=24)
    reqs = []
    for i, (T, k, p, mp) in enumerate(FILTERS):
        reqs.append((f"es-{i}", SamplingParams(temperature=T, top_k=k, top_p=p, min_p=mp, seed=100 + i)))
        reqs.append((f"pl-{i}", SamplingParams(temperature=T, top_k=k, top_p=p, min_p=mp, seed=200 + i,
                                               extra_args={"esamp": False})))
    reqs.append(("greedy", SamplingParams(temperature=0.0)))
    for rid, sp in reqs:
        h.add(rid, sp)
    ids = [rid for rid, _ in reqs]
    plain = np.array([not rid.startswith("es-") for rid in ids])
    changed = 0
    for s in range(6):
        ib, _, logits, out, ref = h.step(ids, [5 + s] * len(ids), input_ids=np.arange(len(ids)) + s)
        got, want = tokens(out), tokens(ref)
        assert torch.equal(got[torch.from_numpy(plain)], want[torch.from_numpy(plain)])
        assert got[-1].item() == logits[-1].argmax().item()
        mask, _ = vllm_candidate_mask(h, ib, logits)
        es_rows = np.flatnonzero(~plain)
        for r in es_rows:
            if ids[r] == "greedy":
                continue
            # ESamp's own filters are applied to the row (vLLM was told T=1 and no filters for it), and with
            # beta > 0 the token still comes from vLLM's candidate set for the request's real parameters.
            ref_mask = _reference_mask(logits[r], *FILTERS[int(ids[r].split("-")[1])])
            assert ref_mask[got[r]].item(), (ids[r], got[r].item())
        changed += int((got[torch.from_numpy(~plain)] != want[torch.from_numpy(~plain)]).sum())
    assert changed > 0, "ESamp rows never differed from vLLM's tokens: the adapter did not act"
    assert h.rt.counters["rows_esamp"] == 6 * len(FILTERS)
    assert h.rt.counters["rows_plain"] == 6 * (len(FILTERS) + 1)


def _reference_mask(logits_row, T, k, p, mp):
    """vLLM's candidate set for one row with the given parameters, through a reference sampler."""
    h = _reference_mask.h
    h.ref.add_request(0, SamplingParams(temperature=T, top_k=k, top_p=p, min_p=mp))
    h.ref.apply_staged_writes()
    ib = InputBatch.make_dummy(1, 1, h.bufs)
    mask, _ = vllm_candidate_mask(h, ib, logits_row.view(1, -1))
    return mask[0]


@pytest.fixture(autouse=True, scope="module")
def _mask_harness():
    _reference_mask.h = SimpleNamespace(ref=Sampler(VllmConfig(), 2, 64, CPU, RequestState(2, 64, 8, 0, 64, CPU)),
                                        bufs=InputBuffers(max_num_reqs=2, max_num_tokens=8, device=CPU))
    yield


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_candidate_sets_match_vllm(beta):
    """processed_logits mode exposes the ESamp rows' mixed logits (m on C, -inf elsewhere): C must be vLLM's
    candidate set for the request's temperature/top-k/top-p/min-p (SPEC 3: C depends on z alone), and with
    beta = 0 the values must be vLLM's processed logits."""
    h = Harness({"beta": beta, "log_interval_s": 0}, max_reqs=16, logprobs_mode="processed_logits")
    ids = []
    for i, (T, k, p, mp) in enumerate(FILTERS):
        rid = f"r{i}"
        h.add(rid, SamplingParams(temperature=T, top_k=k, top_p=p, min_p=mp, seed=i, logprobs=-1))
        ids.append(rid)
    checked = 0
    for s in range(4):
        ib = h.batch(ids, [9 + s] * len(ids), input_ids=np.arange(len(ids)) * 3 + s)
        hidden, logits = h.forward(ib)
        logits0 = logits.clone()
        got = {}
        orig_sample = h.rt.core.sample

        def spy(step, l, want_mixed=False):
            out = orig_sample(step, l, want_mixed=want_mixed)
            assert want_mixed and step.rows.tolist() == list(range(len(ids)))
            got["processed"] = out[1]
            return out

        h.rt.core.sample = spy
        try:
            with torch.inference_mode():
                h.sampler(logits, ib)
        finally:
            h.rt.core.sample = orig_sample
        mask, proc = vllm_candidate_mask(h, ib, logits0)  # h.ref holds the requests' real parameters
        mine = got["processed"]
        assert torch.equal(torch.isfinite(mine), mask), "candidate sets differ from vLLM's"
        if beta == 0.0:
            torch.testing.assert_close(mine[mask], proc[mask].float(), rtol=1e-6, atol=1e-6)
        checked += int(mask.sum())
    assert checked > 0


def _chi2_pvalue(counts, probs):
    """Pearson chi-square p-value (Wilson-Hilferty normal approximation of the chi-square tail)."""
    n = counts.sum()
    keep = probs > 0
    exp = probs[keep] * n
    stat = float(((counts[keep] - exp) ** 2 / exp).sum())
    assert counts[~keep].sum() == 0, "samples outside the candidate set"
    dof = int(keep.sum()) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_beta0_random_rows_match_vllm_distribution():
    """beta = 0: ESamp rows sample the same distribution as vLLM's sampler (softmax of z on vLLM's candidate
    set).  1000 requests with distinct seeds sample the same logits row; chi-square at significance 1e-3 for
    both samplers, and the same test must reject the distribution at a wrong temperature (power check)."""
    V, B = 24, 1000
    T, k, p, mp = 0.6, 12, 0.95, 0.01
    h = Harness({"beta": 0.0, "log_interval_s": 0, "slots": 1, "mode": "shared"}, V=V, H=16, max_reqs=B,
                max_tokens=B)
    ids = [f"q{i}" for i in range(B)]
    for i, rid in enumerate(ids):
        h.add(rid, SamplingParams(temperature=T, top_k=k, top_p=p, min_p=mp, seed=1000 + i), flush=False)
    h.flush()
    ib = h.batch(ids, [17] * B, input_ids=np.full(B, 3))
    hidden, logits = h.forward(ib)
    assert torch.equal(logits, logits[:1].expand_as(logits))
    logits0 = logits.clone()
    with torch.inference_mode():
        ref = h.ref(logits.clone(), ib)
        out = h.sampler(logits, ib)
    logits = logits0
    mask, proc = vllm_candidate_mask(h, ib, logits)
    probs = torch.softmax(proc[0].double(), -1).numpy()
    assert 3 <= int(mask[0].sum()) < V  # the filters are active
    mine = np.bincount(tokens(out).numpy(), minlength=V)
    theirs = np.bincount(tokens(ref).numpy(), minlength=V)
    print("chi2 p-values: esamp", _chi2_pvalue(mine, probs), "vllm", _chi2_pvalue(theirs, probs))
    assert _chi2_pvalue(mine, probs) > 1e-3
    assert _chi2_pvalue(theirs, probs) > 1e-3
    wrong = torch.softmax(logits[0].double() / 1.0, -1).numpy() * mask[0].numpy()
    print("power check p-values:", _chi2_pvalue(mine, wrong / wrong.sum()), _chi2_pvalue(theirs, wrong / wrong.sum()))
    assert _chi2_pvalue(mine, wrong / wrong.sum()) < 1e-6
    assert _chi2_pvalue(theirs, wrong / wrong.sum()) < 1e-6
    assert h.rt.counters["rows_esamp"] == B


def test_seeds_and_positions_drive_the_noise():
    """Per-request seeds are honoured: a row's token is esamp.ops.reweight with seed = the request's seed and
    step = the token's position; it does not depend on the batch order, and another seed gives other tokens."""
    def run(order, seeds, steps=5):
        h = Harness({"beta": 0.25, "log_interval_s": 0}, max_reqs=8)
        for i in range(4):
            h.add(f"s{i}", SamplingParams(temperature=1.2, seed=seeds[i]))
        toks = {f"s{i}": [] for i in range(4)}
        for s in range(steps):
            ids = [f"s{i}" for i in order]
            _, _, _, out, _ = h.step(ids, [11 + s + i for i in order], input_ids=[1 + i + s for i in order],
                                     reference=False)
            for rid, t in zip(ids, tokens(out).tolist()):
                toks[rid].append(t)
        return h, toks

    seeds = [4242, 4243, 77, 78]
    _, a = run([0, 1, 2, 3], seeds)
    _, b = run([3, 1, 0, 2], seeds)
    assert a == b
    _, c = run([0, 1, 2, 3], [4242, 4243, 77, 99])
    assert c["s0"] == a["s0"] and c["s3"] != a["s3"]

    # First step of a fresh engine, checked against the ops directly: the fused reweight (latent mixing off), and
    # latent mixing (the default for rows without a filter): the LM head sees (1 + beta) t - beta t_hat and the
    # reweight runs with beta 0 on those logits.
    for latent in (False, True):
        g = Harness({"beta": 0.25, "log_interval_s": 0, "latent_mixing": latent}, max_reqs=8)
        for i in range(4):
            g.add(f"s{i}", SamplingParams(temperature=1.2, seed=seeds[i]))
        ib, hidden, logits, out, _ = g.step([f"s{i}" for i in range(4)], [11, 12, 13, 14], input_ids=[1, 2, 3, 4],
                                            reference=False)
        rt = g.rt
        assert rt.counters["rows_latent"] == (4 if latent else 0) and rt.counters["rows_esamp"] == 4
        with torch.inference_mode():
            fresh = esamp.Trainer(32, rank=64, layers=2, slots=rt.num_slots, device="cpu", seed=0, ring_rows=64,
                                  gamma_init=g.model.model.norm.weight.detach().float())
            pred = fresh.predict(rt.capture_buffer[:4], torch.from_numpy(rt.slot[ib.idx_mapping_np]))
            W = g.model.lm_head.weight
            seed_t, step_t = torch.tensor(seeds, dtype=torch.int64), torch.tensor([11, 12, 13, 14])
            t = hidden[ib.logits_indices]
            if latent:
                mixed = torch.nn.functional.linear(esamp.ops.mix_hidden(t, pred, 0.25), W)
                torch.testing.assert_close(logits, mixed, rtol=0, atol=0)   # the runner's logits are the mixed ones
                want, _ = esamp.ops.reweight(mixed, pred, W, beta=0.0, temperature=1.2, seed=seed_t, step=step_t)
            else:
                torch.testing.assert_close(logits, torch.nn.functional.linear(t, W), rtol=0, atol=0)
                want, _ = esamp.ops.reweight(logits, pred, W, beta=0.25, temperature=1.2, seed=seed_t, step=step_t)
        assert torch.equal(tokens(out), want)


def test_processed_logprobs_are_esamp_logprobs():
    h = Harness({"beta": 0.4, "log_interval_s": 0}, max_reqs=8, logprobs_mode="processed_logprobs")
    for i in range(4):
        h.add(f"r{i}", SamplingParams(temperature=0.9, top_k=16, seed=i, logprobs=2))
    h.add("plain", SamplingParams(temperature=0.9, top_k=16, seed=9, logprobs=2, extra_args={"esamp": False}))
    ids = [f"r{i}" for i in range(4)] + ["plain"]
    captured = {}
    orig = esamp.ops.reweight

    def spy(*a, **k):
        out = orig(*a, **k)
        captured["lp"] = out[1].clone()
        return out

    esamp.ops.reweight = spy
    try:
        ib, hidden, logits, out, ref = h.step(ids, [4, 5, 6, 7, 8], input_ids=[1, 2, 3, 4, 5])
    finally:
        esamp.ops.reweight = orig
    lt = out.logprobs_tensors
    assert torch.equal(lt.logprob_token_ids[:, 0], tokens(out))
    torch.testing.assert_close(lt.logprobs[:4, 0], captured["lp"], rtol=0, atol=2e-5)
    # The plain row reports vLLM's own processed logprob for its (vLLM-sampled) token.
    assert tokens(out)[4] == tokens(ref)[4]
    torch.testing.assert_close(lt.logprobs[4], ref.logprobs_tensors.logprobs[4], rtol=0, atol=0)


def test_training_uses_layer0_residual_and_lm_head_input():
    """The trainer sees x = layer-0 hidden + residual at each row's last token and t = the LM-head input:
    an independent Trainer fed those pairs by hand ends in the same state."""
    h = Harness({"beta": 0.25, "log_interval_s": 0, "slots": 4}, max_reqs=8)
    ids = ["a", "b", "0_c-1", "1_c-1"]
    for i, rid in enumerate(ids):
        h.add(rid, SamplingParams(temperature=1.0, seed=i))
    twin = esamp.Trainer(32, rank=64, layers=2, slots=4, device="cpu", seed=0, ring_rows=64,
                         gamma_init=h.model.model.norm.weight.detach().float())
    seen = {}
    hook = h.model.model.layers[0].register_forward_hook(
        lambda m, a, o: seen.__setitem__("x", (o[0] + o[1]).detach().clone()))
    try:
        for s in range(4):
            ib = h.batch(ids, [6 + s] * 4, input_ids=[s, s + 1, s + 2, s + 3])
            hidden, logits = h.forward(ib)
            torch.testing.assert_close(h.rt.capture_buffer[:4], seen["x"], rtol=0, atol=0)
            with torch.inference_mode():
                h.sampler(logits, ib)
            slots = torch.from_numpy(h.rt.slot[ib.idx_mapping_np])
            assert slots.tolist() == [0, 1, 2, 2]
            twin.observe(seen["x"], hidden[ib.logits_indices], slots)
    finally:
        hook.remove()
    h.rt.trainer.synchronize()
    twin.synchronize()
    torch.testing.assert_close(h.rt.trainer.state_dict()["params"], twin.state_dict()["params"], rtol=0, atol=0)
    st = h.rt.stats()
    assert st["trainer_rows_trained"] == 16 and st["trainer_steps"] == 4 and st["rows_esamp"] == 16
    assert plugin.get_stats() and any(s["rows_esamp"] == 16 for s in plugin.get_stats())
    fake_worker = SimpleNamespace(model_runner=SimpleNamespace(model_state=h.state))
    assert plugin.worker_stats(fake_worker)["trainer_rows_trained"] == 16


def test_dummy_warmup_and_prompt_logprob_calls_are_ignored():
    h = Harness({"beta": 0.25, "log_interval_s": 0}, max_reqs=8)
    for i in range(3):
        h.add(f"r{i}", SamplingParams(temperature=0.7, top_k=5, seed=i))
    live = sorted(h.idx.values())
    assert all(h.rt.enabled[i] for i in live)
    # A dummy batch (vLLM's make_dummy: its own request ids) over every index, the live ones included.
    ib = InputBatch.make_dummy(8, 8, h.bufs)
    with torch.inference_mode():
        _, logits = h.forward(ib)
        h.sampler(logits, ib)
    assert h.rt.counters["rows_esamp"] == 0 and h.rt.counters["rows_plain"] == 8
    # vLLM's sampler warm-up (SamplingParams.for_sampler_warmup, without ModelState.add_request) reaches
    # vLLM's sampler unchanged and enables nothing.
    free = next(i for i in range(8) if i not in live)
    h.sampler.add_request(free, SamplingParams.for_sampler_warmup())
    h.sampler.apply_staged_writes()
    assert not h.rt.enabled[free]
    assert math.isclose(float(h.sampler.sampling_states.temperature.np[free]), 0.9, rel_tol=1e-6)
    assert int(h.sampler.sampling_states.top_k.np[free]) == 50
    # ...while a live ESamp request's vLLM-side parameters are the neutral ones (ESamp applies T and filters).
    assert float(h.sampler.sampling_states.temperature.np[live[0]]) == 1.0
    assert int(h.sampler.sampling_states.top_k.np[live[0]]) == h.V
    assert float(h.rt.temperature[live[0]]) == pytest.approx(0.7) and int(h.rt.top_k[live[0]]) == 5
    h.rt.trainer.synchronize()
    assert h.rt.trainer.stats()["rows_trained"] == 0
    # compute_logits calls around the step (prompt logprobs run after the sampler) are not used: the sampler
    # takes the LM-head input of the step's own compute_logits, the one right before it.
    ids = ["r0", "r1", "r2"]
    seen = []
    orig_sample = h.rt.core.sample

    def spy(step, *args, **kwargs):
        seen.append(step.t)
        return orig_sample(step, *args, **kwargs)

    h.rt.core.sample = spy
    try:
        for s in range(2):
            ib = h.batch(ids, [4 + s] * 3, input_ids=[1 + s, 2 + s, 3 + s])
            h.state.prepare_inputs(ib, h.req_states)
            with torch.inference_mode():
                hidden = h.model(ib.input_ids.long(), ib.positions)
                logits = h.model.compute_logits(hidden[ib.logits_indices])
                h.sampler(logits, ib)
                h.model.compute_logits(torch.randn(3, 32))  # prompt-logprobs style call after the sampler
            assert torch.equal(seen[-1], hidden[ib.logits_indices])
    finally:
        h.rt.core.sample = orig_sample
    assert h.rt.counters["rows_esamp"] == 6 and len(seen) == 2
    # A sampler call on logits that did not come from the step's compute_logits (here: the previous step's
    # logits, after a prompt-logprobs style call) falls back to vLLM's sampler for every row, and counts them.
    before = h.rt.counters["rows_no_lm_input"]
    with torch.inference_mode():
        out = h.sampler(logits, ib)
    assert h.rt.counters["rows_no_lm_input"] == before + 3 and h.rt.counters["rows_esamp"] == 6
    assert out.sampled_token_ids.shape == (3, 1)


def test_bf16_model_and_processed_logits_dtype():
    """A bf16 model with a logits processor active (presence penalty: vLLM converts that row to fp32)."""
    h = Harness({"beta": 0.25, "log_interval_s": 0}, max_reqs=4, dtype=torch.bfloat16)
    h.add("a", SamplingParams(temperature=0.9, seed=1, presence_penalty=0.5))
    h.add("b", SamplingParams(temperature=0.9, seed=2))
    for s in range(3):
        ib, hidden, logits, out, ref = h.step(["a", "b"], [4 + s, 4 + s], input_ids=[1 + s, 2 + s])
        assert logits.dtype == torch.bfloat16 and h.rt.capture_buffer.dtype == torch.bfloat16
        assert tokens(out).dtype == torch.int64 and ((tokens(out) >= 0) & (tokens(out) < h.V)).all()
    h.rt.trainer.synchronize()
    assert h.rt.trainer.stats()["rows_trained"] == 6


# ------------------------------------------------------------------------------------------------------------
# Capture under torch.compile and fake tensors
# ------------------------------------------------------------------------------------------------------------
def _captured_model(N=12, V=64, H=32, dtype=torch.float32):
    model = TinyLM(V, H).to(dtype)
    buf = torch.zeros(16, H, dtype=dtype)
    install_layer_capture(model.model.layers[0], buf)
    ids = torch.randint(0, V, (N,))
    pos = torch.arange(N)
    return model, buf, ids, pos


def _layer0_reference(model, ids, pos):
    """hidden + residual after layer 0, computed eagerly before layer 1's in-place add-norm."""
    with torch.no_grad():
        h, r = type(model.model.layers[0]).__mro__[1].forward(model.model.layers[0], pos,
                                                              model.model.embed_tokens(ids), None)
        return (h + r).clone()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_capture_compiles_fullgraph_inside_vllm_like_layer(backend):
    model, buf, ids, pos = _captured_model()
    ref = _layer0_reference(model, ids, pos)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=True)
    with torch.no_grad():
        out = compiled(ids, pos)
        torch.testing.assert_close(buf[:12], ref, rtol=1e-5, atol=1e-5)
        assert (buf[12:] == 0).all()
        eager_buf = torch.zeros_like(buf)
        model.model.layers[0]._buffers[BUFFER_NAME] = eager_buf
        torch.testing.assert_close(out, model(ids, pos), rtol=1e-5, atol=1e-5)
        model.model.layers[0]._buffers[BUFFER_NAME] = buf
        # Another batch size through the same dynamic graph.
        ids2, pos2 = ids[:7].flip(0), pos[:7] + 3
        buf.zero_()
        compiled(ids2, pos2)
        torch.testing.assert_close(buf[:7], _layer0_reference(model, ids2, pos2), rtol=1e-5, atol=1e-5)
        assert (buf[7:] == 0).all()
    explain = torch._dynamo.explain(model)(ids, pos)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    ops = [str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("esamp.capture" in o for o in ops), ops


def test_capture_fake_tensor_trace():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    model, buf, ids, pos = _captured_model()
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    names = list(state)

    def fwd(i, p, *tensors):  # parameters and the capture buffer are inputs of the fake trace
        return torch.func.functional_call(model, dict(zip(names, tensors)), (i, p))

    gm = make_fx(fwd, tracing_mode="fake")(ids, pos, *state.values())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.esamp.capture.default in targets
    cap = [n for n in gm.graph.nodes if n.target == torch.ops.esamp.capture.default][0]
    norm = [n for n in gm.graph.nodes if n.target == torch.ops.esamp_test.fused_add_rms_norm.default]
    # Ordered before the next layer's in-place add-norm (layer 0 itself runs one, layer 1 two more).
    order = list(gm.graph.nodes)
    assert sum(order.index(n) < order.index(cap) for n in norm) == 1
    # The traced graph computes the same capture as eager.
    buf.zero_()
    with torch.no_grad():
        gm(ids, pos, *state.values())
    torch.testing.assert_close(buf[:12], _layer0_reference(model, ids, pos), rtol=1e-5, atol=1e-5)
    # Pure fake execution: the op's fake kernel accepts the shapes and checks them.
    with FakeTensorMode() as mode:
        h = torch.empty(5, 32)
        out = torch.empty(16, 32)
        torch.ops.esamp.capture(h, h, out)
        with pytest.raises(RuntimeError, match="out: expected"):
            torch.ops.esamp.capture(torch.empty(20, 32), None, out)
    assert mode is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_survives_cuda_graph_replay():
    model, _, ids, pos = _captured_model()
    model = model.cuda()
    buf = torch.zeros(16, 32, device="cuda")
    model.model.layers[0]._buffers[BUFFER_NAME] = buf
    sids, spos = ids.cuda(), pos.cuda()
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(sids, spos)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model(sids, spos)
        new_ids = torch.randint(0, 64, ids.shape)
        sids.copy_(new_ids)
        buf.zero_()
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(buf[:12].cpu(), _layer0_reference(model.cpu(), new_ids, pos), rtol=1e-4,
                                   atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Warm start (SPEC 2 warmup_steps)
# ------------------------------------------------------------------------------------------------------------
def _spy_trainer(rt):
    """Records every observe() of the runtime's trainer (copies of x, t, slot ids) and every predict() output."""
    calls, preds = [], []
    orig_observe, orig_predict = rt.trainer.observe, rt.trainer.predict

    def observe(x, t, slots):
        calls.append((x.clone(), t.clone(), torch.as_tensor(slots).clone()))
        return orig_observe(x, t, slots)

    def predict(x, slots):
        out = orig_predict(x, slots)
        preds.append(out.clone())
        return out

    rt.trainer.observe, rt.trainer.predict = observe, predict
    return calls, preds


def _direct_forward(model, ib):
    """An independent forward on the batch's tokens: (layer-0 hidden + residual, final hidden states)."""
    seen = {}
    hook = model.model.layers[0].register_forward_hook(
        lambda m, a, o: seen.__setitem__("x", (o[0] + o[1]).detach().clone()))
    try:
        with torch.inference_mode():
            hidden = model(ib.input_ids.long().clone(), ib.positions.clone()).clone()
    finally:
        hook.remove()
    return seen["x"], hidden


def test_warm_start_trains_on_prompt_pairs_before_the_first_token():
    h = Harness({"beta": 0.25, "log_interval_s": 0, "slots": 4, "warmup_steps": 3}, max_reqs=8)
    prompts = {"a": [5, 6, 7, 8, 9], "b": [1, 2, 3, 4, 10, 11, 12], "c": [7, 7, 7, 7], "d": [3, 1, 4, 1, 5, 9]}
    extra = {"a": None, "b": None, "c": {"esamp": {"warmup_steps": 0}}, "d": {"esamp_warmup_steps": 2}}
    for i, rid in enumerate(prompts):
        h.add(rid, SamplingParams(temperature=1.0, seed=i, extra_args=extra[rid]), prompt=prompts[rid])
    assert [int(h.rt.warmup[h.idx[r]]) for r in prompts] == [3, 3, 0, 2]
    calls, preds = _spy_trainer(h.rt)
    ids = list(prompts)
    ib = h.prefill_batch(ids, [prompts[r] for r in ids])
    h.run(ib)
    x_ref, t_ref = _direct_forward(h.model, ib)
    slot = {r: int(h.rt.slot[h.idx[r]]) for r in ids}
    qsl = ib.query_start_loc_np
    rows = {r: np.arange(qsl[i], qsl[i + 1]) for i, r in enumerate(ids)}
    ab = np.concatenate([rows["a"], rows["b"]])
    expect = [(ab, [slot["a"]] * 5 + [slot["b"]] * 7)] * 3 + [(rows["d"], [slot["d"]] * 6)] * 2
    last = ib.logits_indices.numpy()
    expect.append((last, [slot[r] for r in ids]))  # the ordinary update of the step's logit rows
    assert len(calls) == len(expect)
    for (x, t, s), (tok, sl) in zip(calls, expect):
        torch.testing.assert_close(x, x_ref[tok], rtol=0, atol=0)
        torch.testing.assert_close(t, t_ref[tok], rtol=0, atol=0)   # the model's final hidden states there
        assert s.tolist() == sl
    c = h.rt.counters
    assert (c["warmup_groups"], c["warmup_rows"], c["warmup_updates"], c["warmup_row_updates"]) == (3, 18, 5, 48)
    assert c["warmup_partial"] == c["warmup_truncated"] == c["warmup_unavailable"] == 0
    # An independent trainer fed the same pairs by hand ends in the same state.
    twin = esamp.Trainer(32, rank=64, layers=2, slots=4, device="cpu", seed=0, ring_rows=64,
                         gamma_init=h.model.model.norm.weight.detach().float())
    for tok, sl in expect:
        twin.observe(x_ref[tok], t_ref[tok], torch.tensor(sl))
    h.rt.trainer.synchronize()
    twin.synchronize()
    torch.testing.assert_close(h.rt.trainer.state_dict()["params"], twin.state_dict()["params"], rtol=0, atol=0)
    st = h.rt.stats()
    assert st["trainer_rows_trained"] == 48 + 4 and st["trainer_steps"] == 6 and st["warmup_available"]
    # Decode steps take no further warm start.
    for s in range(2):
        h.step(ids, [10 + s] * 4, input_ids=[1, 2, 3, 4], reference=False)
    assert h.rt.counters["warmup_updates"] == 5 and len(calls) == len(expect) + 2


def _prefill_then_decode(h, reqs, steps=4):
    """Adds reqs [(id, sp, prompt)], prefills them in one step and decodes; returns the tokens per step."""
    for rid, sp, prompt in reqs:
        h.add(rid, sp, prompt=prompt)
    ids = [r for r, _, _ in reqs]
    ib = h.prefill_batch(ids, [p for _, _, p in reqs])
    _, out = h.run(ib)
    toks = [tokens(out).tolist()]
    for s in range(steps):
        pos = [len(p) + s for _, _, p in reqs]
        _, _, _, out, _ = h.step(ids, pos, input_ids=[t % h.V for t in toks[-1]], reference=False)
        toks.append(tokens(out).tolist())
    return toks


def test_warmup_steps_zero_reproduces_the_adapter_without_warm_start():
    def reqs(extra):
        return [(f"r{i}", SamplingParams(temperature=1.0, seed=10 + i, extra_args=extra), p)
                for i, p in enumerate(([1, 2, 3, 4, 5, 6], [9, 8, 7, 6], [4, 4, 2, 2, 1]))]

    cfg = {"beta": 1.0, "log_interval_s": 0, "slots": 4}
    off = Harness(dict(cfg, warmup_steps=0), max_reqs=8)
    # Engine warmup_steps 0: no final-norm capture at all (the model is what the adapter made of it before).
    assert off.rt.final_buffer is None and type(off.model.model.norm) is TinyRMSNorm
    assert off.cfg.additional_config["esamp"]["_capture"] == "esamp::capture@layer0"
    per_req_off = Harness(dict(cfg, warmup_steps=5), max_reqs=8)
    assert type(per_req_off.model.model.norm).__name__ == "ESampCaptureOutTinyRMSNorm"
    assert per_req_off.cfg.additional_config["esamp"]["_capture"] == "esamp::capture@layer0+final_norm"
    on = Harness(dict(cfg, warmup_steps=5), max_reqs=8)
    _, p_off = _spy_trainer(off.rt)
    _, p_req = _spy_trainer(per_req_off.rt)
    _, p_on = _spy_trainer(on.rt)
    t_off = _prefill_then_decode(off, reqs(None))
    t_req = _prefill_then_decode(per_req_off, reqs({"esamp": {"warmup_steps": 0}}))
    t_on = _prefill_then_decode(on, reqs(None))
    assert t_off == t_req
    for a, b in zip(p_off, p_req):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for hh in (off, per_req_off, on):
        hh.rt.trainer.synchronize()
    torch.testing.assert_close(off.rt.trainer.state_dict()["params"], per_req_off.rt.trainer.state_dict()["params"],
                               rtol=0, atol=0)
    assert off.rt.counters["warmup_updates"] == per_req_off.rt.counters["warmup_updates"] == 0
    # With warm start the very first prediction already differs (the slot was trained before it).
    assert on.rt.counters["warmup_updates"] == 5 and on.rt.counters["warmup_groups"] == 3
    assert not torch.equal(p_on[0], p_off[0])
    assert len(t_on) == len(t_off)


def test_warm_start_once_per_request_group():
    h = Harness({"beta": 0.25, "log_interval_s": 0, "slots": 4, "warmup_steps": 2}, max_reqs=8)
    prompt = [3, 5, 7, 9, 11]
    kids = engine_request_ids("prompt-N", SamplingParams(n=3, temperature=0.9, seed=1, max_tokens=8))
    for rid, sp in kids:
        h.add(rid, sp, prompt=prompt)
    ids = [rid for rid, _ in kids]
    assert len({int(h.rt.slot[h.idx[r]]) for r in ids}) == 1
    calls, _ = _spy_trainer(h.rt)
    h.run(h.prefill_batch(ids, [prompt] * 3))
    c = h.rt.counters
    assert (c["warmup_groups"], c["warmup_rows"], c["warmup_updates"], c["warmup_shared"]) == (1, 5, 2, 2)
    assert [x.shape[0] for x, _, _ in calls] == [5, 5, 3]   # two warm-up updates on one child's rows, then decode
    # Children of another group prefilled in different steps: the first warms the slot, the second does not.
    kids2 = engine_request_ids("prompt-M", SamplingParams(n=2, temperature=0.9, seed=4, max_tokens=8))
    for rid, sp in kids2:
        h.add(rid, sp, prompt=[1, 2, 3])
    h.run(h.prefill_batch([kids2[0][0]], [[1, 2, 3]]))
    assert (c["warmup_groups"], c["warmup_rows"], c["warmup_updates"]) == (2, 8, 4)
    h.run(h.prefill_batch([kids2[1][0]], [[1, 2, 3]]))
    assert (c["warmup_groups"], c["warmup_rows"], c["warmup_updates"], c["warmup_shared"]) == (2, 8, 4, 3)
    # Siblings completing in the same step, the first with a prefix-cache hit (2 of 6 positions cached): the
    # sibling that computed the whole prompt here warms the slot.
    kids3 = engine_request_ids("prompt-K", SamplingParams(n=2, temperature=0.9, seed=9, max_tokens=8))
    p6 = [6, 5, 4, 3, 2, 1]
    for rid, sp in kids3:
        h.add(rid, sp, prompt=p6)
    n_before = len(calls)
    ib = h.prefill_batch([kids3[0][0], kids3[1][0]], [p6[2:], p6], done_before=[2, 0])
    h.run(ib)
    x_ref, _ = _direct_forward(h.model, ib)
    assert (c["warmup_groups"], c["warmup_rows"], c["warmup_shared"], c["warmup_partial"]) == (3, 14, 4, 0)
    torch.testing.assert_close(calls[n_before][0], x_ref[4:10], rtol=0, atol=0)


def test_reused_slot_gets_its_own_warm_start():
    cfg = {"beta": 0.5, "log_interval_s": 0, "slots": 1, "warmup_steps": 4}
    b = ("B", SamplingParams(temperature=1.0, seed=21), [2, 4, 6, 8])
    reused = Harness(cfg, max_reqs=4)
    _prefill_then_decode(reused, [("A", SamplingParams(temperature=1.0, seed=20), [1, 3, 5, 7, 9, 11])])
    reused.remove("A")
    t_reused = _prefill_then_decode(reused, [b])
    assert reused.rt.counters["warmup_groups"] == 2 and reused.rt.slots.resets == 1
    fresh = Harness(cfg, max_reqs=4)
    t_fresh = _prefill_then_decode(fresh, [b])
    assert t_reused == t_fresh
    for hh in (reused, fresh):
        hh.rt.trainer.synchronize()
    for k in ("params", "exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(reused.rt.trainer.state_dict()[k], fresh.rt.trainer.state_dict()[k],
                                   rtol=0, atol=0)


def test_warm_start_last_chunk_and_row_cap():
    h = Harness({"beta": 0.25, "log_interval_s": 0, "slots": 4, "warmup_steps": 1, "warmup_max_rows": 4},
                max_reqs=8)
    long_prompt = list(range(1, 11))
    h.add("p", SamplingParams(temperature=1.0, seed=1), prompt=long_prompt)
    h.add("q", SamplingParams(temperature=1.0, seed=2), prompt=[5, 4, 3, 2, 1, 6, 7])
    calls, _ = _spy_trainer(h.rt)
    # Chunk 1 of "p" (6 of 10 tokens): no warm start yet.
    h.run(h.prefill_batch(["p"], [long_prompt[:6]], total=[10]))
    assert h.rt.counters["warmup_updates"] == 0
    # Last chunk of "p" (4 tokens, all used) and all 7 tokens of "q" (the last 4 used).
    ib = h.prefill_batch(["p", "q"], [long_prompt[6:], [5, 4, 3, 2, 1, 6, 7]], done_before=[6, 0])
    n_before = len(calls)
    h.run(ib)
    x_ref, t_ref = _direct_forward(h.model, ib)
    c = h.rt.counters
    assert (c["warmup_partial"], c["warmup_truncated"], c["warmup_groups"], c["warmup_rows"]) == (1, 1, 2, 8)
    # One update per bin of at most warmup_max_rows = 4 rows: "p" then "q", then the ordinary update.
    warm = calls[n_before:n_before + 2]
    assert [s.tolist() for _, _, s in warm] == [[int(h.rt.slot[h.idx["p"]])] * 4, [int(h.rt.slot[h.idx["q"]])] * 4]
    for (x, t, _), tok in zip(warm, (np.arange(0, 4), np.arange(7, 11))):
        torch.testing.assert_close(x, x_ref[tok], rtol=0, atol=0)
        torch.testing.assert_close(t, t_ref[tok], rtol=0, atol=0)


def test_warm_start_turns_off_when_final_norm_is_not_the_lm_head_input():
    h = Harness({"beta": 0.25, "log_interval_s": 0, "warmup_steps": 3}, max_reqs=4)
    base_forward = h.model.forward
    h.model.forward = lambda ids, pos: 2 * base_forward(ids, pos)   # something after the final norm
    h.add("a", SamplingParams(temperature=1.0, seed=1), prompt=[1, 2, 3, 4])
    h.run(h.prefill_batch(["a"], [[1, 2, 3, 4]]))
    st = h.rt.stats()
    assert not st["warmup_available"] and "final-norm output is not the LM-head input" in st["warmup_reason"]
    assert st["warmup_unavailable"] == 1 and st["warmup_updates"] == 0
    h.rt.trainer.synchronize()
    assert h.rt.trainer.stats()["rows_trained"] == 1   # only the ordinary update of the logit row
    # Layouts without a usable final norm are refused up front.
    assert "no final 'norm' module" in core_capture.final_norm_unsupported_reason(nn.Module())
    bare = nn.Module()
    bare.norm = nn.Module()
    assert "no forward of its own" in core_capture.final_norm_unsupported_reason(bare)
    assert core_capture.final_norm_unsupported_reason(h.model.model) is None


def test_warmup_config_keys():
    c = _config.resolve_engine_config(None, {"ESAMP_VLLM": "1"})
    assert c.warmup_steps == esamp.ESampConfig().warmup_steps == 30 and c.warmup_max_rows == 1024
    assert _config.resolve_engine_config({"esamp": {"warmup_steps": 0}}, {}).warmup_steps == 0
    with pytest.raises(_config.ConfigError, match=r"esamp.warmup_steps: expected an int >= 0, got -1"):
        _config.resolve_engine_config({"esamp": {"warmup_steps": -1}}, {})
    with pytest.raises(_config.ConfigError, match=r"esamp.warmup_max_rows: expected an int >= 1, got 0"):
        _config.resolve_engine_config({"esamp": {"warmup_max_rows": 0}}, {})
    eng = _config.EngineConfig()
    rc = _config.request_config
    assert rc({"esamp": {"warmup_steps": 5}}, eng) == _config.RequestConfig(True, 0.25, 5)
    assert rc({"esamp_warmup_steps": 0}, eng).warmup_steps == 0 and rc(None, eng).warmup_steps is None
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(_config.ConfigError, match="warmup_steps: expected an int >= 0"):
            rc({"esamp": {"warmup_steps": bad}}, eng)
    plugin.register()
    with pytest.raises((VLLMValidationError, ValueError), match="esamp_warmup_steps: expected an int >= 0"):
        SamplingParams(extra_args={"esamp_warmup_steps": -2})


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_final_norm_capture_compiles_fullgraph(backend):
    """The warm-start capture on the final norm (mode 'first', the norm returning (normed, residual)) is a graph
    node too: after a compiled forward its buffer holds the model's output rows."""
    model, buf, ids, pos = _captured_model()
    fbuf = torch.zeros(16, 32)
    install_layer_capture(model.model.norm, fbuf, mode="first")
    with pytest.raises(ValueError, match="mode: expected one of"):
        install_layer_capture(model.model.norm, fbuf, mode="mean")
    with pytest.raises(ValueError, match="already captures in mode 'first'"):
        install_layer_capture(model.model.norm, fbuf, mode="sum")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=True)
    with torch.no_grad():
        out = compiled(ids, pos)
        torch.testing.assert_close(fbuf[:12], out, rtol=0, atol=0)
        assert (fbuf[12:] == 0).all()
        torch.testing.assert_close(fbuf[:12], TinyLM(64, 32).forward(ids, pos), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(buf[:12], _layer0_reference(model, ids, pos), rtol=1e-5, atol=1e-5)
    explain = torch._dynamo.explain(model)(ids, pos)
    assert explain.graph_break_count == 0
    ops = [str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("esamp.capture" in o for o in ops) == 2, ops


# ------------------------------------------------------------------------------------------------------------
# The V1 model runner family (vLLM 0.33's GPUModelRunner), around vLLM's real V1 InputBatch and Sampler
# ------------------------------------------------------------------------------------------------------------
def _v1_sampler(logprobs_mode):
    """vLLM's V1 Sampler; its CPU top-k/top-p and greedy kernels are compiled code (vllm._C, absent here), so
    vLLM's own PyTorch paths stand in for them (the paths vLLM takes on platforms without those kernels; top-k/
    top-p through vLLM's PyTorch implementation, as for V2 above)."""
    s = V1Sampler(logprobs_mode=logprobs_mode)
    s.topk_topp_sampler.forward = s.topk_topp_sampler.forward_native
    s.greedy_sample = lambda logits: logits.argmax(dim=-1).view(-1)
    return s


class MiniV1Runner(v1_runner_mod.GPUModelRunner):
    """What the adapter relies on in vLLM's V1 GPUModelRunner, driven the way that runner drives it (the
    persistent InputBatch, ``_update_states`` per scheduler output, ``execute_model`` computing the logits at
    ``query_start_loc[1:] - 1``, ``sample_tokens`` calling ``self.sampler(logits=..., sampling_metadata=...)``),
    around vLLM's real V1 InputBatch and Sampler.  Like vLLM's CPUModelRunner it overrides ``load_model``
    without calling the base class's (the case the plugin must not miss)."""

    def __init__(self, esamp_cfg, *, V=64, H=32, max_reqs=8, max_tokens=64, logprobs_mode="raw_logprobs", seed=0):
        self.vllm_config = ns_config(H, max_reqs, max_tokens, esamp_cfg)
        self.vllm_config.model_config.logprobs_mode = logprobs_mode
        self.device, self.max_num_reqs, self.max_num_tokens = CPU, max_reqs, max_tokens
        self.speculative_config, self.is_pooling_model = None, False
        self.V, self.H, self._seed = V, H, seed
        self.input_batch = V1InputBatch(max_num_reqs=max_reqs, max_model_len=256, max_num_batched_tokens=max_tokens,
                                        device=CPU, vocab_size=V, block_sizes=[16], max_num_blocks_per_req=[16])
        self.query_start_loc = CpuGpuBuffer(max_reqs + 1, dtype=torch.int32, device=CPU, pin_memory=False)
        self.sampler = _v1_sampler(logprobs_mode)
        self.requests = {}
        self.model = None

    def load_model(self):
        self.model = TinyLM(self.V, self.H, seed=self._seed)

    def get_model(self):
        return self.model

    def _update_states(self, so):
        for rid in so.finished_req_ids:
            self.requests.pop(rid, None)
            self.input_batch.remove_request(rid)
        for nr in so.scheduled_new_reqs:
            sp = nr.sampling_params
            gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
            rs = CachedRequestState(req_id=nr.req_id, prompt_token_ids=list(nr.prompt_token_ids), mm_features=[],
                                    sampling_params=sp, generator=gen, block_ids=([0],), num_computed_tokens=0,
                                    output_token_ids=[])
            self.requests[nr.req_id] = rs
            self.input_batch.add_request(rs)
        self.input_batch.condense()
        self.input_batch.refresh_metadata()

    def execute_model(self, so):
        self._update_states(so)
        ib = self.input_batch
        n = ib.num_reqs
        self.logits = None
        if n == 0:            # nothing scheduled: vLLM's runner returns before the forward
            return
        sched = np.array([so.num_scheduled_tokens[r] for r in ib.req_ids], dtype=np.int32)
        qsl = np.zeros(n + 1, np.int32)
        np.cumsum(sched, out=qsl[1:])
        self.query_start_loc.np[:n + 1] = qsl
        ids, pos = [], []
        for i, rid in enumerate(ib.req_ids):
            rs, done = self.requests[rid], int(ib.num_computed_tokens_cpu[i])
            toks = list(rs.prompt_token_ids) + list(rs.output_token_ids)
            ids += toks[done:done + sched[i]]
            pos += list(range(done, done + int(sched[i])))
        with torch.inference_mode():
            self.hidden = self.model(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long))
            self.logits = self.model.compute_logits(self.hidden[torch.from_numpy(qsl[1:] - 1).long()])
        self.sched = sched

    def sample_tokens(self):
        ib = self.input_batch
        logits = self.logits
        if logits is None:
            return None
        self.logits_seen = logits.clone()
        with torch.inference_mode():
            out = self.sampler(logits=logits, sampling_metadata=ib.sampling_metadata)
        toks = out.sampled_token_ids.view(-1).tolist()
        for i, rid in enumerate(ib.req_ids):
            rs = self.requests[rid]
            ib.num_computed_tokens_cpu[i] += self.sched[i]
            if ib.num_computed_tokens_cpu[i] >= rs.num_prompt_tokens:   # a real token (not a prefill chunk end)
                rs.output_token_ids.append(toks[i])
        return out

    def step(self, new=(), finished=(), chunk=None):
        """One scheduler step: ``new`` = [(req_id, SamplingParams, prompt)], every live request scheduled (new
        ones with their whole prompt, or ``chunk[req_id]`` tokens of it)."""
        reqs = [new_req(rid, sp, prompt) for rid, sp, prompt in new]
        live = [r for r in self.requests if r not in finished] + [r.req_id for r in reqs]
        num = {}
        for rid in live:
            rs = self.requests.get(rid)
            if rs is None:
                prompt = next(p for r, _, p in new if r == rid)
                num[rid] = (chunk or {}).get(rid, len(prompt))
            else:
                i = self.input_batch.req_id_to_index[rid]
                left = rs.num_prompt_tokens - int(self.input_batch.num_computed_tokens_cpu[i])
                num[rid] = (chunk or {}).get(rid, left) if left > 0 else 1
        self.execute_model(SimpleNamespace(finished_req_ids=set(finished), scheduled_new_reqs=reqs,
                                           num_scheduled_tokens=num))
        return self.sample_tokens()


def _v1_runner(esamp_cfg, **kw):
    plugin.register()
    r = MiniV1Runner(esamp_cfg, **kw)
    r.load_model()
    return r


def test_v1_load_model_hooks_cover_every_runner_subclass():
    plugin.register()
    import vllm.v1.worker.cpu_model_runner as cpu_runner_mod
    for cls in (v1_runner_mod.GPUModelRunner, cpu_runner_mod.CPUModelRunner, MiniV1Runner):
        assert getattr(cls.__dict__["load_model"], "_esamp_wrapped", False), cls

    class Later(MiniV1Runner):          # defined after register(): caught by __init_subclass__
        def load_model(self):
            super().load_model()        # runs the attach twice: must stay idempotent

    assert Later.__dict__["load_model"]._esamp_wrapped
    r = Later({"beta": 0.3, "log_interval_s": 0})
    r.load_model()
    ad = r._esamp_status
    assert type(ad).__name__ == "V1Adapter" and ad.stats()["runner"] == "V1 model runner"
    assert len(r.model.__dict__) and "compute_logits" in r.model.__dict__
    r.load_model()                      # a second load keeps the one adapter
    assert r._esamp_status is ad
    # Disabled: vLLM's objects untouched.
    off = _v1_runner(None)
    assert "_esamp_status" not in off.__dict__ and "compute_logits" not in off.model.__dict__
    assert "forward" not in off.sampler.__dict__ and "_update_states" not in off.__dict__
    assert callable(worker_base_mod.WorkerBase.esamp_stats)


def test_v1_plain_rows_match_vllm_and_esamp_rows_follow_the_ops():
    """Plain, opted-out and greedy rows give vLLM's tokens; ESamp rows are esamp.ops.reweight on the processed
    logits with the request's seed and position (fused rows), or on the logits of the mixed LM-head input with
    beta 0 (latent rows); the trainer then trains on (layer-0 residual, LM-head input)."""
    cfg = {"beta": 0.5, "log_interval_s": 0, "warmup_steps": 0}
    es, ref = _v1_runner(cfg), _v1_runner(None)
    prompts = {f"r{i}": [1 + i, 7 + i, 3 + 2 * i] for i in range(6)}
    params = {"r0": SamplingParams(temperature=0.9, seed=11),                     # ESamp, latent
              "r1": SamplingParams(temperature=1.2, top_k=8, seed=12),            # ESamp, fused (filter)
              "r2": SamplingParams(temperature=0.8, top_p=0.7, seed=13),          # ESamp, fused (filter)
              "r3": SamplingParams(temperature=0.9, seed=14, extra_args={"esamp": False}),
              "r4": SamplingParams(temperature=0.0),
              "r5": SamplingParams(temperature=1.0, top_k=5, seed=15, extra_args={"esamp": False})}
    new = [(r, params[r], prompts[r]) for r in prompts]
    twin = esamp.Trainer(32, rank=64, layers=2, slots=8, device="cpu", seed=0, ring_rows=64,
                         gamma_init=es.model.model.norm.weight.detach().float())
    core = es._esamp_status.core
    for step in range(4):
        out, want = es.step(new if step == 0 else ()), ref.step(new if step == 0 else ())
        got, exp = tokens(out), tokens(want)
        ids = es.input_batch.req_ids
        assert ids == ref.input_batch.req_ids
        for i, rid in enumerate(ids):
            if rid in ("r3", "r4", "r5"):
                assert got[i] == exp[i], (step, rid)
        # ESamp rows, recomputed from the ops with an independent trainer fed the same pairs, batched as the
        # adapter batches them (the LM head over all logits rows, one reweight over the ESamp rows)
        n = len(ids)
        tok_idx = torch.from_numpy(es.query_start_loc.np[1:n + 1] - 1).long()
        rows = [i for i, rid in enumerate(ids) if rid in ("r0", "r1", "r2")]
        x = core.capture_buffer.index_select(0, tok_idx[rows])
        t_all = es.hidden.index_select(0, tok_idx)
        t = t_all[rows]
        slots = torch.tensor([core.table.slot[core.key_of[ids[i]]] for i in rows])
        with torch.inference_mode():
            pred = twin.predict(x, slots)
            W = es.model.lm_head.weight
            lat = [j for j, i in enumerate(rows) if ids[i] == "r0"]
            lm_in = t_all.clone()
            lm_in[[rows[j] for j in lat]] = esamp.ops.mix_hidden(t[lat], pred[lat], 0.5)
            want_logits = torch.nn.functional.linear(lm_in, W)
            torch.testing.assert_close(es.logits_seen, want_logits, rtol=0, atol=0)   # latent row mixed, others not
            sps = [params[ids[i]] for i in rows]
            w, _ = esamp.ops.reweight(
                es.logits_seen[rows], pred, W,
                beta=torch.tensor([0.0 if ids[i] == "r0" else 0.5 for i in rows]),
                temperature=torch.tensor([sp.temperature for sp in sps]),
                top_k=torch.tensor([max(sp.top_k, 0) for sp in sps]), top_p=torch.tensor([sp.top_p for sp in sps]),
                seed=torch.tensor([sp.seed for sp in sps]),
                step=torch.tensor([len(prompts[ids[i]]) - 1 + step for i in rows]))
        assert got[rows].tolist() == w.tolist(), step
        twin.observe(x, t, slots)
    s = es._esamp_status.stats(sync=True)
    assert s["rows_esamp"] == 12 and s["rows_latent"] == 4 and s["rows_plain"] == 12
    assert s["trainer_rows_trained"] == 12 and s["requests_esamp"] == 3 and s["requests_plain"] == 3
    twin.synchronize()
    torch.testing.assert_close(core.trainer.state_dict()["params"], twin.state_dict()["params"], rtol=0, atol=0)


def test_v1_slots_warm_start_and_release():
    es = _v1_runner({"beta": 0.3, "log_interval_s": 0, "slots": 2, "warmup_steps": 3})
    core = es._esamp_status.core
    sp = SamplingParams(n=2, temperature=0.9, seed=5)
    kids = engine_request_ids("grp", sp)
    new = [(rid, s, [4, 5, 6, 7, 8]) for rid, s in kids]
    new.append(("solo", SamplingParams(temperature=1.0, seed=9), [9, 10, 11, 12, 13, 14]))
    new.append(("extra", SamplingParams(temperature=1.0, seed=3), [2, 3]))    # third group: no slot left
    es.step(new, chunk={"solo": 4})          # "solo": chunked prefill, completes in the next step
    assert [core.table.slot[core.key_of[rid]] for rid, _ in kids] == [0, 0] and "extra" not in core.key_of
    st = es._esamp_status.stats()
    assert st["warmup_groups"] == 1 and st["warmup_shared"] == 1 and st["requests_no_slot"] == 1
    es.step()
    st = es._esamp_status.stats()
    assert st["warmup_groups"] == 2 and st["warmup_partial"] == 1 and st["warmup_rows"] == 5 + 2
    assert st["warmup_row_updates"] == 3 * 7
    for _ in range(2):
        es.step()
    es.step(finished=[kids[0][0]])
    assert core.slots.resets == 0 and core.slots.slots_in_use == 2
    es.step(finished=[kids[1][0], "solo", "extra"])
    st = es._esamp_status.stats(sync=True)
    assert core.slots.resets == 2 and st["slots_in_use"] == 0 and st["live_requests"] == 0
    assert st["requests_finished"] == 3 and st["requests_esamp"] == 3
    assert st["trainer_rows_trained"] == st["rows_esamp"] + st["warmup_row_updates"]


def test_v1_processed_logprobs_and_calls_outside_execute_model():
    es = _v1_runner({"beta": 0.4, "log_interval_s": 0, "warmup_steps": 0}, logprobs_mode="processed_logprobs")
    ref = _v1_runner(None, logprobs_mode="processed_logprobs")
    new = [("a", SamplingParams(temperature=0.9, top_k=16, seed=1, logprobs=2), [1, 2, 3]),
           ("b", SamplingParams(temperature=0.9, seed=2, logprobs=2), [4, 5, 6]),
           ("p", SamplingParams(temperature=0.9, top_k=16, seed=3, logprobs=2, extra_args={"esamp": False}),
            [7, 8, 9])]
    core = es._esamp_status.core
    seen = {}
    orig = core.sample

    def spy(step, l, want_mixed=False):
        out = orig(step, l, want_mixed=want_mixed)
        seen["mixed"], seen["tokens"] = out[1].clone(), out[0].clone()
        return out

    core.sample = spy
    out, want = es.step(new), ref.step(new)
    lt = out.logprobs_tensors
    ids = es.input_batch.req_ids
    e = [i for i, r in enumerate(ids) if r != "p"]
    p = ids.index("p")
    assert torch.equal(lt.logprob_token_ids[e, 0].long(), seen["tokens"])
    lsm = torch.log_softmax(seen["mixed"], dim=-1)
    torch.testing.assert_close(lt.logprobs[e, 0], lsm.gather(1, seen["tokens"].view(-1, 1)).view(-1),
                               rtol=0, atol=1e-5)
    assert tokens(out)[p] == tokens(want)[p]
    torch.testing.assert_close(lt.logprobs[p], want.logprobs_tensors.logprobs[p], rtol=0, atol=0)
    # "b" has no filter and processed logprobs: latent mixing is allowed (nothing needs its unmixed logits)
    assert core.table.latent[core.key_of["b"]] and not core.table.latent[core.key_of["a"]]
    # compute_logits outside execute_model (prompt logprobs, dummy runs) is vLLM's, untouched
    h = torch.randn(3, 32)
    torch.testing.assert_close(es.model.compute_logits(h), torch.nn.functional.linear(h, es.model.lm_head.weight))
    assert es._esamp_status.stats()["rows_esamp"] == 2


def test_raw_logprobs_penalties_and_filters_keep_the_fused_path():
    opts = _common.request_options
    assert opts(SamplingParams(temperature=1.0, logprobs=1), "raw_logprobs").needs_raw_logits
    assert not opts(SamplingParams(temperature=1.0, logprobs=1), "processed_logprobs").needs_raw_logits
    assert opts(SamplingParams(temperature=1.0, presence_penalty=0.5), None).adjusts_logits
    assert opts(SamplingParams(temperature=1.0, logit_bias={3: 1.0}), None).adjusts_logits
    assert not opts(SamplingParams(temperature=1.0, bad_words=["x"]), None).adjusts_logits   # a mask
    es = _v1_runner({"beta": 0.4, "log_interval_s": 0, "warmup_steps": 0})
    core = es._esamp_status.core
    es.step([("lat", SamplingParams(temperature=0.9, seed=1), [1, 2]),
             ("lp", SamplingParams(temperature=0.9, seed=2, logprobs=1), [1, 2]),
             ("pen", SamplingParams(temperature=0.9, seed=3, repetition_penalty=1.2), [1, 2]),
             ("mp", SamplingParams(temperature=0.9, seed=4, min_p=0.1), [1, 2])])
    latent = {r: bool(core.table.latent[core.key_of[r]]) for r in ("lat", "lp", "pen", "mp")}
    assert latent == {"lat": True, "lp": False, "pen": False, "mp": False}
    off = _v1_runner({"beta": 0.4, "log_interval_s": 0, "warmup_steps": 0, "latent_mixing": False})
    off.step([("lat", SamplingParams(temperature=0.9, seed=1), [1, 2])])
    assert off._esamp_status.stats()["rows_latent"] == 0 and es._esamp_status.stats()["rows_latent"] == 1


def test_latent_and_fused_paths_sample_the_same_distribution():
    """SPEC 3: with no filter, latent mixing gives the mixed logits of the fused reweight without its dot
    products: the processed logits (vLLM's processed_logits mode) agree to float rounding, and so do the tokens
    drawn with the same seeds."""
    outs = {}
    for latent in (True, False):
        h = Harness({"beta": 0.5, "log_interval_s": 0, "warmup_steps": 0, "latent_mixing": latent}, max_reqs=16,
                    logprobs_mode="processed_logits")
        ids = [f"r{i}" for i in range(12)]
        for i, rid in enumerate(ids):
            h.add(rid, SamplingParams(temperature=0.7 + 0.05 * i, seed=40 + i, logprobs=-1))
        res = []
        for s in range(3):
            _, _, _, out, _ = h.step(ids, [6 + s] * 12, input_ids=np.arange(12) + 3 * s, reference=False)
            res.append((tokens(out).clone(), out.logprobs_tensors.logprobs.clone()))
        outs[latent] = (res, h.rt.counters["rows_latent"])
    assert outs[True][1] == 36 and outs[False][1] == 0
    for (t1, l1), (t2, l2) in zip(outs[True][0], outs[False][0]):
        torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-4)
        assert (t1 == t2).float().mean() >= 0.9


# ------------------------------------------------------------------------------------------------------------
# When ESamp cannot attach: the worker says so, the front end rejects requests asking for it
# ------------------------------------------------------------------------------------------------------------
def test_unknown_runner_is_reported_inactive(caplog):
    plugin.register()

    class OtherRunner:
        pass

    worker = SimpleNamespace(vllm_config=ns_config(32, 4, 16, {"beta": 0.3}), model_runner=OtherRunner())
    with caplog.at_level("WARNING", logger="vllm.esamp"):
        plugin._check_worker(worker)
    st = worker_base_mod.WorkerBase.esamp_stats(worker)
    assert st["active"] is False and "OtherRunner" in st["inactive_reason"] and st["fallback"] is False
    assert sum("INACTIVE in this worker" in r.message for r in caplog.records) == 1
    plugin._check_worker(worker)   # once per worker
    assert sum("INACTIVE in this worker" in r.message for r in caplog.records) == 1
    off = SimpleNamespace(vllm_config=ns_config(32, 4, 16, None), model_runner=OtherRunner())
    plugin._check_worker(off)
    assert worker_base_mod.WorkerBase.esamp_stats(off) == {}


def test_front_end_rejects_esamp_requests_when_inactive_unless_fallback():
    from esamp.integrations.vllm import _frontend

    class FakeEngine:
        def __init__(self, esamp_cfg, answers):
            self.vllm_config = ns_config(32, 4, 16, esamp_cfg)
            self.answers, self.rpcs, self.added = answers, 0, []

        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            assert method == "esamp_stats" and kwargs == {"sync": False}
            self.rpcs += 1
            return self.answers

        def add_request(self, request_id, prompt, params, **kw):
            self.added.append(request_id)

    FakeEngine.add_request = _frontend.wrap_add_request(FakeEngine.add_request)
    inactive = [{"active": False, "inactive_reason": "capture_layer 9 is out of range", "fallback": False}]
    eng = FakeEngine({"beta": 0.3}, inactive)
    with pytest.raises(VLLMValidationError, match="ESamp was requested but is inactive on this engine: "
                                                  "capture_layer 9 is out of range"):
        eng.add_request("r1", "p", SamplingParams(temperature=0.9))
    eng.add_request("r2", "p", SamplingParams(temperature=0.9, extra_args={"esamp": False}))   # opted out
    eng.add_request("r3", "p", params=SamplingParams(temperature=0.0))                          # greedy
    with pytest.raises(VLLMValidationError):
        eng.add_request("r4", "p", SamplingParams(temperature=0.9, extra_args={"esamp_beta": 0.2}))
    assert eng.added == ["r2", "r3"] and eng.rpcs == 1          # the workers are asked once
    fb = FakeEngine({"beta": 0.3, "fallback": True}, inactive)
    fb.add_request("r1", "p", SamplingParams(temperature=0.9))
    ok = FakeEngine({"beta": 0.3}, [{"active": True, "rows_esamp": 0}])
    ok.add_request("r1", "p", SamplingParams(temperature=0.9))
    assert fb.added == ["r1"] and ok.added == ["r1"]
    none = FakeEngine({"beta": 0.3}, [{}])                       # plugin missing in the workers
    with pytest.raises(VLLMValidationError, match="did not start in its workers"):
        none.add_request("r1", "p", SamplingParams(temperature=0.9))
    disabled = FakeEngine(None, inactive)
    disabled.add_request("r1", "p", SamplingParams(temperature=0.9))
    assert disabled.rpcs == 0 and disabled.added == ["r1"]
    with pytest.raises(_config.ConfigError, match="esamp.fallback: expected a boolean"):
        _config.resolve_engine_config({"esamp": {"fallback": "sometimes"}}, {})


# ------------------------------------------------------------------------------------------------------------
# The engine-independent core with plain tensors
# ------------------------------------------------------------------------------------------------------------
def test_core_table_grows_and_keys_are_reused():
    from esamp.integrations._core.runtime import ESampCore, RequestOptions
    model = TinyLM()
    core = ESampCore(_config.EngineConfig(slots=12, log_interval_s=0, warmup_steps=0), decoder=model.model,
                     lm_head_weight=model.lm_head.weight, hidden_size=32, dtype=torch.float32, device="cpu",
                     max_num_reqs=2, max_num_tokens=16, vocab_size=64)
    assert core.table.capacity == 8
    for i in range(13):                                   # more live requests than the table's first capacity
        core.add_request(f"q{i}", RequestOptions(temperature=1.0, seed=i))
    assert core.table.capacity == 16 and len(core.key_of) == 12 and core.counters["requests_no_slot"] == 1
    assert len(set(core.key_of.values())) == 12 and core.table.seed[core.key_of["q5"]] == 5
    k = core.key_of["q1"]
    core.remove_request("q1")
    core.add_request("again", RequestOptions(temperature=1.0))
    assert core.key_of["again"] == k and core.table.seed[k] >= 0    # unseeded: a random seed is drawn
    assert core.keys_for(["again", None, "nope"]).tolist() == [k, -1, -1]
    # a step with numpy indices: no ESamp row -> the LM-head input is returned as is
    h = torch.randn(3, 32)
    assert core.begin_step(np.array([-1, -1, -1]), h, np.arange(3), np.arange(3)) is h and core.step is None
