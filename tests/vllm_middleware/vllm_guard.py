"""The inference guard inside vLLM's OpenAI server, wired as docs/GUARD.md says:
``--middleware vllm_guard.Guarded`` (tests/test_vllm.py starts its session server
with this folder, which holds nothing else, on PYTHONPATH). vLLM adds the class
without arguments, so the guard is built here, at import, in the API server process:
all-MiniLM-L6-v2 (its plaintext folder, ``SEALSTORE_TEST_GUARD_MODEL``) featurises the
queries; the model served lives in the engine process.

The policy the tests check over HTTP: a caller named by the ``x-sealstore-caller``
header is refused for 600 s once it sends over 20 queries a minute (the rate
detector, deterministic); the other detectors only log. No reference sample: the
extraction test is PRADA's Shapiro-Wilk (scipy, from the ``guard`` extra that the
Makefile installs into vLLM's venv), after 10 queries of a caller. Requests without
the header are the anonymous caller ``-``, exempt from the rate cap (the other tests
of the session send them). A request the guard fails on (scipy missing, say) is a 500:
the test's 200s show the Shapiro-Wilk test ran in the server.
"""

from __future__ import annotations

import os

from transformers import AutoModel, AutoTokenizer

from sealstore.loaders import GuardPolicy, guard
from sealstore.loaders.inference_guard import ExtractionPolicy, GuardMiddleware, RatePolicy

MINILM = os.environ["SEALSTORE_TEST_GUARD_MODEL"]
MAX_QUERIES = 20

policy = GuardPolicy(
    name="vllm-minilm",
    lockdown=None,
    responses={"rate": "refuse"},
    rate=RatePolicy(max_queries=MAX_QUERIES, exempt=("-",)),
    extraction=ExtractionPolicy(min_queries=10, every=5, window=20),
)
tok = AutoTokenizer.from_pretrained(MINILM)
encoder = guard(AutoModel.from_pretrained(MINILM).eval(), policy=policy, hook=False)


class Guarded(GuardMiddleware):
    guard = encoder
    tokenizer = tok
    # paths: the default, every path (vLLM's query routes with /v1/ and without).
