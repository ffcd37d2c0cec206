"""SGLang integration (esamp.integrations.sglang) against SGLang 0.5.23's real classes, on CPU tensors.

SGLang's real ``Sampler`` (pytorch backend), ``SamplingBatchInfo``, ``LogitsProcessorOutput``, ``SamplingParams``,
``ModelRunner.sample`` and the real ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (layer boundaries, residual stream,
RMSNorm, EAGLE-3 capture) run here.  Two stand-ins: the attention kernel (a causal SDPA over the tokens of each
sequence, in place of a RadixAttention backend with a KV cache) and the scheduler objects (``Req`` / forward batch
as plain objects with the fields the adapter reads).  The model runner is a plain object holding the model and the
sampler; ``ModelRunner.sample`` itself is SGLang's (with the plugin's wrapper).
"""
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import esamp
from cpu_engine_env import cpu_engine_environ

pytestmark = pytest.mark.sglang

import esamp.integrations.sglang as plugin  # noqa: E402

plugin.register()  # before SGLang is imported: the hooks install on import, as in a real process

# On a CPU machine SGLang imports vLLM's _custom_ops when vLLM is installed (moe_runner/triton_utils), which fixes
# vLLM's platform for the whole process.  Import it under the environment tests/test_vllm.py selects vLLM's CPU
# platform with (restored afterwards), so that both suites run in one pytest process in either order.
with cpu_engine_environ():
    try:
        import sglang  # noqa: F401
        from sglang.srt import runtime_context as rc
        from sglang.srt.server_args import ServerArgs
        import sglang.srt.layers.sampler  # noqa: F401  (the import that reaches vLLM)
    except ImportError as e:  # pragma: no cover
        if os.environ.get("CI") == "true":
            raise ImportError(f"SGLang is not importable under CI ({e}); tools/install_sglang.sh must install it") from e
        pytest.skip(f"SGLang is not importable ({type(e).__name__}: {e}); install it with tools/install_sglang.sh",
                    allow_module_level=True)

import tempfile  # noqa: E402

_SA = ServerArgs(model_path="dummy", device="cpu", sampling_backend="esamp")
rc.publish(_SA, role="scheduler", ranks=rc.SpawnRanks(world_rank=0, gpu_id=None))
from sglang.srt.distributed import parallel_state as _ps  # noqa: E402

if not _ps.model_parallel_is_initialized():
    _ps.init_distributed_environment(backend="gloo", world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"file://{tempfile.mktemp()}")
    _ps.initialize_model_parallel()

from sglang.srt.layers import sampler as sgl_sampler  # noqa: E402
from sglang.srt.layers.logits_processor import LogitsProcessorOutput  # noqa: E402
from sglang.srt.layers.sampler import Sampler, create_sampler  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context  # noqa: E402
from sglang.srt.model_executor.model_runner import ModelRunner  # noqa: E402
from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo  # noqa: E402
from sglang.srt.sampling.sampling_params import TOP_K_ALL, SamplingParams  # noqa: E402

from esamp.integrations.sglang import _config, _runtime  # noqa: E402
from esamp.integrations.sglang._sampler import ESampSampler  # noqa: E402
from esamp.integrations._core.slots import SlotManager  # noqa: E402

V, H = 97, 32


# ------------------------------------------------------------------------------------------------ stand-ins
class Req:
    def __init__(self, rid, sp, prompt_len=4):
        self.rid = rid
        self.sampling_params = sp
        self.return_sampling_mask = False
        self.full_untruncated_fill_ids = list(range(prompt_len))
        self.extend_end = prompt_len
        self.done = False

    def finished(self):
        return self.done


class FB:
    """The forward-batch fields ModelRunner.sample and the adapter read."""

    def __init__(self, reqs, mode, sampling_info, positions, extend_lens=None):
        self.forward_mode = mode
        self.sampling_info = sampling_info
        self.positions = positions
        self.seq_lens = positions + 1
        self.return_logprob = False
        self.top_logprobs_nums = [0] * len(reqs)
        self.token_ids_logprobs = [None] * len(reqs)
        self.extend_seq_lens_cpu = extend_lens
        self.extend_prefix_lens_cpu = [0] * len(reqs) if extend_lens is not None else None
        self._esamp_reqs = list(reqs)
        self._esamp_last_chunk = [True] * len(reqs) if extend_lens is not None else None


