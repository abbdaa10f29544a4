"""Benign traffic that looks like a production embedding service's, built offline.

Every set is built from text installed on the machine; where a set is made by
a template over that text, it says so (the evaluation's table does too):

* ``keywords``: 1-3-word search queries -- content words (no stop words) taken
  in order from one natural sentence (Python stdlib docstrings). Templated.
* ``instruct``: the same sentences behind an embedding model's instruction
  prefix, ``"Represent this sentence for searching relevant passages: "``.
  Templated (the prefix is the real one of BGE-style retrieval models).
* ``faq``: short questions -- ``"How do I <verb> ...?"`` / ``"What does <fn> do?"``
  made from the first sentences of stdlib functions' docstrings (``"Return the
  number of ..."`` -> ``"How do I get the number of ...?"``). Templated.
* ``multilingual``: translated messages of the GNU/Debian tools installed in
  ``/usr/share/locale`` (gettext ``.mo`` catalogues: git, coreutils, ...), 12
  languages, 15-200 characters each. Real translations; what is installed varies by
  machine (the JSON records the count per language).
* ``code``: 1-6-line snippets of stdlib function bodies (real code).
* ``indexer``: whole docstring paragraphs (documents, not queries), sent by one
  allowlisted identity at 200 documents/s (real text).

Everything is split by a hash of its source (module or catalogue) into a
calibration half and an evaluation half, so that thresholds are never set on
the traffic they are judged on.
"""

from __future__ import annotations

import ast
import gettext
import hashlib
import random
import re
import sysconfig
from pathlib import Path

from benchmarks._guard_traffic import _SKIP

INSTRUCTION = "Represent this sentence for searching relevant passages: "
LANGS = ("de", "fr", "es", "it", "ru", "ja", "zh_CN", "ko", "pt_BR", "pl", "tr", "vi")
STOP = frozenset(
    (
        "a",
        "an",
        "the",
        "of",
        "to",
        "in",
        "on",
        "for",
        "and",
        "or",
        "is",
        "are",
        "be",
        "by",
        "with",
        "as",
        "at",
        "from",
        "that",
        "this",
        "it",
        "its",
        "if",
        "not",
        "no",
        "can",
        "will",
        "may",
        "must",
        "should",
        "into",
        "than",
        "then",
        "when",
        "which",
        "who",
        "whom",
        "whose",
        "what",
        "where",
        "how",
        "all",
        "any",
        "each",
        "every",
        "some",
        "such",
        "only",
        "also",
        "other",
        "more",
        "most",
        "one",
        "two",
        "these",
        "those",
        "there",
        "their",
        "they",
        "them",
        "we",
        "you",
        "your",
        "our",
        "i",
        "he",
        "she",
        "his",
        "her",
        "was",
        "were",
        "been",
        "being",
        "has",
        "have",
        "had",
        "do",
        "does",
        "did",
        "but",
        "so",
        "via",
        "per",
        "e",
        "g",
        "ie",
        "eg",
        "use",
        "used",
        "using",
        "return",
        "returns",
        "given",
        "new",
        "default",
    )
)
_WORD = re.compile(r"[A-Za-z][A-Za-z_-]{2,}")
_VERBS = {
    "Return": "get",
    "Returns": "get",
    "Get": "get",
    "Create": "create",
    "Convert": "convert",
    "Read": "read",
    "Write": "write",
    "Set": "set",
    "Remove": "remove",
    "Add": "add",
    "Parse": "parse",
    "Check": "check",
    "Compute": "compute",
    "Open": "open",
    "Close": "close",
    "Make": "make",
    "Find": "find",
    "Send": "send",
}


def half(key: str, calibration: bool) -> bool:
    """Is *key* (a module or catalogue) in the calibration half (or the evaluation one)?"""
    return (hashlib.sha256(key.encode()).digest()[0] % 2 == 0) == calibration


def keywords(sentences: list[str], n: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        words = [w.lower() for w in _WORD.findall(rng.choice(sentences))]
        words = [w for w in words if w not in STOP]
        if not words:
            continue
        k = rng.randint(1, min(3, len(words)))
        start = rng.randrange(len(words) - k + 1)
        out.append(" ".join(words[start : start + k]))
    return out


def instruct(sentences: list[str], n: int, rng: random.Random) -> list[str]:
    return [INSTRUCTION + s for s in rng.sample(sentences, min(n, len(sentences)))]


def stdlib_functions(calibration: bool) -> tuple[list[str], list[str], list[str]]:
    """(FAQ questions, code snippets, documents) from this interpreter's stdlib, in one
    pass over its sources (the *calibration* half of the modules, or the other)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    faq: list[str] = []
    code: list[str] = []
    docs: list[str] = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        if rel[0] in _SKIP or "tests" in rel or not half(".".join(rel), calibration):
            continue
        try:
            text = f.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node) or ""
                for para in re.split(r"\n\s*\n", doc):
                    para = " ".join(para.split())
                    if 30 <= len(para.split()) <= 200:
                        docs.append(para)
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc:
                first = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
                words = first.split()
                if 3 <= len(words) <= 16 and words[0] in _VERBS:
                    rest = " ".join(words[1:])
                    faq.append(f"How do I {_VERBS[words[0]]} {rest}?")
                elif 3 <= len(words) <= 16:
                    faq.append(f"What does {node.name} do in {rel[-1].removesuffix('.py')}?")
            body = node.body[1:] if ast.get_docstring(node) else node.body
            if body:
                a = body[0].lineno - 1
                b = min(getattr(body[-1], "end_lineno", a + 1) or a + 1, a + 6)
                snippet = "\n".join(lines[a:b]).strip()
                if 20 <= len(snippet) <= 400:
                    code.append(snippet)
    return sorted(set(faq)), sorted(set(code)), sorted(set(docs))


def multilingual(calibration: bool, per_lang: int = 400) -> dict[str, list[str]]:
    """language -> translated messages (4-30 words, no format directives) from the
    gettext catalogues installed under /usr/share/locale (the *calibration* half of the
    catalogues, or the other)."""
    out: dict[str, list[str]] = {}
    for lang in LANGS:
        d = Path("/usr/share/locale") / lang / "LC_MESSAGES"
        msgs: set[str] = set()
        for mo in sorted(d.glob("*.mo")) if d.is_dir() else []:
            if not half(mo.name, calibration):
                continue
            try:
                with mo.open("rb") as fh:
                    cat = gettext.GNUTranslations(fh)._catalog  # type: ignore[attr-defined]
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            for v in cat.values():
                if not isinstance(v, str):
                    continue
                v = " ".join(v.split())
                short = 15 <= len(v) <= 200 and len(v.split()) <= 30
                if short and "%" not in v and "{" not in v and "$" not in v:
                    msgs.add(v)
        if msgs:
            out[lang] = random.Random(lang).sample(sorted(msgs), min(per_lang, len(msgs)))
    return out
