"""The OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``; the wheel's ``vllm serve`` CLI
fails with PackageNotFoundError) with the esamp plugin, on 127.0.0.1 and a free port, driven by the ``openai``
client.  The server is started and stopped by PID by the fixture.  Its workers' ESamp counters are read through
vLLM's dev-mode ``/collective_rpc`` endpoint (``VLLM_SERVER_DEV_MODE=1``) with the ``esamp_stats`` worker RPC.
"""
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from _engine_util import ENGINE_TIMEOUT, engine_env, kill_group

STREAMS = 32
STREAM_TOKENS = 24
MAX_NUM_SEQS = 32


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status


class Server:
    def __init__(self, model, log_path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.model = model
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--max-model-len", "512",
               "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", "256", "--enforce-eager",
               "--served-model-name", "tiny", "--disable-log-stats",
               "--additional-config", json.dumps({"esamp": {"beta": 0.25, "log_interval_s": 5}})]
        self.log = open(log_path, "w")
        self.log_path = log_path
        self.proc = subprocess.Popen(cmd, env=engine_env(VLLM_SERVER_DEV_MODE="1"), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout=ENGINE_TIMEOUT):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if _get(self.base + "/health") == 200:
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n=6000):
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-n:]

    def stats(self):
        req = urllib.request.Request(self.base + "/collective_rpc", method="POST",
                                     data=json.dumps({"method": "esamp_stats"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            res = json.loads(r.read())["results"]
        assert len(res) == 1, res
        return res[0]

    def stop(self):
        """SIGTERM to the server's process group (the server, its engine core and worker), SIGKILL if needed."""
        kill_group(self.proc, grace=60)
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    srv = Server(tiny_model, str(tmp_path_factory.mktemp("server") / "server.log"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_esamp_is_active_in_the_server(server):
    s = server.stats()
    assert s["active"] is True and s["runner"] == "V1 model runner", s


def test_completions_with_per_request_esamp_options(server, client):
    before = server.stats()
    r = client.completions.create(model="tiny", prompt="w1 w2 w3 w4 w5", n=2, temperature=0.9, max_tokens=8,
                                  seed=5, extra_body={"vllm_xargs": {"esamp_beta": 0.4}, "ignore_eos": True})
    assert len(r.choices) == 2 and r.usage.completion_tokens == 16
    assert all(c.finish_reason == "length" for c in r.choices)
    after = server.stats()
    assert after["requests_esamp"] - before["requests_esamp"] == 2      # both children sampled with ESamp
    assert after["rows_esamp"] - before["rows_esamp"] >= 16


def test_chat_with_esamp_off_and_options(server, client):
    before = server.stats()
    msgs = [{"role": "user", "content": "w3 w4 w5 w6"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0.9, max_tokens=6, seed=1,
                                       extra_body={"vllm_xargs": {"esamp": "off"}, "ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    mid = server.stats()
    assert mid["requests_esamp"] == before["requests_esamp"]            # opted out
    assert mid["requests_plain"] == before["requests_plain"] + 1
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=1.1, max_tokens=6, seed=2,
                                       extra_body={"vllm_xargs": {"esamp_beta": 0.3, "esamp_warmup_steps": 0},
                                                   "ignore_eos": True})
    assert r.usage.completion_tokens == 6
    after = server.stats()
    assert after["requests_esamp"] == mid["requests_esamp"] + 1
    assert after["warmup_groups"] == mid["warmup_groups"]               # warmup_steps 0 for this request


@pytest.mark.parametrize("xargs, needle", [({"esamp_beta": -1}, "esamp_beta"), ({"esamp": "maybe"}, "esamp"),
                                           ({"esamp_warmup_steps": 1.5}, "warmup_steps")])
def test_malformed_option_is_http_400(server, client, xargs, needle):
    import openai
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="tiny", prompt="w1 w2", max_tokens=4, temperature=0.9,
                                  extra_body={"vllm_xargs": xargs})
    assert ei.value.status_code == 400 and needle in str(ei.value)


def test_concurrent_streams_with_cancellations_leak_no_slot(server):
    """32 concurrent streaming requests; every third is cancelled after a few chunks (the client closes the
    stream, the server aborts the request).  The others complete; afterwards every distiller slot is free,
    every request the workers saw has finished, and the trainer trained rows."""
    import openai
    before = server.stats()

    async def one(aclient, i):
        stream = await aclient.completions.create(
            model="tiny", prompt=" ".join(f"w{(i * 7 + j) % 400}" for j in range(6 + i % 5)), stream=True,
            temperature=0.8 + 0.01 * i, max_tokens=STREAM_TOKENS, seed=1000 + i, extra_body={"ignore_eos": True})
        chunks, finish = 0, None
        async for ev in stream:
            chunks += 1
            finish = ev.choices[0].finish_reason or finish
            if i % 3 == 0 and chunks >= 3:
                await stream.close()
                return "cancelled", chunks
        return finish, chunks

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            return await asyncio.gather(*(one(aclient, i) for i in range(STREAMS)))
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    cancelled = [r for i, r in enumerate(results) if i % 3 == 0]
    completed = [r for i, r in enumerate(results) if i % 3 != 0]
    assert all(r[0] == "cancelled" for r in cancelled)
    assert all(r[0] == "length" for r in completed), results
    # A worker learns that requests finished at the next scheduler step: run one more (plain) request.
    import openai as _o
    _o.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0).completions.create(
        model="tiny", prompt="w1", max_tokens=1, temperature=0.0)
    deadline = time.time() + 120
    while True:
        s = server.stats()
        if s["live_requests"] == 0 and s["slots_in_use"] == 0 or time.time() > deadline:
            break
        time.sleep(1.0)
    new = s["requests_esamp"] - before["requests_esamp"]
    assert new >= len(completed), (s, before)          # cancelled ones may have been aborted before scheduling
    assert s["requests_finished"] == s["requests_esamp"], s        # no lost request
    assert s["live_requests"] == 0 and s["slots_in_use"] == 0, s  # no leaked slot
    assert s["slot_resets"] - before["slot_resets"] == new
    assert s["rows_esamp"] - before["rows_esamp"] >= len(completed) * STREAM_TOKENS
    assert s["trainer_rows_trained"] > before["trainer_rows_trained"] > 0
    assert s["trainer_rows_trained"] == s["rows_esamp"] + s["warmup_row_updates"]
    assert s["rows_no_lm_input"] == 0 and s["steps_skipped"] == 0
    assert "Traceback" not in server.tail(200000)