def sampling_info(sps, device="cpu"):
    """SamplingBatchInfo exactly as from_schedule_batch fills its sampling fields."""
    return SamplingBatchInfo(
        temperatures=torch.tensor([s.temperature for s in sps], dtype=torch.float).view(-1, 1),
        top_ps=torch.tensor([s.top_p for s in sps], dtype=torch.float),
        top_ks=torch.tensor([s.top_k for s in sps], dtype=torch.int32),
        min_ps=torch.tensor([s.min_p for s in sps], dtype=torch.float),
        is_all_greedy=all(s.top_k <= 1 for s in sps), is_any_greedy=any(s.top_k <= 1 for s in sps),
        need_top_p_sampling=any(s.top_p != 1.0 for s in sps), need_top_k_sampling=any(s.top_k != TOP_K_ALL for s in sps),
        need_min_p_sampling=any(s.min_p > 0 for s in sps), vocab_size=V, device=device)


class Runner:
    """A model-runner stand-in: SGLang's ModelRunner.sample runs on it unchanged."""

    def __init__(self, model, sampler, max_reqs=8):
        self.model = model
        self.sampler = sampler
        self.device = "cpu"
        self.is_draft_worker = False
        self.max_running_requests = max_reqs
        self.max_total_num_tokens = 256
        self.sampling_observer = None
        self.watermark_state = None
        self.ngram_embedding_manager = types.SimpleNamespace(update_after_decode=lambda **kw: None)

    def _preprocess_logits(self, logits_output, sampling_info, observer=None):
        return ModelRunner._preprocess_logits(self, logits_output, sampling_info, observer)

    def sample(self, logits_output, fb):
        return ModelRunner.sample(self, logits_output, fb)


