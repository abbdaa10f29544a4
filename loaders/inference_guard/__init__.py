"""The inference guard: watch who calls a loaded model, and how, for attacks on it.

``guard(model, policy=GuardPolicy(...))`` installs a forward pre-hook on a
torch module and returns the same module. Every forward call is attributed
to a caller -- ``model(..., caller="alice")`` (the keyword is taken out
before the model sees its arguments), else the context variable set by
``with as_caller("alice"):``, else ``"-"`` -- and observed; the model's
outputs are never touched. Three detectors, per caller (docs/GUARD.md):

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
  query is farther than the reference's own nearest neighbours are.

A finding is written to the audit log (the store's, for a model loaded from
a store), raised as an alert (webhook, log, ``sealstore_guard_alerts_total``)
and answered as configured: ``log``, ``throttle`` (the caller gets a few
calls a second) or ``refuse`` (the caller gets none), for ``penalty``
seconds or until ``lift``. A lockdown declared at the broker that released
the model's key stops the guarded model too: the guard polls the broker's
``/v1/standing`` and refuses every call while it is locked down, and fails
closed if the broker stops answering.

torch is imported only here, scipy only for the Shapiro-Wilk test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from sealstore.errors import InferenceRefused, KeyReleaseDenied
from sealstore.watch import Alerts, Metrics, serve_metrics

__all__ = [
    "CALLER",
    "ExtractionPolicy",
    "Guard",
    "GuardPolicy",
    "OodPolicy",
    "RatePolicy",
    "as_caller",
    "guard",
]

log = logging.getLogger("sealstore.guard")

CALLER: ContextVar[str | None] = ContextVar("sealstore_caller", default=None)
ANONYMOUS = "-"
RESPONSES = ("log", "throttle", "refuse")
DETECTORS = ("rate", "volume", "extraction", "ood")
_EPS = 1e-6  # a distance below this is the same query again: it teaches nothing new

HELP = {
    "sealstore_guard_calls_total": ("counter", "Guarded forward calls by result."),
    "sealstore_guard_queries_total": ("counter", "Samples (batch rows) observed."),
    "sealstore_guard_findings_total": ("counter", "Findings by detector and response."),
    "sealstore_guard_alerts_total": ("counter", "Alerts raised, by kind."),
    "sealstore_guard_audit_failures_total": ("counter", "Findings not written to the audit log."),
    "sealstore_guard_observe_seconds": ("histogram", "Time the guard adds to a forward call."),
}
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


def _check_caller(caller: Any) -> str:
    if not isinstance(caller, str) or not 0 < len(caller) <= 128 or not caller.isprintable():
        raise ValueError(f"a caller id is 1-128 printable characters, not {caller!r:.60}")
    return caller


@contextlib.contextmanager
def as_caller(caller: str) -> Iterator[None]:
    """Attribute the guarded forward calls made inside the block to *caller*."""
    token = CALLER.set(_check_caller(caller))
    try:
        yield
    finally:
        CALLER.reset(token)


# -- policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RatePolicy:
    """Queries (batch rows) per caller in a short and a long sliding window.

    A window's count is a finding when it exceeds its cap (``max_*``; None:
    no cap), or when it exceeds both its floor (``floor``, ``volume_floor``)
    and ``factor`` times the caller's usual count (an EWMA over the caller's
    past windows; a new caller has only the floor).
    """

    enabled: bool = True
    window: float = 60.0
    max_queries: int | None = None
    floor: int = 1_000
    volume_window: float = 3600.0
    max_volume: int | None = None
    volume_floor: int = 20_000
    factor: float = 10.0


@dataclass(frozen=True)
class ExtractionPolicy:
    """The PRADA-style test on each caller's nearest-previous-query distances.

    ``test``: ``"ks"`` (against the reference sample; the default when there
    is one) or ``"shapiro"`` (PRADA's normality test; the default without).
    A window is a finding when its one-sided KS statistic is above
    ``ks_threshold``, or its Shapiro-Wilk W below ``shapiro_threshold``.
    ``history``: earlier queries kept per caller (default: the reference's
    size, so that distances compare like with like; else 1000).
    """

    enabled: bool = True
    test: str = "auto"
    window: int = 100
    every: int = 10
    min_queries: int = 50
    ks_threshold: float = 0.6
    shapiro_threshold: float = 0.85
    history: int | None = None


@dataclass(frozen=True)
class OodPolicy:
    """Out-of-distribution share of a caller's last ``window`` queries.

    A query is out of distribution when its embedding norm is outside the
    reference's ``[q, 1-q]`` quantiles (``norm_quantile``) or its distance to
    the nearest reference query is above the reference's own
    ``nn_quantile`` nearest-neighbour distance. Needs a reference sample.
    """

    enabled: bool = True
    window: int = 50
    min_queries: int = 20
    max_fraction: float = 0.5
    norm_quantile: float = 0.005
    nn_quantile: float = 0.99


@dataclass(frozen=True)
class GuardPolicy:
    """What the guard watches for and how it answers; see docs/GUARD.md.

    Args:
        reference: natural inputs of this model, featurized when the guard is
            attached (at load time): a tensor of token ids, a mapping such as a
            tokenizer's output (``input_ids``, ``attention_mask``), or a list
            of either. The extraction (KS) and out-of-distribution detectors
            need it; a few hundred to a few thousand inputs.
        features: ``fn(args, kwargs) -> Tensor[batch, dim] | None``, the
            embedding of each row of a forward call (default: mean-pooled input
            embeddings for token ids, the rows themselves for float inputs).
        response: what a finding does by default: ``log``, ``throttle`` or
            ``refuse``; ``responses`` overrides it per detector.
        penalty: seconds a throttle or refusal lasts (None: until ``lift``).
        throttle_rate: calls per second a throttled caller is allowed.
        require_caller: refuse calls that name no caller.
        webhook: http(s) URL alerts are POSTed to.
        audit: where findings are recorded for a model not loaded from a store
            (a path or URL; default ``$SEALSTORE_AUDIT``, else
            ``$SEALSTORE_HOME/audit``).
        lockdown: ``"auto"`` (the brokers that released the model's key),
            None, a ``broker+https://`` key URI, an object with ``standing()``,
            a callable returning ``(state, reason)``, or a list of these.
        lockdown_poll: seconds between standing checks.
        lockdown_grace: seconds without an answer before the guard fails closed.
        name: the model's name in records and alerts.
    """

    rate: RatePolicy = field(default_factory=RatePolicy)
    extraction: ExtractionPolicy = field(default_factory=ExtractionPolicy)
    ood: OodPolicy = field(default_factory=OodPolicy)
    reference: Any = None
    features: Callable[[tuple, dict], Any] | None = None
    response: str = "log"
    responses: Mapping[str, str] = field(default_factory=dict)
    penalty: float | None = 600.0
    throttle_rate: float = 1.0
    require_caller: bool = False
    webhook: str | None = None
    audit: str | None = None
    lockdown: Any = "auto"
    lockdown_poll: float = 5.0
    lockdown_grace: float = 60.0
    name: str | None = None
    max_callers: int = 10_000  # the longest-idle caller without a penalty is forgotten beyond

    def __post_init__(self) -> None:
        for det, resp in {"*": self.response, **dict(self.responses)}.items():
            if det != "*" and det not in DETECTORS:
                raise ValueError(f"no detector {det!r} (known: {', '.join(DETECTORS)})")
            if resp not in RESPONSES:
                raise ValueError(f"a response is one of {', '.join(RESPONSES)}, not {resp!r}")
        if self.extraction.test not in ("auto", "ks", "shapiro"):
            raise ValueError(
                f"extraction test is auto, ks or shapiro, not {self.extraction.test!r}"
            )
        if self.penalty is not None and self.penalty <= 0:
            raise ValueError("penalty is a positive number of seconds, or None (until lifted)")
        if self.throttle_rate <= 0 or self.lockdown_poll <= 0 or self.lockdown_grace <= 0:
            raise ValueError("throttle_rate, lockdown_poll and lockdown_grace must be positive")

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any]) -> GuardPolicy:
        """A policy from a mapping (a YAML/JSON document); unknown keys are errors."""
        nested = {"rate": RatePolicy, "extraction": ExtractionPolicy, "ood": OodPolicy}
        kwargs: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"features", "reference"}
        for key, value in doc.items():
            if key not in names:
                raise ValueError(f"unknown guard policy key {key!r}")
            if key in nested:
                if not isinstance(value, Mapping):
                    raise ValueError(f"guard policy {key} is a mapping")
                known = {f.name for f in dataclasses.fields(nested[key])}
                bad = sorted(set(value) - known)
                if bad:
                    raise ValueError(f"unknown guard policy key {key}.{bad[0]}")
                value = nested[key](**value)
            kwargs[key] = value
        return cls(**kwargs)

    def response_for(self, detector: str) -> str:
        return self.responses.get(detector, self.response)


@dataclass
class Target:
    """What is guarded: for the audit records and alerts."""

    name: str
    tenant: str | None = None
    artifact: str | None = None
    version: str | None = None
    store: Any = None


# -- features ---------------------------------------------------------------------------


def default_features(model: Any) -> Callable[[tuple, dict], Any]:
    """Mean-pooled input embeddings (token ids), else the rows of a float input."""
    import torch

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)

    def features(args: tuple, kwargs: dict) -> Any:
        ids = kwargs.get("input_ids")
        if ids is None and args and torch.is_tensor(args[0]) and not args[0].is_floating_point():
            ids = args[0]
        with torch.no_grad():
            if ids is not None and emb is not None:
                ids = ids if ids.dim() == 2 else ids.reshape(1, -1)
                e = emb(ids).float()
                mask = kwargs.get("attention_mask")
                if mask is None and len(args) > 1 and torch.is_tensor(args[1]):
                    mask = args[1]
                if mask is None:
                    return e.mean(1).cpu()
                m = mask.reshape(ids.shape).to(e.dtype).unsqueeze(1)  # [B, 1, L]
                return (torch.bmm(m, e).squeeze(1) / m.sum(2).clamp(min=1)).cpu()
            x = kwargs.get("inputs_embeds")
            if x is None:
                x = next((a for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
            if x is None:
                return None
            x = x.float()
            if x.dim() == 3:
                return x.mean(1).cpu()
            return x.reshape(x.shape[0], -1).cpu() if x.dim() > 1 else x.reshape(1, -1).cpu()

    return features


def _reference_batches(reference: Any) -> list[tuple[tuple, dict]]:
    items = reference if isinstance(reference, list | tuple) else [reference]
    out = []
    for item in items:
        if isinstance(item, Mapping):
            out.append(((), dict(item)))
        else:
            out.append(((item,), {}))
    return out


@dataclass
class Reference:
    """Statistics of the reference sample, computed once at attach time."""

    size: int
    nn_sorted: Any  # float64 numpy: each reference point's distance to its nearest other one
    norm_lo: float
    norm_hi: float
    nn_max: float
    points: Any  # torch [N, D]
    points_sq: Any  # torch [N]: squared norms

    @classmethod
    def of(cls, feats: Any, ood: OodPolicy) -> Reference:
        import numpy as np
        import torch

        if feats is None or feats.dim() != 2 or feats.shape[0] < 20:
            raise ValueError("a guard reference sample needs at least 20 inputs")
        nn = torch.empty(feats.shape[0])
        for i in range(0, feats.shape[0], 1024):  # bounded memory for big samples
            d = torch.cdist(feats[i : i + 1024], feats)
            d[:, i : i + 1024].fill_diagonal_(float("inf"))
            nn[i : i + 1024] = d.min(1).values
        nn = nn.double().numpy()
        norms = feats.norm(dim=1).double().numpy()
        lo, hi = np.quantile(norms, [ood.norm_quantile, 1 - ood.norm_quantile])
        return cls(
            size=int(feats.shape[0]),
            nn_sorted=np.sort(nn),
            norm_lo=float(lo),
            norm_hi=float(hi),
            nn_max=float(np.quantile(nn, ood.nn_quantile)),
            points=feats,
            points_sq=(feats * feats).sum(1),
        )

    def nearest(self, feats: Any) -> Any:
        """Each row's distance to its nearest reference point (one matrix product)."""
        d2 = _sq_dist(feats, (feats * feats).sum(1), self.points, self.points_sq)
        return d2.min(1).values.clamp(min=0).sqrt()


# -- per-caller state -----------------------------------------------------------------------


class _Window:
    """A sliding count in 60 buckets, and an EWMA of past windows' counts (the baseline)."""

    ALPHA = 0.3

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.bucket = seconds / 60
        self.buckets: deque[list[float]] = deque()
        self.total = 0
        self.baseline: float | None = None
        self.period_start: float | None = None
        self.period = 0

    def add(self, now: float, n: int) -> int:
        if self.period_start is None:
            self.period_start = now
        elapsed = now - self.period_start
        if elapsed >= self.seconds:
            done = int(elapsed // self.seconds)
            b = self.period if self.baseline is None else self.baseline
            b = self.ALPHA * self.period + (1 - self.ALPHA) * b
            self.baseline = b * (1 - self.ALPHA) ** (done - 1)  # idle windows count as 0
            self.period, self.period_start = 0, self.period_start + done * self.seconds
        self.period += n
        idx = math.floor(now / self.bucket)
        while self.buckets and self.buckets[0][0] <= idx - 60:
            self.total -= int(self.buckets.popleft()[1])
        if self.buckets and self.buckets[-1][0] == idx:
            self.buckets[-1][1] += n
        else:
            self.buckets.append([idx, n])
        self.total += n
        return self.total


class _Caller:
    def __init__(self, rate: RatePolicy, history: int, ext: ExtractionPolicy, ood: OodPolicy):
        self.short = _Window(rate.window)
        self.long = _Window(rate.volume_window)
        self.history = history
        self.hist: Any = None  # torch [history, D] ring
        self.hist_sq: Any = None
        self.count = 0  # rows stored (<= history)
        self.pos = 0
        self.dmins: deque[float] = deque(maxlen=ext.window)
        self.since_test = 0
        self.ood: deque[bool] = deque(maxlen=ood.window)
        self.queries = 0
        self.penalty: tuple[str, float | None, str] | None = None  # (response, until, detector)
        self.tokens = 1.0
        self.token_time = 0.0
        self.fired: dict[str, float] = {}  # detector -> when it last fired
        self.last_seen = 0.0

    def clear(self) -> None:
        """Forget the detector windows and which detectors fired: after a lift or when a
        penalty ends, the caller starts over (its refused calls were never observed)."""
        self.dmins.clear()
        self.ood.clear()
        self.since_test = 0
        self.fired.clear()

    def remember(self, feats: Any) -> Any:
        """Each row's distance to the nearest earlier query (this batch's earlier rows too),
        then store the rows; returns a float tensor [B] (inf for the very first query)."""
        import torch

        b, dim = feats.shape
        if self.hist is not None and self.hist.shape[1] != dim:
            self.hist, self.count, self.pos = None, 0, 0  # inputs of another shape: start over
        sq = (feats * feats).sum(1)
        best = torch.full((b,), float("inf"))
        if self.count:
            h, hs = self.hist[: self.count], self.hist_sq[: self.count]
            best = _sq_dist(feats, sq, h, hs).min(1).values
        if b > 1:
            inner = _sq_dist(feats, sq, feats, sq).masked_fill(
                ~torch.ones(b, b, dtype=torch.bool).tril(-1), float("inf")
            )
            best = torch.minimum(best, inner.min(1).values)
        rows = feats[-self.history :]
        # The ring grows by doubling up to *history* rows: a caller with a few
        # queries costs a few rows, not the whole window.
        cap = 0 if self.hist is None else self.hist.shape[0]
        need = min(self.history, self.count + rows.shape[0])
        if need > cap:
            grown = min(self.history, max(2 * cap, need, 64))
            hist, hist_sq = torch.empty(grown, dim), torch.empty(grown)
            if cap:
                hist[:cap], hist_sq[:cap] = self.hist, self.hist_sq
            self.hist, self.hist_sq = hist, hist_sq
        idx = (self.pos + torch.arange(rows.shape[0])) % self.history
        self.hist[idx] = rows
        self.hist_sq[idx] = sq[-self.history :]
        self.pos = int((self.pos + rows.shape[0]) % self.history)
        self.count = min(self.history, self.count + rows.shape[0])
        return best.clamp(min=0).sqrt()


@dataclass
class Finding:
    caller: str
    detector: str
    statistic: float
    threshold: float
    detail: str


# -- the guard ------------------------------------------------------------------------------


class Guard:
    """The guard on one module (``model.sealstore_guard``); made by :func:`guard`."""

    def __init__(
        self,
        model: Any,
        policy: GuardPolicy,
        *,
        target: Target | None = None,
        standing: Sequence[Any] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.target = target or Target(policy.name or type(model).__name__)
        self._clock = clock
        self._features = policy.features or default_features(model)
        self._lock = threading.Lock()
        self._callers: dict[str, _Caller] = {}
        self.metrics = Metrics(HELP, buckets=_BUCKETS)
        self.alerts = Alerts(policy.webhook, self.metrics, source=self.target.name,
                             prefix="sealstore_guard")  # fmt: skip
        self.metrics.gauge("sealstore_guard_callers", "Callers tracked.",
                           lambda: len(self._callers))  # fmt: skip
        self.metrics.gauge("sealstore_guard_penalized", "Callers throttled or refused now.",
                           self._penalized)  # fmt: skip
        self.metrics.gauge("sealstore_guard_locked", "1 while a lockdown stops the model.",
                           lambda: float(self._stopped is not None))  # fmt: skip
        self.reference: Reference | None = None
        if policy.reference is not None:
            self.reference = Reference.of(self._featurize_reference(policy.reference), policy.ood)
        ext = policy.extraction
        self._test = ext.test if ext.test != "auto" else ("ks" if self.reference else "shapiro")
        if self._test == "ks" and self.reference is None:
            raise ValueError("the extraction test 'ks' needs a reference sample (policy.reference)")
        self._history = ext.history or (self.reference.size if self.reference else 1000)
        self._audit_log: Any = None
        self.recent: deque[Finding] = deque(maxlen=1000)  # the latest findings, oldest first
        # Incident response at the broker: a poller keeps the latest answer.
        self._sources = [_standing_source(s) for s in standing]
        self._stopped: tuple[str, str] | None = None
        self._answered = time.monotonic()
        self._recorded_stop: tuple[str, str] | None = None
        self._done = threading.Event()
        self._poller: threading.Thread | None = None
        if self._sources:
            self._poll_once()
            self._poller = threading.Thread(target=self._poll, name="guard-standing", daemon=True)
            self._poller.start()
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
        self._model_ref = model

    def __repr__(self) -> str:
        return f"Guard({self.target.name!r}, callers={len(self._callers)})"

    # -- attach / detach ----------------------------------------------------------------
    def remove(self) -> None:
        """Take the guard off the model (stops the standing poller)."""
        self._handle.remove()
        self._done.set()
        if getattr(self._model_ref, "sealstore_guard", None) is self:
            del self._model_ref.sealstore_guard

    def _featurize_reference(self, reference: Any) -> Any:
        import torch

        parts = [self._features(a, k) for a, k in _reference_batches(reference)]
        if any(p is None for p in parts):
            raise ValueError("the guard's features take nothing from the reference inputs")
        return torch.cat(parts).float()

    # -- the hook -------------------------------------------------------------------------
    def _hook(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        start = time.perf_counter()
        caller = kwargs.pop("caller", None)
        caller = _check_caller(caller) if caller is not None else CALLER.get()
        if caller is None:
            if self.policy.require_caller:
                self._refuse(ANONYMOUS, "no-caller", "this model's guard requires a caller id")
            caller = ANONYMOUS
        self._check_standing(caller)
        feats = self._features(args, kwargs)
        self.observe(caller, feats, rows=_rows(args, kwargs, feats))
        self.metrics.observe(time.perf_counter() - start)
        self.metrics.inc("sealstore_guard_calls_total", {"result": "ok"})
        return args, kwargs

    def screen(self, *args: Any, **kwargs: Any) -> None:
        """What the hook does for a forward call with these arguments (``caller=`` too),
        without the forward: for a server that screens a request before queueing it.

        Raises:
            InferenceRefused: the caller may not make this call now.
        """
        self._hook(None, args, dict(kwargs))

    def observe(self, caller: str, feats: Any, *, rows: int | None = None) -> list[Finding]:
        """Account one call of *caller* (its rows' features, or None), run the detectors,
        answer findings; raises InferenceRefused if the caller may not make this call.

        What the hook does for each forward call; public so that a server can
        guard calls that do not go through ``forward`` (and for evaluation).
        """
        now = self._clock()
        n = int(rows if rows is not None else (feats.shape[0] if feats is not None else 1))
        findings: list[Finding] = []
        with self._lock:
            c = self._caller(caller, now)
            self._penalty_gate(c, caller, now)
            c.queries += n
            self.metrics.inc("sealstore_guard_queries_total", value=n)
            findings += self._rate(c, caller, now, n)
            if feats is not None and feats.shape[0]:
                feats = feats.float().reshape(feats.shape[0], -1)
                findings += self._extraction(c, caller, feats)
                findings += self._ood(c, caller, feats)
            fresh = [f for f in findings if self._fresh(c, f, now)]
        for f in fresh:
            self._answer(c, f, now)
        if any(self.policy.response_for(f.detector) != "log" for f in fresh):
            with self._lock:  # the call that drew the penalty is answered by it too
                self._penalty_gate(c, caller, now)
        return fresh

    # -- detectors ----------------------------------------------------------------------
    def _rate(self, c: _Caller, caller: str, now: float, n: int) -> list[Finding]:
        pol = self.policy.rate
        if not pol.enabled:
            return []
        out = []
        for det, win, cap, floor in (
            ("rate", c.short, pol.max_queries, pol.floor),
            ("volume", c.long, pol.max_volume, pol.volume_floor),
        ):
            total = win.add(now, n)
            usual = pol.factor * win.baseline if win.baseline is not None else 0.0
            if cap is not None and total > cap:
                out.append(Finding(caller, det, total, cap, f"{total} queries in "
                                   f"{win.seconds:g} s, over the cap of {cap}"))  # fmt: skip
            elif total > max(floor, usual):
                why = (f"{pol.factor:g}x the caller's usual {win.baseline:.0f}" if usual > floor
                       else f"the floor of {floor} (no usual rate above it)")  # fmt: skip
                text = f"{total} queries in {win.seconds:g} s, over {why}"
                out.append(Finding(caller, det, total, max(floor, usual), text))
        return out

    def _extraction(self, c: _Caller, caller: str, feats: Any) -> list[Finding]:
        ext = self.policy.extraction
        if not ext.enabled:
            return []
        d = c.remember(feats)
        for v in d.tolist():
            if _EPS < v < float("inf"):
                c.dmins.append(v)
                c.since_test += 1
        if len(c.dmins) < ext.min_queries or c.since_test < ext.every:
            return []
        c.since_test = 0
        window = list(c.dmins)
        if self._test == "ks":
            assert self.reference is not None
            stat = ks_below(window, self.reference.nn_sorted)
            if stat > ext.ks_threshold:
                return [Finding(caller, "extraction", stat, ext.ks_threshold,
                                f"KS D+ {stat:.3f} over {len(window)} nearest-query distances: "
                                "the caller's queries sit far closer together than natural "
                                "traffic's")]  # fmt: skip
            return []
        from scipy import stats

        w = float(stats.shapiro(window).statistic)
        if w < ext.shapiro_threshold:
            return [Finding(caller, "extraction", w, ext.shapiro_threshold,
                            f"Shapiro-Wilk W {w:.3f} over {len(window)} nearest-query "
                            "distances: not the normal shape of natural traffic")]  # fmt: skip
        return []

    def _ood(self, c: _Caller, caller: str, feats: Any) -> list[Finding]:
        pol, ref = self.policy.ood, self.reference
        if not pol.enabled or ref is None:
            return []
        norms = feats.norm(dim=1)
        nn = ref.nearest(feats)
        out = (norms < ref.norm_lo) | (norms > ref.norm_hi) | (nn > ref.nn_max)
        c.ood.extend(out.tolist())
        if len(c.ood) < pol.min_queries:
            return []
        share = sum(c.ood) / len(c.ood)
        if share > pol.max_fraction:
            return [Finding(caller, "ood", share, pol.max_fraction,
                            f"{share:.0%} of the last {len(c.ood)} queries are out of the "
                            "reference distribution")]  # fmt: skip
        return []

    # -- answering ----------------------------------------------------------------------
    def _fresh(self, c: _Caller, f: Finding, now: float) -> bool:
        """One finding per caller and detector per penalty period (no alert storms)."""
        last = c.fired.get(f.detector)
        quiet = self.policy.penalty or 600.0
        if last is not None and now - last < quiet:
            return False
        c.fired[f.detector] = now
        return True

    def _answer(self, c: _Caller, f: Finding, now: float) -> None:
        response = self.policy.response_for(f.detector)
        self.recent.append(f)
        self.metrics.inc("sealstore_guard_findings_total",
                         {"detector": f.detector, "response": response})  # fmt: skip
        log.warning("guard %s: %s finding for caller %s: %s -> %s", self.target.name,
                    f.detector, f.caller, f.detail, response)  # fmt: skip
        try:
            self._record(
                "guard.finding",
                decision="flagged",
                code=f.detector,
                reason=f.detail,
                detail={"caller": f.caller, "response": response, "queries": c.queries,
                        "statistic": round(f.statistic, 4),
                        "threshold": round(float(f.threshold), 4)},
            )  # fmt: skip
        except Exception as exc:  # whatever the cause, fail closed: no unrecorded finding
            self.metrics.inc("sealstore_guard_audit_failures_total")
            log.error("guard %s: finding not recorded: %s: %s", self.target.name,
                      type(exc).__name__, exc)  # fmt: skip
            with self._lock:
                c.fired.pop(f.detector, None)  # detected again on the next call
            self.metrics.inc("sealstore_guard_calls_total", {"result": "audit-unavailable"})
            raise InferenceRefused(
                f"{self.target.name}: a finding about caller {f.caller!r} could not be recorded "
                "in the audit log; refusing the call",
                "audit-unavailable",
                f.caller,
            ) from None
        self.alerts.fire(
            f"guard.{f.detector}",
            model=self.target.name,
            tenant=self.target.tenant,
            artifact=self.target.artifact,
            caller=f.caller,
            response=response,
            statistic=round(f.statistic, 4),
        )
        if response != "log":
            until = None if self.policy.penalty is None else now + self.policy.penalty
            with self._lock:
                if c.penalty is None or c.penalty[0] != "refuse":
                    c.penalty = (response, until, f.detector)
                    c.tokens, c.token_time = 1.0, now

    def _penalty_gate(self, c: _Caller, caller: str, now: float) -> None:
        if c.penalty is None:
            return
        response, until, detector = c.penalty
        if until is not None and now >= until:
            c.penalty = None
            c.clear()
            return
        if response == "refuse":
            self._refuse(caller, "refused", f"caller {caller!r} is refused after a {detector} "
                         "finding")  # fmt: skip
        rate = self.policy.throttle_rate
        c.tokens = min(1.0, c.tokens + (now - c.token_time) * rate)
        c.token_time = now
        if c.tokens < 1.0:
            self._refuse(caller, "throttled", f"caller {caller!r} is throttled to "
                         f"{rate:g} call(s)/s after a {detector} finding")  # fmt: skip
        c.tokens -= 1.0

    def _refuse(self, caller: str, code: str, why: str) -> None:
        self.metrics.inc("sealstore_guard_calls_total", {"result": code})
        raise InferenceRefused(f"{self.target.name}: {why}", code, caller)

    def _caller(self, caller: str, now: float) -> _Caller:
        c = self._callers.get(caller)
        if c is None:
            if len(self._callers) >= self.policy.max_callers:
                # Forget the longest-idle caller that has no penalty.
                idle = [(v.last_seen, k) for k, v in self._callers.items() if v.penalty is None]
                if idle:
                    del self._callers[min(idle)[1]]
            pol = self.policy
            c = self._callers[caller] = _Caller(pol.rate, self._history, pol.extraction, pol.ood)
        c.last_seen = now
        return c

    def _penalized(self) -> float:
        now = self._clock()
        with self._lock:
            return float(
                sum(1 for c in self._callers.values()
                    if c.penalty is not None and (c.penalty[1] is None or c.penalty[1] > now))
            )  # fmt: skip

    # -- operator ---------------------------------------------------------------------------
    def lift(self, caller: str | None = None) -> list[str]:
        """End the throttle or refusal of *caller* (None: of every caller); returns who."""
        with self._lock:
            names = [caller] if caller is not None else list(self._callers)
            lifted = []
            for name in names:
                c = self._callers.get(name)
                if c is not None and c.penalty is not None:
                    c.penalty = None
                    c.clear()
                    lifted.append(name)
        if lifted:
            self._record("guard.lift", decision="ok", detail={"callers": lifted[:64]})
        return lifted

    def status(self) -> dict[str, Any]:
        """Callers with a penalty, and the lockdown state (names and codes only)."""
        now = self._clock()
        with self._lock:
            penalized = {
                k: {"response": c.penalty[0], "detector": c.penalty[2],
                    "seconds_left": None if c.penalty[1] is None else round(c.penalty[1] - now, 1)}
                for k, c in self._callers.items()
                if c.penalty is not None and (c.penalty[1] is None or c.penalty[1] > now)
            }  # fmt: skip
        return {
            "model": self.target.name,
            "callers": len(self._callers),
            "penalized": penalized,
            "stopped": None if self._stopped is None else dict(zip(("code", "reason"),
                                                                   self._stopped, strict=True)),
        }  # fmt: skip

    def serve_metrics(self, host: str = "127.0.0.1", port: int = 0) -> Any:
        """Answer ``GET /metrics`` on *host:port* (loopback by default); returns the server."""
        return serve_metrics(self.metrics.render, host, port)

    # -- audit --------------------------------------------------------------------------
    def _record(self, action: str, **fields: Any) -> None:
        t = self.target
        detail = {"model": t.name, **fields.pop("detail", {})}
        if t.store is not None:
            from sealstore.vault.auditing import record

            record(t.store, action, tenant=t.tenant, artifact=t.artifact, version=t.version,
                   detail=detail, **fields)  # fmt: skip
            return
        from sealstore.vault.auditing import principal

        self._log().append(who=principal(), action=action, tenant=t.tenant, artifact=t.artifact,
                           version=t.version, detail=detail, **fields)  # fmt: skip

    def _log(self) -> Any:
        if self._audit_log is None:
            from sealstore.vault.auditing import machine_log

            self._audit_log = machine_log(self.policy.audit)
        return self._audit_log

    # -- lockdown -------------------------------------------------------------------------
    def _check_standing(self, caller: str) -> None:
        if not self._sources:
            return
        stopped = self._stopped
        if stopped is not None:
            self._refuse(caller, stopped[0], stopped[1])
        if time.monotonic() - self._answered > self.policy.lockdown_grace:
            self._refuse(caller, "standing-unknown", "the broker has not confirmed this model's "
                         f"standing for over {self.policy.lockdown_grace:g} s")  # fmt: skip

    def _poll(self) -> None:
        while not self._done.wait(self.policy.lockdown_poll):
            self._poll_once()

    def _poll_once(self) -> None:
        stopped = None
        try:
            for source in self._sources:
                state, reason = source()
                if state != "ok":
                    stopped = (state, reason)
                    break
        except KeyReleaseDenied as exc:  # no role in the tenant any more: stop
            stopped = ("locked-out", str(exc))
        except Exception as exc:  # an outage stops the model once the grace is over
            log.warning("guard %s: standing check failed: %s: %s", self.target.name,
                        type(exc).__name__, exc)  # fmt: skip
            return
        self._answered = time.monotonic()
        self._stopped = stopped
        if stopped is not None and stopped != self._recorded_stop:
            log.error("guard %s: stopped by incident response: %s", self.target.name, stopped[1])
            self.alerts.fire("guard.stopped", model=self.target.name, code=stopped[0])
            try:
                self._record("guard.stopped", decision="denied", code=stopped[0],
                             reason=stopped[1])  # fmt: skip
            except Exception as exc:  # the stop holds whether or not it is recorded
                self.metrics.inc("sealstore_guard_audit_failures_total")
                log.error("guard %s: stop not recorded: %s: %s", self.target.name,
                          type(exc).__name__, exc)  # fmt: skip
        self._recorded_stop = stopped


def ks_below(sample: Sequence[float], reference_sorted: Any) -> float:
    """One-sided two-sample Kolmogorov-Smirnov statistic D+ = sup(F_sample - F_reference):
    how much of *sample* lies below values where the reference has less mass."""
    import numpy as np

    w = np.sort(np.asarray(sample, dtype=np.float64))
    n = len(w)
    ref = np.searchsorted(reference_sorted, w, side="right") / len(reference_sorted)
    # F_sample jumps to i/n at w[i-1]; compare just after each jump.
    return float(np.max(np.arange(1, n + 1) / n - ref))


def _sq_dist(a: Any, a_sq: Any, b: Any, b_sq: Any) -> Any:
    """Squared distances between the rows of *a* and of *b* (with their squared norms):
    one matrix product, not an [A, B, dim] difference."""
    return a_sq[:, None] + b_sq[None, :] - 2 * a @ b.T


def _rows(args: tuple, kwargs: dict, feats: Any) -> int:
    if feats is not None:
        return int(feats.shape[0])
    for x in (*args, *kwargs.values()):
        shape = getattr(x, "shape", None)
        if shape:
            return int(shape[0])
    return 1


def _standing_source(source: Any) -> Callable[[], tuple[str, str]]:
    if callable(getattr(source, "standing", None)):
        return source.standing
    if callable(source):
        return source
    if isinstance(source, str):
        from sealstore.kms.registry import wrapper_for

        key = wrapper_for(source)
        if callable(getattr(key, "standing", None)):
            return key.standing
    raise ValueError(f"not a lockdown source (a broker key URI or an object with standing()): "
                     f"{source!r:.80}")  # fmt: skip


def standing_sources(policy: GuardPolicy, found: Sequence[Any] = ()) -> list[Any]:
    """The lockdown sources of *policy*; *found*: the load's brokers, for ``"auto"``."""
    spec = policy.lockdown
    if spec is None or spec == "off":
        return []
    if spec == "auto":
        return list(found)
    return list(spec) if isinstance(spec, list | tuple) else [spec]


def guard(
    model: Any,
    *,
    policy: GuardPolicy | Mapping[str, Any] | None = None,
    target: Target | None = None,
    standing: Sequence[Any] = (),
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """Guard *model* (a torch module) in place and return it; ``model.sealstore_guard``
    is the :class:`Guard` (metrics, status, lift, remove).

    Raises:
        ValueError: a bad policy, or a module that is guarded already.
    """
    policy = GuardPolicy() if policy is None else _policy(policy)
    if getattr(model, "sealstore_guard", None) is not None:
        raise ValueError("this module is guarded already (model.sealstore_guard.remove() first)")
    sources = standing_sources(policy, standing)
    g = Guard(model, policy, target=target, standing=sources, clock=clock)
    model.sealstore_guard = g
    return model


def _policy(spec: Any) -> GuardPolicy:
    if spec is True:
        return GuardPolicy()
    if isinstance(spec, GuardPolicy):
        return spec
    if isinstance(spec, Mapping):
        return GuardPolicy.from_mapping(spec)
    raise TypeError(f"guard= takes a GuardPolicy, a mapping or True, not {type(spec).__name__}")


def brokers_for(slots: Sequence[Any], identities: Sequence[Any] = ()) -> list[Any]:
    """The key-release brokers among *slots* this process may ask (the identities given,
    or the slot's broker if ``SEALSTORE_BROKERS`` trusts it): the lockdown sources."""
    from sealstore.kms.registry import unwrappers_for

    objs = [i for i in identities if hasattr(i, "unwrap")]
    out: list[Any] = []
    for slot in slots:
        if not str(slot.kind).startswith("broker+"):
            continue
        for u in unwrappers_for(slot, objs):
            if callable(getattr(u, "standing", None)):
                out.append(u)
                break
    return out


def guard_loaded(
    module: Any,
    spec: Any,
    sealed: Any = None,
    *,
    manifest: Any = None,
    store: Any = None,
    identities: Sequence[Any] = (),
) -> Any:
    """Guard *module*, just loaded from *sealed* (a SealedFile) or a store *manifest*:
    findings are recorded against that artifact (in its store's audit log), and
    ``lockdown="auto"`` watches the brokers its key slots name."""
    policy = _policy(spec)
    manifest = manifest or getattr(sealed, "source_manifest", None)
    store = store or getattr(sealed, "source_store", None)
    if manifest is not None:
        ctx = dict(manifest.context)
        slots = manifest.slots
    else:
        ctx = dict(sealed.header.context) if sealed is not None else {}
        slots = sealed.preamble.slots if sealed is not None else ()
        store = None
    artifact, version = ctx.get("artifact"), ctx.get("version")
    name = policy.name or (f"{artifact}:{version}" if artifact and version else artifact)
    target = Target(
        name or type(module).__name__,
        tenant=ctx.get("tenant"),
        artifact=artifact,
        version=version,
        store=store,
    )
    return guard(module, policy=policy, target=target, standing=brokers_for(slots, identities))
