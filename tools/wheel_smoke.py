"""Smoke test of an INSTALLED esamp (the built wheel in a fresh virtual environment): run with that environment's
python, outside the source tree, e.g. (what .ci/run does):

    cd "$(mktemp -d)" && env -i HOME="$HOME" PATH="$WVENV/bin" "$WVENV/bin/python" -I /path/to/wheel_smoke.py

Checks, each with a real expectation: esamp imports from the environment's site-packages (not a source tree),
no compiler / CMake / ninja is on PATH, the build information matches the running torch, every operator runs on
CPU (reweight, reweight_logits, mix_hidden, capture, distiller_forward / train_step / reset) with results checked
against identities of SPEC 3 and plain PyTorch, esamp.Distiller and esamp.Trainer train, esamp.hf.generate runs
vanilla and ESamp on a tiny random Llama (nothing downloaded), and `esamp --help` works.  Exit status 0 = all good.
"""
import math
import os
import shutil
import subprocess
import sys
import sysconfig


def check(cond, what):
    if not cond:
        print(f"wheel smoke: FAILED: {what}", flush=True)
        sys.exit(1)
    print(f"  ok  {what}", flush=True)


def main() -> int:
    import torch

    import esamp

    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    pkg = os.path.realpath(os.path.dirname(esamp.__file__))
    print(f"wheel smoke: esamp {esamp.__version__} from {pkg}; torch {torch.__version__}; python {sys.version.split()[0]}")
    check(pkg.startswith(site + os.sep), f"esamp is imported from this environment's site-packages ({site})")
    check(not any(os.path.exists(os.path.join(p, "CMakeLists.txt")) for p in (os.getcwd(), os.path.dirname(pkg))),
          "no source tree around the imported package or the working directory")
    tools = [t for t in ("cc", "gcc", "c++", "g++", "clang", "cmake", "ninja", "nvcc") if shutil.which(t)]
    check(not tools, f"no compiler, CMake or ninja on PATH (found: {tools or 'none'})")
    info = esamp.ops.build_info()
    check(esamp.ops.torch_mismatch(info) is None and info["torch_version"] == torch.__version__,
          f"built against the running torch ({info['torch_version']}, C++11 ABI {info['torch_cxx11_abi']}, "
          f"CUDA kernels {info['cuda_kernels']})")

    # ------------------------------------------------------------------ operators on CPU
    g = torch.Generator().manual_seed(0)
    B, V, H = 4, 37, 16
    logits = torch.randn(B, V, generator=g) * 3
    W = torch.randn(V, H, generator=g) / math.sqrt(H)
    pred = torch.randn(B, H, generator=g)
    tok, lp = esamp.ops.reweight(logits, pred, W, beta=0.25, min_p=0.05, seed=7, step=3)
    tok2, lp2 = esamp.ops.reweight(logits, pred, W, beta=0.25, min_p=0.05, seed=7, step=3)
    check(tok.shape == (B,) and tok.dtype == torch.int64 and bool(((tok >= 0) & (tok < V)).all())
          and bool((lp <= 0).all()) and torch.equal(tok, tok2) and torch.equal(lp, lp2),
          "ops.reweight: tokens in range, logprobs <= 0, same seed and step give the same draw")
    mixed = esamp.ops.reweight_logits(logits, pred, W, beta=0.25, top_p=0.9)
    want = 1.25 * logits - 0.25 * (pred @ W.T)
    fin = torch.isfinite(mixed)
    check(bool(fin.any(1).all()) and torch.allclose(mixed[fin], want[fin], rtol=1e-5, atol=1e-5)
          and bool(fin[torch.arange(B), logits.argmax(1)].all()),
          "ops.reweight_logits: (1 + b) l - b W p on the top-p candidates (arg max kept), -inf elsewhere")
    greedy, glp = esamp.ops.reweight(logits, pred, W, beta=0.25, temperature=0.0, seed=0, step=0)
    check(torch.equal(greedy, logits.argmax(1)) and bool((glp == 0).all()), "ops.reweight: T = 0 is greedy")
    h, p = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    check(torch.allclose(esamp.ops.mix_hidden(h, p, beta=0.5), 1.5 * h - 0.5 * p, rtol=1e-6, atol=1e-6),
          "ops.mix_hidden: (1 + b) h - b p")
    out = torch.zeros(2 * B, H)
    res = torch.randn(B, H, generator=g)
    esamp.ops.capture(h, res, out)
    check(torch.allclose(out[:B], h + res) and bool((out[B:] == 0).all()), "ops.capture: out[:N] = hidden + residual")

    # ------------------------------------------------------------------ esamp.Distiller (forward, train_step, reset)
    d = esamp.Distiller(hidden_size=H, rank=8, layers=2, slots=3, seed=1)
    x, t = torch.randn(12, H, generator=g), torch.randn(12, H, generator=g)
    slots = torch.tensor([0, 1] * 6)
    y0 = d.forward(x, slots)
    first = d.train_step(x, t, slots)
    for _ in range(40):
        last = d.train_step(x, t, slots)
    check(y0.shape == (12, H) and bool(torch.isfinite(y0).all()) and bool((last[:2] < first[:2]).all())
          and math.isnan(float(last[2])) and d.stats()["rows_trained"] == 41 * 12,
          f"Distiller: 41 train steps lower both busy slots' losses ({first[:2].tolist()} -> {last[:2].tolist()}); "
          f"idle slot NaN; counters")
    kept = d.slot_state_dict(0)
    d.reset([1])
    fresh = esamp.Distiller(hidden_size=H, rank=8, layers=2, slots=3, seed=1)
    check(all(torch.equal(d.slot_state_dict(1)[k], fresh.slot_state_dict(1)[k]) for k in kept)
          and all(torch.equal(d.slot_state_dict(0)[k], kept[k]) for k in kept) and d.nbytes_per_slot > 0,
          "Distiller.reset([1]) re-initialises slot 1 as new and leaves slot 0 alone")

    # ------------------------------------------------------------------ esamp.Trainer (worker thread on CPU)
    tr = esamp.Trainer(H, 8, 2, 3, seed=1)
    ref = esamp.Distiller(H, 8, 2, 3, seed=1)
    for _ in range(5):
        tr.observe(x, t, slots)
        ref.train_step(x, t, slots)
    q = tr.predict(x, slots)
    st = tr.stats()
    check(torch.equal(q, ref.forward(x, slots)) and st["rows_trained"] == 60 and st["steps"] == 5,
          "Trainer: predictions see every observed update (bit-identical to Distiller), counters")

    # ------------------------------------------------------------------ esamp.hf.generate on a tiny random Llama
    from tokenizers import Tokenizer, models as tkmodels, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = 64
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tk = Tokenizer(tkmodels.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokz = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=2,
                                         bos_token_id=1, pad_token_id=0)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 2.0 / math.sqrt(32))
    prompts = ["w1 w2 w3", "w7"]
    van = esamp.hf.generate(model, tokz, prompts, n=3, max_new_tokens=6, esamp=None, seed=0, progress=False)
    zero = esamp.hf.generate(model, tokz, prompts, n=3, max_new_tokens=6, esamp=esamp.ESampConfig(beta=0.0),
                             seed=0, progress=False)
    es = esamp.hf.generate(model, tokz, prompts, n=3, max_new_tokens=6, seed=0, progress=False,
                           esamp=esamp.ESampConfig(rank=8, warmup_steps=2))
    check(len(es.texts) == 2 and all(len(gr) == 3 for gr in es.texts) and van.token_ids == zero.token_ids
          and es.stats["trainer"]["rows_trained"] > 0,
          "hf.generate: 2 prompts x 3 samples; beta = 0 equals vanilla token for token; the distiller trained")

    # ------------------------------------------------------------------ the console script
    exe = shutil.which("esamp")
    check(exe is not None and os.path.realpath(exe).startswith(os.path.realpath(sys.prefix)),
          f"the esamp console script is this environment's ({exe})")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    check(r.returncode == 0 and "demo" in r.stdout and "generate" in r.stdout, "`esamp --help` lists demo and generate")
    r = subprocess.run([exe, "demo", "-n", "-1"], capture_output=True, text=True, timeout=120)
    check(r.returncode == 2 and r.stderr.strip() == "esamp demo: error: -n: expected an int >= 1, got -1",
          "`esamp demo -n -1`: one-line error, exit status 2 (checked by esamp_cli before torch loads)")
    print("wheel smoke: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