class Attn:
    """Causal attention per sequence (stands in for the RadixAttention backend)."""

    def __init__(self, lens):
        self.lens = lens

    def forward(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        Hq, Hk, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        outs, s = [], 0
        for n in self.lens:
            qi = q[s:s + n].reshape(n, Hq, D).transpose(0, 1)
            ki = k[s:s + n].reshape(n, Hk, D).transpose(0, 1).repeat_interleave(Hq // Hk, 0)
            vi = v[s:s + n].reshape(n, Hk, -1).transpose(0, 1).repeat_interleave(Hq // Hk, 0)
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=layer.scaling)
            outs.append(o.transpose(0, 1).reshape(n, -1))
            s += n
        return torch.cat(outs)


def tiny_model(arch, layers=3):
    from transformers import LlamaConfig, Qwen2Config
    kw = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    if arch == "llama":
        from sglang.srt.models.llama import LlamaForCausalLM as M
        from transformers import LlamaForCausalLM as HF
        cfg = LlamaConfig(**kw)
    else:
        from sglang.srt.models.qwen2 import Qwen2ForCausalLM as M
        from transformers import Qwen2ForCausalLM as HF
        cfg = Qwen2Config(**kw)
    torch.manual_seed(0)
    m = M(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    hf = HF(cfg).eval()
    nq, nk = 32, 16
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(m.model.embed_tokens.weight[:V])
        hf.lm_head.weight.copy_(m.lm_head.weight[:V])
        for lay, hl in zip(m.model.layers, hf.model.layers):
            qkv = lay.self_attn.qkv_proj
            for dst, w in zip((hl.self_attn.q_proj, hl.self_attn.k_proj, hl.self_attn.v_proj),
                              qkv.weight.split([nq, nk, nk], 0)):
                dst.weight.copy_(w)
            if getattr(qkv, "bias", None) is not None:
                for dst, b in zip((hl.self_attn.q_proj, hl.self_attn.k_proj, hl.self_attn.v_proj),
                                  qkv.bias.split([nq, nk, nk], 0)):
                    dst.bias.copy_(b)
            hl.self_attn.o_proj.weight.copy_(lay.self_attn.o_proj.weight)
            g, u = lay.mlp.gate_up_proj.weight.split([64, 64], 0)
            hl.mlp.gate_proj.weight.copy_(g)
            hl.mlp.up_proj.weight.copy_(u)
            hl.mlp.down_proj.weight.copy_(lay.mlp.down_proj.weight)
            hl.input_layernorm.weight.copy_(lay.input_layernorm.weight)
            hl.post_attention_layernorm.weight.copy_(lay.post_attention_layernorm.weight)
        hf.model.norm.weight.copy_(m.model.norm.weight)
    return m, hf


class _ModelFB(types.SimpleNamespace):
    """The forward-batch fields the model reads; the optional ones (CP metadata, MoE padding, ...) are None."""

    def __getattr__(self, name):
        return None


def forward(m, ids, lens):
    fb = _ModelFB(forward_mode=ForwardMode.EXTEND, residual_stream=None, batch_size=len(lens))
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=Attn(lens)), forward_batch=fb):
        return m.model(ids, pos, fb)


def esamp_sampler(**cfg):
    return ESampSampler(_config._check_engine(_config.EngineConfig(**cfg)))


def attach(model, sampler, max_reqs=8):
    r = Runner(model, sampler, max_reqs)
    rt = plugin.attach(r)
    assert rt is not None, sampler.esamp_disabled_reason
    return r, rt


def sgl_candidate_set(probs, sp):
    """SGLang's pytorch backend: the token ids with non-zero filtered probability."""
    _, filt, idx, _ = sgl_sampler.top_k_top_p_min_p_sampling_from_probs_torch(
        probs.clone(), torch.tensor([sp.top_k], dtype=torch.int32), torch.tensor([sp.top_p]),
        torch.tensor([sp.min_p]), sp.min_p > 0, None, torch.zeros(1, dtype=torch.int64), return_filtered_probs=True)
    return set(idx[0][filt[0] > 0].tolist()), filt[0], idx[0]


COMBOS = [dict(temperature=0.7), dict(temperature=1.0, top_k=5), dict(temperature=0.9, top_p=0.8),
          dict(temperature=1.3, min_p=0.1), dict(temperature=0.8, top_k=10, top_p=0.7),
          dict(temperature=0.6, top_p=0.9, min_p=0.05), dict(temperature=1.1, top_k=3, min_p=0.2),
          dict(temperature=0.5, top_k=20, top_p=0.95, min_p=0.02)]


def sp_of(custom=None, **kw):
    s = SamplingParams(custom_params=custom, max_new_tokens=16, **kw)
    s.verify(V)
    return s


def run_step(runner, reqs, logits, positions, mode=ForwardMode.DECODE, return_logprob=False, extend_lens=None):
    sps = [r.sampling_params for r in reqs]
    si = sampling_info(sps)
    fb = FB(reqs, mode, si, positions, extend_lens)
    fb.return_logprob = return_logprob
    out = LogitsProcessorOutput(next_token_logits=logits.clone())
    ids = runner.sample(out, fb)
    return ids, out


# ------------------------------------------------------------------------------------------------ config, slots
def test_engine_config_from_env():
    cfg = _config.resolve_engine_config({"ESAMP_SGLANG_CONFIG": '{"beta": 0.4, "rank": 16}'})
    assert cfg.beta == 0.4 and cfg.rank == 16 and cfg.resolved_slots(12) == 12
    assert _config.resolve_engine_config({"ESAMP_SGLANG": "0", "ESAMP_SGLANG_CONFIG": '{"beta": 0.4}'}) is None
    with pytest.raises(_config.ConfigError, match="esamp.beta"):
        _config.resolve_engine_config({"ESAMP_SGLANG_CONFIG": '{"beta": -1}'})
    with pytest.raises(_config.ConfigError, match="unknown key 'betaa'"):
        _config.resolve_engine_config({"ESAMP_SGLANG_CONFIG": '{"betaa": 1}'})
    with pytest.raises(_config.ConfigError, match="base_backend"):
        _config.resolve_engine_config({"ESAMP_SGLANG_CONFIG": '{"base_backend": "ascend"}'})


def test_request_config_forms_and_validation():
    e = _config.EngineConfig(default_on=False)
    assert not _config.request_config(None, e).enabled
    rc1 = _config.request_config({"esamp": {"beta": 0.5, "seed": 7, "warmup_steps": 3}}, e)
    assert (rc1.enabled, rc1.beta, rc1.seed, rc1.warmup_steps) == (True, 0.5, 7, 3)
    assert _config.request_config({"esamp_beta": 0.1}, e).enabled
    assert not _config.request_config({"esamp": "off"}, _config.EngineConfig()).enabled
    g = _config.request_config({"esamp_group": "abc", "esamp_index": 2}, e)
    assert (g.group, g.index) == ("abc", 2)
    # an ESamp server rejects malformed entries at SamplingParams.verify (HTTP 400), naming the key
    with pytest.raises(ValueError, match="esamp.beta"):
        SamplingParams(custom_params={"esamp": {"beta": "high"}}).verify(V)
    with pytest.raises(ValueError, match="unknown key"):
        SamplingParams(custom_params={"esamp": {"bta": 1}}).verify(V)
    SamplingParams(custom_params={"other": 1}).verify(V)


def test_slot_manager_groups():
    resets = []
    sm = SlotManager(2, on_reset=resets.extend)
    assert sm.acquire("a", "g") == 0 and sm.acquire("b", "g") == 0 and sm.acquire("c") == 1
    assert sm.acquire("d") == -1 and sm.exhausted == 1
    assert sm.release("a") is None and resets == []
    assert sm.release("b") == 0 and resets == [0]
    assert sm.acquire("d") == 0
    shared = SlotManager(1, shared=True, on_reset=resets.extend)
    assert shared.acquire("x") == 0 == shared.acquire("y") and shared.release("x") is None


# ------------------------------------------------------------------------------------------------ sampling
@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_plugin_registers_backend():
    from sglang.srt.arg_groups.choices import SAMPLING_BACKEND_CHOICES
    assert "esamp" in SAMPLING_BACKEND_CHOICES
    assert isinstance(create_sampler("esamp"), ESampSampler)
    assert type(create_sampler("pytorch")) is Sampler
    for target in (ModelRunner.load_model, ModelRunner.sample, SamplingParams.verify):
        assert getattr(target, "_esamp_wrapped", False)


@pytest.mark.parametrize("combo", COMBOS, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in COMBOS])
def test_beta0_candidate_sets_and_greedy_equal_pytorch_backend(llama, combo):
    m, _ = llama
    runner, rt = attach(m, esamp_sampler(beta=0.0, warmup_steps=0))
    torch.manual_seed(1)
    B = 6
    logits = torch.randn(B, V) * 3
    reqs = [Req(f"r{i}", sp_of({"esamp": {"beta": 0.0, "seed": 100 + i}}, **combo)) for i in range(B - 2)]
    reqs += [Req("greedy", sp_of(temperature=0.0)), Req("plain", sp_of({"esamp": False}, **combo))]
    pos = torch.arange(B, dtype=torch.int64) + 3
    # reference: SGLang's own sampler (pytorch backend) on the same batch, same torch RNG state
    with rc.get_exec().kernel.override(sampling_backend="pytorch"):
        torch.manual_seed(5)
        ref = Sampler()(LogitsProcessorOutput(next_token_logits=logits.clone()),
                        sampling_info([r.sampling_params for r in reqs]), False, [0] * B, [None] * B, pos)
    torch.manual_seed(5)
    ids, _ = run_step(runner, reqs, logits, pos)
    assert rt.counters["rows_esamp"] == B - 2
    assert ids[B - 2] == logits[B - 2].argmax() == ref[B - 2]       # greedy row: SGLang's argmax
    assert ids[B - 1] == ref[B - 1]                                  # opted-out row: SGLang's token, bit for bit
    sp = reqs[0].sampling_params
    for i in range(B - 2):
        z = logits[i:i + 1] / sp.temperature
        probs = torch.softmax(z, dim=-1)
        want, _, _ = sgl_candidate_set(probs, sp)
        L = _runtime.sglang_support_size(probs, torch.tensor([sp.top_k]), torch.tensor([sp.top_p]),
                                         torch.tensor([sp.min_p]))
        mixed = esamp.ops.reweight_logits(logits[i:i + 1], torch.zeros(1, H), m.lm_head.weight.detach()[:V], beta=0.0,
                                          temperature=sp.temperature, top_k=L, top_p=1.0, min_p=0.0)
        got = set(torch.nonzero(torch.isfinite(mixed[0])).flatten().tolist())
        assert got == want
        # beta = 0: the mixed logits are SGLang's z on the candidate set
        idx = sorted(want)
        torch.testing.assert_close(mixed[0, idx], z[0, idx], rtol=0, atol=1e-5)
        assert int(ids[i]) in want
        # the token is esamp.ops.reweight's with (request seed, position)
        tok, _ = esamp.ops.reweight(logits[i:i + 1], torch.zeros(1, H), m.lm_head.weight.detach()[:V], beta=0.0,
                                    temperature=sp.temperature, top_k=L, seed=torch.tensor([100 + i]),
                                    step=pos[i:i + 1])
        assert int(ids[i]) == int(tok)


