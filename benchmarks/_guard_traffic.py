"""Traffic for the inference guard: natural sentences, and two extraction attacks.

* Natural text: the sentences of the docstrings of Python's standard library
  (this interpreter's, read with ``ast`` -- nothing is imported), grouped by
  module. Deterministic for one Python version.
* Attack 1, random token sequences: uniform over the vocabulary's ordinary
  tokens (ids past BERT's ``[unused]`` block), 5-40 of them.
* Attack 2, Jacobian-style augmentation (Papernot et al. 2017, as used by the
  attacks PRADA was built against): a few natural seed sentences; each round
  every sample so far gets a perturbed copy -- one token swapped for one of
  its 20 nearest neighbours in the model's input-embedding space, a small
  step in the direction the model is most sensitive to, as a text attacker
  without gradients approximates it -- and the new copies are the next
  queries. The set doubles each round.
* Natural-data attacker (informational): queries drawn from the same natural
  distribution as benign traffic (a KnockoffNets-style attacker with public
  text). PRADA-style detection is not expected to catch it; it is reported
  to show that limit plainly.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

_DOC = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_SKIP = {"test", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip"}
FIRST_ORDINARY = 999  # bert-base-uncased: [PAD] 0, [unused*] 1-998 (with [UNK] [CLS] [SEP] [MASK])


def stdlib_sentences(limit_modules: int | None = None) -> dict[str, list[str]]:
    """module -> its docstring sentences of 5-60 words (deduplicated, sorted)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, set[str]] = {}
    seen: set[str] = set()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        if rel[0] in _SKIP or "tests" in rel:
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        mod = ".".join(rel)
        for node in ast.walk(tree):
            if not isinstance(node, _DOC):
                continue
            doc = ast.get_docstring(node)
            for para in re.split(r"\n\s*\n", doc or ""):
                for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
                    if 5 <= len(s.split()) <= 60 and s not in seen:
                        seen.add(s)
                        out.setdefault(mod, set()).add(s)
        if limit_modules is not None and len(out) >= limit_modules:
            break
    return {m: sorted(v) for m, v in sorted(out.items())}


def split(corpus: dict[str, list[str]], reference: int, seed: int = 0) -> tuple[list[str], dict]:
    """(reference sentences, the rest by module): the reference is drawn at random from
    the whole corpus and removed from what callers send."""
    rng = random.Random(seed)
    every = [s for m in corpus for s in corpus[m]]
    ref = set(rng.sample(every, reference))
    rest = {m: [s for s in v if s not in ref] for m, v in corpus.items()}
    return sorted(ref), {m: v for m, v in rest.items() if v}


def benign_random(rest: dict[str, list[str]], n: int, rng: random.Random) -> list[str]:
    """A caller asking about anything: sentences drawn from the whole corpus."""
    pool = [s for v in rest.values() for s in v]
    return rng.sample(pool, n)


def benign_topic(rest: dict[str, list[str]], n: int, rng: random.Random) -> list[str]:
    """A caller with a few topics: sentences of 3-15 modules (more when they run out)."""
    mods = sorted(rest)
    chosen = rng.sample(mods, rng.randint(3, 15))
    pool = [s for m in chosen for s in rest[m]]
    while len(pool) < n:
        chosen += rng.sample(mods, 3)
        pool = [s for m in chosen for s in rest[m]]
    return rng.sample(pool, n)


def random_tokens(vocab: int, n: int, rng: random.Random, cls: int, sep: int) -> list[list[int]]:
    """Attack 1: random ordinary tokens, 5-40 of them, framed by [CLS] ... [SEP]."""
    return [
        [cls, *(rng.randrange(FIRST_ORDINARY, vocab) for _ in range(rng.randint(5, 40))), sep]
        for _ in range(n)
    ]


def augmentation(
    seeds: list[list[int]], n: int, rng: random.Random, neighbours: Callable[[int], list[int]]
) -> list[list[int]]:
    """Attack 2: Jacobian-style augmentation from *seeds* (token ids with [CLS]/[SEP])."""
    current = [list(s) for s in seeds]
    queries = [list(s) for s in seeds]
    while len(queries) < n:
        grown = []
        for ids in current:
            ids = list(ids)
            if len(ids) > 2:
                p = rng.randint(1, len(ids) - 2)
                ids[p] = rng.choice(neighbours(ids[p]))
            grown.append(ids)
        current += grown
        queries += grown
    return queries[:n]


def embedding_neighbours(weight: Any, k: int = 20) -> Callable[[int], list[int]]:
    """token id -> its k nearest tokens by cosine in the input-embedding matrix (cached)."""
    import torch

    unit = torch.nn.functional.normalize(weight.detach().float(), dim=1)
    cache: dict[int, list[int]] = {}

    def near(tok: int) -> list[int]:
        if tok not in cache:
            sims = unit[tok] @ unit.T
            cache[tok] = torch.topk(sims, k + 1).indices.tolist()[1:]
        return cache[tok]

    return near
