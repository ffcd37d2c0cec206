"""Helpers of tests/engine (imported by its conftest and test modules; no vLLM import here)."""
import json
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 512
HIDDEN = 128
# Generous: an engine starts in ~20 s on an idle 2-core machine, but minutes when the machine is busy (these
# tests run niced); the limit only guards against a hang.
ENGINE_TIMEOUT = int(os.environ.get("ESAMP_ENGINE_TEST_TIMEOUT", "1800"))


def kill_group(proc, grace=30):
    """SIGTERM, then SIGKILL, to the process group of ``proc`` (started with start_new_session=True)."""
    import signal
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass


def engine_env(**extra):
    """Environment for an engine subprocess: loopback only, small KV cache, one thread, the test's esamp."""
    import esamp
    env = dict(os.environ)
    esamp_root = os.path.dirname(os.path.dirname(os.path.abspath(esamp.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (esamp_root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")          # else the engine's channel binds the host's address
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")         # GiB
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("ESAMP_VLLM", None)
    env.pop("ESAMP_VLLM_CONFIG", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def build_tiny_model(d):
    """A random 2-layer Llama (H = 128, 2 heads of 64 -- the CPU attention kernels need head_dim >= 32),
    a vocabulary of 512 words, saved as safetensors with a word-level tokenizer and a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, os.path.dirname(HERE))
    from tiny_models import word_tokenizer

    tok = word_tokenizer(VOCAB, chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=2, bos_token_id=1,
                      pad_token_id=0, max_position_embeddings=1024, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 2.0 / math.sqrt(HIDDEN))   # peaked, not degenerate, logits
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def in_process(**extra):
    """Environment for an offline engine that runs in one process (engine core and worker in the driver):
    one import of vLLM instead of three, which matters on a busy 2-core machine."""
    return engine_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", **extra)


def run_llm(tmp_path, name, engine, phases, *, env=None, timeout=ENGINE_TIMEOUT):
    """Runs _driver.py (one offline engine) and returns its JSON result, with the engine's log under "log".
    The driver gets its own process group, killed as a whole on timeout (no orphaned engine processes)."""
    spec_path = tmp_path / f"{name}.spec.json"
    out_path = tmp_path / f"{name}.out.json"
    log_path = tmp_path / f"{name}.log"
    spec_path.write_text(json.dumps({"engine": engine, "phases": phases}))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_driver.py"), str(spec_path), str(out_path)],
                                env=env or engine_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise AssertionError(f"engine run {name!r} timed out after {timeout} s; log tail:\n"
                                 f"{log_path.read_text()[-6000:]}") from None
    text = log_path.read_text()
    assert rc == 0, f"engine run {name!r} failed (rc {rc}); log tail:\n{text[-6000:]}"
    out = json.loads(out_path.read_text())
    out["log"] = text
    return out