def test_beta0_chi_square_random_path(llama):
    from scipy.stats import chisquare
    m, _ = llama
    runner, rt = attach(m, esamp_sampler(beta=0.0, warmup_steps=0), max_reqs=2000)
    torch.manual_seed(2)
    row = torch.randn(1, V) * 2
    N = 2000
    combo = dict(temperature=0.8, top_k=30, top_p=0.9)
    reqs = [Req(f"c{i}", sp_of({"esamp": {"beta": 0.0}}, **combo)) for i in range(N)]
    ids, _ = run_step(runner, reqs, row.expand(N, V), torch.full((N,), 7, dtype=torch.int64))
    probs = torch.softmax(row / 0.8, dim=-1)
    want, filt, idx = sgl_candidate_set(probs, reqs[0].sampling_params)
    assert set(ids.tolist()) <= want
    p = torch.zeros(V, dtype=torch.float64)
    p[idx.long()] = filt.double()
    p /= p.sum()
    cand = sorted(want)
    obs = np.bincount(ids.numpy(), minlength=V)[cand]
    exp = p[cand].numpy() * N
    assert chisquare(obs, exp).pvalue > 1e-3
    wrong = torch.softmax(row / 1.6, dim=-1)[0].double()[cand]
    assert chisquare(obs, (wrong / wrong.sum()).numpy() * N).pvalue < 1e-6


