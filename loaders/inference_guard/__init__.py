"""The inference guard: watch who calls a loaded model, and how, for attacks on it.

``guard(model, policy=GuardPolicy(...))`` installs a forward pre-hook on a
torch module and returns the same module. Every forward call is attributed
to a caller -- ``model(..., caller="alice")`` (the keyword is taken out
before the model sees its arguments), else the context variable set by
``with as_caller("alice"):``, else ``"-"`` -- and observed; the model's
outputs are never touched. In a model server, where one forward call batches
many callers' requests, each request is screened instead, once, before
batching: ``Guard.screen(caller, inputs)`` or the ASGI middleware
``GuardMiddleware`` (``serving.py``); a guarded module's ``generate()`` counts
its prompt once. Four detectors, per caller, each under the caller's own lock
(docs/GUARD.md):

- **rate / volume**: queries per minute and per hour, against fixed caps and
  against a multiple of the caller's own usual rate (an EWMA of its past
  windows), above a floor;
- **extraction** (after PRADA, Juuti et al., EuroS&P 2019): each query's
  distance to the nearest of the caller's earlier queries, on the model's
  input embeddings (mean-pooled token embeddings); over a sliding window,
  the distribution of those distances is compared with natural traffic's --
  the reference sample's nearest-neighbour distances -- by a one-sided
  Kolmogorov-Smirnov statistic (synthetic queries grown by perturbation sit
  far closer to each other than natural ones), or by PRADA's own
  Shapiro-Wilk normality test where there is no reference sample;
- **out-of-distribution**: the share of a caller's recent queries whose
  embedding norm falls outside the reference's, or whose nearest reference
  query is farther than the reference's own nearest neighbours are;
- **mmd**: the maximum mean discrepancy between the caller's recent query
  embeddings and the reference sample, against a threshold that
  ``Guard.calibrate`` sets from benign callers' traffic at a target
  false-positive rate (with the KS and ood thresholds).

A finding is written to the audit log (the store's, for a model loaded from
a store), raised as an alert (webhook, log, ``sealstore_guard_alerts_total``)
and answered as configured: ``log``, ``throttle`` (the caller gets a few
calls a second) or ``refuse`` (the caller gets none), for ``penalty``
seconds or until ``lift``. A lockdown declared at the broker that released
the model's key stops the guarded model too: the guard polls the broker's
``/v1/standing`` and refuses every call while it is locked down, and fails
closed if the broker stops answering.

The package: ``policy.py`` (what to watch for, how to answer), ``detectors.py``
(features, per-caller windows, the four tests), ``hook.py`` (the guard on a
module: attribution, answers, calibration, audit, metrics), ``serving.py`` (the
ASGI middleware), ``standing.py`` (lockdown sources).
torch is imported only in this package, scipy only for the Shapiro-Wilk test.
"""

from __future__ import annotations

from sealstore.loaders.inference_guard.detectors import (
    Finding,
    Reference,
    default_features,
    ks_below,
)
from sealstore.loaders.inference_guard.hook import (
    ANONYMOUS,
    CALLER,
    DEFAULT_KIND,
    HELP,
    Guard,
    as_caller,
    guard,
    guard_loaded,
    screened,
)
from sealstore.loaders.inference_guard.policy import (
    DETECTORS,
    RESPONSES,
    ExtractionPolicy,
    GuardPolicy,
    MmdPolicy,
    OodPolicy,
    RatePolicy,
    Target,
)
from sealstore.loaders.inference_guard.serving import GuardMiddleware, texts_of, tokenized
from sealstore.loaders.inference_guard.standing import brokers_for, standing_sources

# Everything the one-module guard offered before it was split, importable from here.
__all__ = [
    "ANONYMOUS",
    "CALLER",
    "DEFAULT_KIND",
    "DETECTORS",
    "HELP",
    "RESPONSES",
    "ExtractionPolicy",
    "Finding",
    "Guard",
    "GuardMiddleware",
    "GuardPolicy",
    "MmdPolicy",
    "OodPolicy",
    "RatePolicy",
    "Reference",
    "Target",
    "as_caller",
    "brokers_for",
    "default_features",
    "guard",
    "guard_loaded",
    "ks_below",
    "screened",
    "standing_sources",
    "texts_of",
    "tokenized",
]