def test_beta_positive_changes_tokens_and_reports_esamp_logprob(llama):
    m, _ = llama
    runner, rt = attach(m, esamp_sampler(beta=1.0, warmup_steps=0))
    torch.manual_seed(3)
    B = 8
    logits = torch.randn(B, V) * 2
    combo = dict(temperature=0.9, top_k=40, top_p=0.95)
    reqs = [Req(f"p{i}", sp_of({"esamp": {"beta": 1.0, "seed": i}}, **combo)) for i in range(B)]
    rt.x_buffer[:B] = torch.randn(B, H)
    rt.t_buffer[:B] = torch.randn(B, H)
    pos = torch.arange(B, dtype=torch.int64)
    W = m.lm_head.weight.detach()[:V]
    pred = rt.trainer.predict(rt.x_buffer[:B], torch.arange(B))  # the step's prediction (fresh slots 0..B-1)
    ids, out = run_step(runner, reqs, logits, pos, return_logprob=True)
    assert [rt.slots.slot_of(r.rid) for r in reqs] == list(range(B))
    probs = torch.softmax(logits / 0.9, dim=-1)
    L = _runtime.sglang_support_size(probs, torch.full((B,), 40), torch.full((B,), 0.95), torch.zeros(B))
    tok, lp = esamp.ops.reweight(logits, pred, W, beta=1.0, temperature=0.9, top_k=L, seed=torch.arange(B),
                                 step=pos)
    assert torch.equal(ids.long(), tok)
    torch.testing.assert_close(out.next_token_logprobs.float(), lp, rtol=1e-4, atol=1e-4)
    for i in range(B):
        assert int(ids[i]) in sgl_candidate_set(probs[i:i + 1], reqs[i].sampling_params)[0]
    zero, _ = esamp.ops.reweight(logits, pred, W, beta=0.0, temperature=0.9, top_k=L, seed=torch.arange(B), step=pos)
    assert not torch.equal(tok, zero)  # beta = 1 moves some tokens (same Gumbel noise)
    assert rt.counters["steps"] == 1
    rt.trainer.synchronize()
    assert rt.trainer.stats()["rows_trained"] == B


# ------------------------------------------------------------------------------------------------ slots
def test_parallel_sample_tagging_and_shared_slot(llama):
    m, _ = llama
    runner, rt = attach(m, esamp_sampler(beta=0.5, warmup_steps=0), max_reqs=2)
    shared_sp = SamplingParams(n=3, temperature=0.9, max_new_tokens=8)
    warm = types.SimpleNamespace(sampling_params=SamplingParams(n=3, temperature=0.9, max_new_tokens=0))
    groups = {}
    plugin.tag_parallel_sample(warm, groups)
    assert warm.sampling_params.custom_params is None  # SGLang's prefix warm-up request is left alone
    kids = []
    for i in range(3):
        obj = types.SimpleNamespace(sampling_params=shared_sp)
        plugin.tag_parallel_sample(obj, groups)
        kids.append(obj.sampling_params)
    assert len({k.custom_params["esamp_group"] for k in kids}) == 1 and groups == {}
    assert [k.custom_params["esamp_index"] for k in kids] == [0, 1, 2]
    reqs = [Req(f"kid{i}", k) for i, k in enumerate(kids)] + [Req("solo", sp_of(temperature=0.9))]
    B = len(reqs)
    torch.manual_seed(4)
    rt.x_buffer[:B] = torch.randn(B, H)
    rt.t_buffer[:B] = torch.randn(B, H)
    ids, _ = run_step(runner, reqs, torch.randn(B, V), torch.zeros(B, dtype=torch.int64))
    assert {rt.slots.slot_of(f"kid{i}") for i in range(3)} == {0} and rt.slots.slot_of("solo") == 1
    seeds = [r._esamp_info.seed for r in reqs[:3]]
    assert len(set(seeds)) == 3  # the n samples get distinct noise
    # a third group finds no slot: SGLang's sampler for it, counted
    extra = Req("extra", sp_of(temperature=0.9))
    run_step(runner, [extra], torch.randn(1, V), torch.zeros(1, dtype=torch.int64))
    assert rt.counters["requests_no_slot"] == 1 and rt.slots.slot_of("extra") == -1
    # finish two children: the group keeps its slot and its state
    rt.trainer.synchronize()
    before = rt.trainer.state_dict()["params"][0].clone()
    for r in reqs[:2]:
        r.done = True
    rt.release_finished(reqs)
    rt.trainer.synchronize()
    assert rt.slots.slot_of("kid2") == 0 and torch.equal(rt.trainer.state_dict()["params"][0], before)
    # the last child is aborted (SGLang's send_abort_output): the slot is reset to a fresh distiller
    fake = types.SimpleNamespace(Scheduler=type("S", (), {"send_abort_output": lambda self, a, r: None}))
    plugin._patch_scheduler(fake)
    fake.Scheduler().send_abort_output(None, reqs[2])
    rt.trainer.synchronize()
    assert rt.slots.slot_of("kid2") == -1 and rt.slots.resets == 1
    fresh = esamp.Trainer(H, rank=rt.rank, layers=2, slots=rt.num_slots, seed=0, ring_rows=64,
                          gamma_init=m.model.norm.weight.detach().float())
    assert torch.equal(rt.trainer.state_dict()["params"][0], fresh.state_dict()["params"][0])
    assert not torch.equal(before, fresh.state_dict()["params"][0])
    # the freed slot goes to the next group
    nxt = Req("next", sp_of(temperature=0.9))
    run_step(runner, [nxt], torch.randn(1, V), torch.zeros(1, dtype=torch.int64))
    assert rt.slots.slot_of("next") == 0


def test_output_streamer_wrapper_releases_finished(llama):
    m, _ = llama
    runner, rt = attach(m, esamp_sampler(warmup_steps=0))
    reqs = [Req("s0", sp_of(temperature=0.9)), Req("s1", sp_of(temperature=0.9))]
    run_step(runner, reqs, torch.randn(2, V), torch.zeros(2, dtype=torch.int64))
    fake = types.SimpleNamespace(SchedulerOutputStreamer=type("O", (), {"stream_output": lambda self, r, lp: None}))
    plugin._patch_output_streamer(fake)
    reqs[1].done = True
    fake.SchedulerOutputStreamer().stream_output(reqs, False)
    assert rt.slots.slot_of("s0") >= 0 and rt.slots.slot_of("s1") == -1
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
    assert getattr(SchedulerOutputStreamer.stream_output, "_esamp_wrapped", False)


# ------------------------------------------------------------------------------------------------ capture
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_capture_matches_independent_forward(arch):
    m, hf = tiny_model(arch)
    runner, rt = attach(m, esamp_sampler(warmup_steps=2, warmup_max_rows=64))
    lens = [5, 3]
    torch.manual_seed(6)
    ids = torch.randint(0, V, (sum(lens),))
    h = forward(m, ids, lens)
    with torch.no_grad():
        xs, ts = [], []
        s = 0
        for n in lens:
            o = hf.model(ids[None, s:s + n], position_ids=torch.arange(n)[None], output_hidden_states=True)
            xs.append(o.hidden_states[1][0])   # residual stream after layer 0
            ts.append(o.last_hidden_state[0])  # after the final norm: the LM-head input
            s += n
    x_ref, t_ref = torch.cat(xs), torch.cat(ts)
    N = sum(lens)
    torch.testing.assert_close(rt.x_buffer[:N], x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rt.t_buffer[:N], t_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, t_ref, rtol=1e-5, atol=1e-5)
    # SGLang's own EAGLE-3 capture at the same point gives the same x
    m.set_eagle3_layers_to_capture([0])
    try:
        _, aux = forward(m, ids, lens)
    finally:
        m.capture_aux_hidden_states = False
        m.model.layers_to_capture = []
    torch.testing.assert_close(rt.x_buffer[:N], aux[0], rtol=0, atol=0)
    # a prefill step: warm start on every prompt position, then the sampled rows' pairs
    reqs = [Req("w0", sp_of(temperature=0.9), 5), Req("w1", sp_of(temperature=0.9), 3)]
    last = torch.tensor([4, 7])
    logits = (h[last] @ m.lm_head.weight.detach()[:V].T)
    run_step(runner, reqs, logits, torch.tensor([4, 2]), mode=ForwardMode.EXTEND, extend_lens=lens)
    rt.trainer.synchronize()
    assert rt.counters["warmup_groups"] == 2 and rt.counters["warmup_updates"] == 2
    ref = esamp.Trainer(H, rank=rt.rank, layers=2, slots=rt.num_slots, seed=0, ring_rows=64,
                        gamma_init=m.model.norm.weight.detach().float())
    slots = torch.tensor([0] * 5 + [1] * 3)
    for _ in range(2):
        ref.observe(x_ref, t_ref, slots)
    ref.observe(x_ref[last], t_ref[last], torch.tensor([0, 1]))
    ref.synchronize()
    a, b = rt.trainer.state_dict(), ref.state_dict()
    torch.testing.assert_close(a["params"], b["params"], rtol=1e-4, atol=1e-5)
    assert rt.trainer.stats()["rows_trained"] == 2 * 8 + 2


# ------------------------------------------------------------------------------------------------ safety
def test_disabled_backend_is_sglangs_sampler(llama, monkeypatch):
    """ESAMP_SGLANG=0 with --sampling-backend esamp: no runtime, SGLang's tokens bit for bit."""
    m, _ = llama
    monkeypatch.setenv("ESAMP_SGLANG", "0")
    s = plugin._make_sampler()
    r = Runner(m, s)
    assert plugin.attach(r) is None and s.esamp_runtime is None
    torch.manual_seed(8)
    logits = torch.randn(5, V)
    sps = [sp_of(**c) for c in COMBOS[:5]]
    pos = torch.zeros(5, dtype=torch.int64)
    torch.manual_seed(9)
    got = s(LogitsProcessorOutput(next_token_logits=logits.clone()), sampling_info(sps), False, [0] * 5, [None] * 5,
            pos)
    with rc.get_exec().kernel.override(sampling_backend="pytorch"):
        torch.manual_seed(9)
        ref = Sampler()(LogitsProcessorOutput(next_token_logits=logits.clone()), sampling_info(sps), False, [0] * 5,
                        [None] * 5, pos)
    assert torch.equal(got, ref)
    # a plain model runner is untouched
    assert plugin.attach(Runner(m, Sampler())) is None


def test_unsupported_configuration_warns_once(llama, caplog):
    m, _ = llama
    s = esamp_sampler(capture_layer=2)  # needs a following layer: the tiny model has 3
    with caplog.at_level("WARNING", logger="sglang.esamp"):
        assert plugin.attach(Runner(m, s)) is None
    assert "inactive: capture_layer 2" in caplog.text and s.esamp_disabled_reason


_PLUGIN_PROBE = textwrap.dedent(r"""
    import sys, importlib.metadata as md
    sys.path.insert(0, sys.argv[1])
    eps = [ep for ep in md.entry_points(group="sglang.srt.plugins") if ep.name == "esamp"]
    assert eps and eps[0].value == "esamp.integrations.sglang:register", eps
    from sglang.srt.plugins import load_plugins
    load_plugins()
    heavy = [m for m in ("sglang.srt.layers.sampler", "sglang.srt.model_executor.model_runner") if m in sys.modules]
    from sglang.srt.arg_groups.choices import SAMPLING_BACKEND_CHOICES
    import esamp.integrations.sglang as p
    print("OK", "esamp" in SAMPLING_BACKEND_CHOICES, p._registered, heavy)
""")


def test_plugin_loads_through_sglang_entry_point(tmp_path):
    """SGLang's own load_plugins() finds the entry point declared in pyproject.toml, runs register() in a fresh
    process, and that imports none of the model-runner modules (cheap in the tokenizer / detokenizer processes)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "pyproject.toml")).read()
    assert '[project.entry-points."sglang.srt.plugins"]\nesamp = "esamp.integrations.sglang:register"' in text
    dist = tmp_path / "esamp_sglang_probe-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: esamp-sglang-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text('[sglang.srt.plugins]\nesamp = esamp.integrations.sglang:register\n')
    # The esamp under test (installed package, or the working tree with tools/build_inplace.sh's _C.so link).
    here = os.path.dirname(os.path.dirname(os.path.abspath(esamp.__file__)))
    env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""),
               SGLANG_PLUGINS="esamp")
    env.pop("ESAMP_SGLANG_CONFIG", None)
    out = subprocess.run([sys.executable, "-c", _PLUGIN_PROBE, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK True True []" in out.stdout, out.stdout + out.stderr[-2000:]


def test_forward_batch_and_model_runner_wrappers(llama):
    """The ForwardBatch.init_new and ModelRunner.load_model wrappers (applied to stand-in classes with SGLang's
    signatures): requests and last-chunk flags are kept only for an ESamp runner; load_model attaches."""
    import asyncio
    m, _ = llama

    class FakeFB:
        @classmethod
        def init_new(cls, batch, model_runner, **kw):
            return types.SimpleNamespace(forward_mode=batch.mode)

    mod = types.SimpleNamespace(ForwardBatch=FakeFB)
    plugin._patch_forward_batch(mod)
    assert getattr(FakeFB.init_new, "_esamp_wrapped", False) and isinstance(FakeFB.__dict__["init_new"], classmethod)
    a, b = Req("a", sp_of(temperature=0.9), 6), Req("b", sp_of(temperature=0.9), 6)
    b.extend_end = 3  # b's prefill has another chunk to go
    batch = types.SimpleNamespace(reqs=[a, b], mode=ForwardMode.EXTEND)
    plain = FakeFB.init_new(batch, Runner(m, Sampler()), capture_hidden_mode=None)
    assert not hasattr(plain, "_esamp_reqs")
    runner, rt = attach(m, esamp_sampler(warmup_steps=0))
    runner._esamp_runtime = rt
    fb = FakeFB.init_new(batch, runner)
    assert fb._esamp_reqs == [a, b] and fb._esamp_last_chunk == [True, False]
    batch.reqs.append(Req("c", sp_of(temperature=0.9)))  # SGLang extends batch.reqs in place on merge
    assert len(fb._esamp_reqs) == 2

    class FakeMR:
        def __init__(self, sampler):
            self.sampler, self.model, self.device, self.is_draft_worker = sampler, None, "cpu", False
            self.max_running_requests, self.max_total_num_tokens = 4, 64

        def load_model(self):
            self.model = m

        def sample(self, logits_output, forward_batch):
            return getattr(self.__dict__.get("_esamp_runtime"), "_fb", None)

    plugin._patch_model_runner(types.SimpleNamespace(ModelRunner=FakeMR))
    mr = FakeMR(esamp_sampler(warmup_steps=0))
    mr.load_model()
    assert mr._esamp_runtime is mr.sampler.esamp_runtime is not None
    assert mr.sample(None, "the-batch") == "the-batch" and mr._esamp_runtime._fb is None
    draft = FakeMR(esamp_sampler())
    draft.is_draft_worker = True
    draft.load_model()
    assert draft.sampler.esamp_runtime is None and draft.sampler.esamp_disabled_reason == "draft model runner"

    # the tokenizer manager tags n > 1 children only on an ESamp server
    sent = []

    class FakeTM:
        def __init__(self, backend):
            self.server_args = types.SimpleNamespace(sampling_backend=backend)

        async def _send_one_request(self, obj):
            sent.append(obj.sampling_params.custom_params)

    plugin._patch_tokenizer_manager(types.SimpleNamespace(TokenizerManager=FakeTM))
    sp = SamplingParams(n=2, temperature=0.9)
    for tm in (FakeTM("pytorch"), FakeTM("esamp")):
        for _ in range(2):
            asyncio.run(tm._send_one_request(types.SimpleNamespace(sampling_params=sp)))
    assert sent[:2] == [None, None] and sent[2]["esamp_group"] == sent[3]["esamp_group"]
    assert [sent[2]["esamp_index"], sent[3]["esamp_index"]] == [0, 1]


def test_capture_callbacks_trace_without_graph_breaks():
    """The capture subclasses (input-boundary callback, final-norm output) inside a module with SGLang's layer
    signature trace under torch.compile(fullgraph=True) with no graph break, for two batch sizes, and fill their
    buffers like eager mode.  (SGLang's own layer-boundary code is not compiled here: its CPU stand-in setup breaks
    graphs for reasons of its own.)"""
    from esamp.integrations.sglang._capture import install_input_capture, install_output_capture

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(H, H)

        def forward(self, positions, hidden_states, forward_batch, capture_output=None):
            out = self.lin(hidden_states)
            if capture_output is not None:
                capture_output(out + hidden_states, owned=True)
            return out

    class Norm(torch.nn.Module):
        def forward(self, x, residual=None):
            return (x * 2 + residual, residual) if residual is not None else x * 2

    torch.manual_seed(10)
    layer, norm = Layer(), Norm()
    xb, tb = torch.zeros(16, H), torch.zeros(16, H)
    install_input_capture(layer, xb)
    install_output_capture(norm, tb)
    seen = []

    def model(x):
        h = layer(None, x, None, capture_output=lambda v, owned=False: seen.append(1))
        return norm(h, x)[0]

    ex = torch._dynamo.explain(model)(torch.randn(4, H))
    assert ex.graph_break_count == 0
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (3, 7):
        x = torch.randn(n, H)
        xb.zero_(), tb.zero_()
        with torch.no_grad():
            out = compiled(x)
            h = layer.lin(x)
        torch.testing.assert_close(xb[:n], h + x)
        torch.testing.assert_close(tb[:n], out)
        assert xb[n:].abs().sum() == 0
