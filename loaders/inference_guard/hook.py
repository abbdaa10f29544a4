"""The hook: the guard on one module, attributing each forward call and answering findings."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from sealstore.errors import InferenceRefused, KeyReleaseDenied
from sealstore.loaders.inference_guard.detectors import (
    Finding,
    Reference,
    _Caller,
    _reference_batches,
    default_features,
    extraction_findings,
    mmd_findings,
    ood_findings,
    rate_findings,
)
from sealstore.loaders.inference_guard.policy import GuardPolicy, Target, _policy
from sealstore.loaders.inference_guard.standing import (
    _standing_source,
    brokers_for,
    standing_sources,
)
from sealstore.watch import Alerts, Metrics, serve_metrics

log = logging.getLogger("sealstore.guard")

CALLER: ContextVar[str | None] = ContextVar("sealstore_caller", default=None)
# Set while a request that was screened already runs (a generate() call, a served request):
# the forward hook does not count its forward calls again, one per decoding step.
_SCREENED: ContextVar[bool] = ContextVar("sealstore_screened", default=False)
ANONYMOUS = "-"
# The kind of a caller that policy.kinds does not name, and of a kind with no thresholds of
# its own: its thresholds are Guard.thresholds.
DEFAULT_KIND = "*"
MAX_KINDS = 1024  # kinds with their own thresholds or reference (memory stays bounded)
CALIBRATED = ("extraction", "ood", "mmd")  # the detectors calibrate() sets thresholds for

HELP = {
    "sealstore_guard_calls_total": ("counter", "Guarded forward calls by result."),
    "sealstore_guard_queries_total": ("counter", "Samples (batch rows) observed."),
    "sealstore_guard_findings_total": ("counter", "Findings by detector and response."),
    "sealstore_guard_alerts_total": ("counter", "Alerts raised, by kind."),
    "sealstore_guard_audit_failures_total": ("counter", "Findings not written to the audit log."),
    "sealstore_guard_observe_seconds": ("histogram", "Time the guard adds to a forward call."),
}
LABELS = {
    "sealstore_guard_calls_total": ("result",),
    "sealstore_guard_queries_total": (),
    "sealstore_guard_findings_total": ("detector", "response"),
    "sealstore_guard_alerts_total": ("kind",),
    "sealstore_guard_audit_failures_total": (),
}
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


def _check_caller(caller: Any) -> str:
    if not isinstance(caller, str) or not 0 < len(caller) <= 128 or not caller.isprintable():
        raise ValueError(f"a caller id is 1-128 printable characters, not {caller!r:.60}")
    return caller


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not 0 < len(kind) <= 64 or not kind.isprintable():
        raise ValueError(f"a kind of traffic is 1-64 printable characters, not {kind!r:.60}")
    return kind


@contextlib.contextmanager
def screened() -> Iterator[None]:
    """Forward calls inside the block belong to a request screened already
    (``Guard.screen``): the forward hook checks the lockdown but counts nothing."""
    token = _SCREENED.set(True)
    try:
        yield
    finally:
        _SCREENED.reset(token)


@contextlib.contextmanager
def as_caller(caller: str) -> Iterator[None]:
    """Attribute the guarded forward calls made inside the block to *caller*."""
    token = CALLER.set(_check_caller(caller))
    try:
        yield
    finally:
        CALLER.reset(token)


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
        hook: bool = True,
    ) -> None:
        self.policy = policy
        self.target = target or Target(policy.name or type(model).__name__)
        self._clock = clock
        self._features = policy.features or default_features(model)
        # The caller table's lock, held only to find or add a caller: the detectors run
        # under each caller's own lock, so that concurrent callers do not wait on each other.
        self._lock = threading.Lock()
        self._callers: dict[str, _Caller] = {}
        self.metrics = Metrics(HELP, buckets=_BUCKETS, labels=LABELS)
        self.alerts = Alerts(
            policy.webhook, self.metrics, source=self.target.name, prefix="sealstore_guard"
        )
        self.metrics.gauge(
            "sealstore_guard_callers", "Callers tracked.", lambda: len(self._callers)
        )
        self.metrics.gauge(
            "sealstore_guard_penalized", "Callers throttled or refused now.", self._penalized
        )
        self.metrics.gauge(
            "sealstore_guard_locked",
            "1 while a lockdown stops the model.",
            lambda: float(self._stopped is not None),
        )
        self.reference: Reference | None = None
        if policy.reference is not None:
            self.reference = Reference.of(
                self._featurize_reference(policy.reference), policy.ood, policy.mmd
            )
        # The default kind's thresholds (every caller's, unless its kind has its own).
        self.thresholds = self._default_thresholds()
        # Kinds of traffic with their own thresholds / reference (set_thresholds(kind=),
        # calibrate(groups=), set_reference(kind=)); a caller's kind: policy.kinds or the
        # request's. Each dict is replaced whole, never changed in place.
        self._kind_thresholds: dict[str, dict[str, float]] = {}  # in force (floored)
        self._kind_own: dict[str, dict[str, float]] = {}  # as calibrated / set
        self._kind_references: dict[str, Reference] = {}
        # What the latest calibrate() saw: callers per group, and per detector the group
        # whose quantile set the threshold (see calibrate).
        self.calibration: dict[str, Any] = {}
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
        self._handle = (
            model.register_forward_pre_hook(self._hook, with_kwargs=True) if hook else None
        )
        self._model_ref = model
        self._generate = None
        if hook and callable(getattr(model, "generate", None)):
            # generate() is one request: its prompt is screened once, its decoding steps'
            # forward calls are not queries (and caller= is not passed on to the model).
            self._generate = model.__dict__.get("generate")
            original = model.generate

            def generate(*args: Any, caller: str | None = None, **kwargs: Any) -> Any:
                self.screen(*args, **{**kwargs, "caller": caller} if caller else kwargs)
                with screened():
                    return original(*args, **kwargs)

            model.generate = generate

    def __repr__(self) -> str:
        return f"Guard({self.target.name!r}, callers={len(self._callers)})"

    # -- attach / detach ----------------------------------------------------------------
    def remove(self) -> None:
        """Take the guard off the model (stops the standing poller)."""
        if self._handle is not None:
            self._handle.remove()
        if "generate" in self._model_ref.__dict__:
            if self._generate is None:
                del self._model_ref.generate
            else:
                self._model_ref.generate = self._generate
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
    def _hook(
        self, module: Any, args: tuple, kwargs: dict, kind: str | None = None
    ) -> tuple[tuple, dict]:
        start = time.perf_counter()
        caller = kwargs.pop("caller", None)
        if module is not None and _SCREENED.get():
            # a decoding step of a screened generation, or a batch of screened requests
            self._check_standing(caller or CALLER.get() or ANONYMOUS)
            return args, kwargs
        caller = _check_caller(caller) if caller is not None else CALLER.get()
        if caller is None:
            if self.policy.require_caller:
                self._refuse(ANONYMOUS, "no-caller", "this model's guard requires a caller id")
            caller = ANONYMOUS
        self._check_standing(caller)
        feats = self._features(args, kwargs)
        self.observe(caller, feats, rows=_rows(args, kwargs, feats), kind=kind)
        self.metrics.observe(time.perf_counter() - start)
        self.metrics.inc("sealstore_guard_calls_total", {"result": "ok"})
        return args, kwargs

    def screen(self, *args: Any, kind: str | None = None, **kwargs: Any) -> None:
        """Screen one request before it is batched: ``screen(caller, inputs)`` (inputs: a
        mapping such as a tokenizer's output, or a tensor of token ids), or the arguments
        of a forward call with ``caller=``. What the hook does for a forward call, without
        the forward: each row of *inputs* is one query of *caller*.

        *kind*: the request's kind of traffic, whose thresholds (and reference) judge it
        (:meth:`kind_of`); None: the caller's kind in ``policy.kinds``.

        Raises:
            InferenceRefused: the caller may not make this call now.
        """
        if args and isinstance(args[0], str) and "caller" not in kwargs:
            if len(args) != 2 or kwargs:
                raise TypeError("screen(caller, inputs) takes the caller and one input")
            caller, inputs = args
            if isinstance(inputs, Mapping):
                args, kwargs = (), {**inputs, "caller": caller}
            else:
                args, kwargs = (inputs,), {"caller": caller}
        self._hook(None, args, dict(kwargs), kind)

    def admit(self, caller: str) -> None:
        """Refuse *caller* if it may not call now (its penalty, the model's lockdown),
        counting nothing: what the middleware asks of a request with nothing to screen
        (a refused caller is refused on every guarded request, whatever its body).

        Raises:
            InferenceRefused: the caller may not call now.
        """
        caller = _check_caller(caller)
        self._check_standing(caller)
        now = self._clock()
        with self._lock:
            c = self._callers.get(caller)
        if c is not None:
            with c.lock:
                self._penalty_gate(c, caller, now)

    def observe(
        self, caller: str, feats: Any, *, rows: int | None = None, kind: str | None = None
    ) -> list[Finding]:
        """Account one call of *caller* (its rows' features, or None), run the detectors
        with the thresholds and reference of its kind (:meth:`kind_of`), answer findings;
        raises InferenceRefused if the caller may not make this call.

        What the hook does for each forward call; public so that a server can
        guard calls that do not go through ``forward`` (and for evaluation).
        """
        now = self._clock()
        n = int(rows if rows is not None else (feats.shape[0] if feats is not None else 1))
        findings: list[Finding] = []
        kind = self.kind_of(caller, kind)
        thresholds = self._kind_thresholds.get(kind, self.thresholds)
        reference = self._kind_references.get(kind, self.reference)
        with self._lock:
            c = self._caller(caller, now)
        with c.lock:
            self._penalty_gate(c, caller, now)
            c.queries += n
            self.metrics.inc("sealstore_guard_queries_total", value=n)
            findings += rate_findings(self.policy.rate, c, caller, now, n)
            c.kind = kind
            findings += self._detect(c, caller, feats, thresholds, reference)
            fresh = [f for f in findings if self._fresh(c, f, now)]
        for f in fresh:
            self._answer(c, f, now)
        if any(self.policy.response_for(f.detector) != "log" for f in fresh):
            with c.lock:  # the call that drew the penalty is answered by it too
                self._penalty_gate(c, caller, now)
        return fresh

    def _detect(
        self,
        c: _Caller,
        caller: str,
        feats: Any,
        thresholds: Mapping[str, float],
        reference: Reference | None,
    ) -> list[Finding]:
        """The statistical detectors on one call's rows (the caller's lock held)."""
        if feats is None or not feats.shape[0]:
            return []
        feats = feats.float().reshape(feats.shape[0], -1)
        pol = self.policy
        return [
            *extraction_findings(
                pol.extraction,
                self._test,
                reference,
                c,
                caller,
                feats,
                thresholds["shapiro" if self._test == "shapiro" else "extraction"],
            ),
            *ood_findings(pol.ood, reference, c, caller, feats, thresholds["ood"]),
            *mmd_findings(pol.mmd, reference, c, caller, feats, thresholds["mmd"]),
        ]

    # -- calibration ----------------------------------------------------------------------
    def _default_thresholds(self) -> dict[str, float]:
        ext = self.policy.extraction
        return {
            "extraction": ext.ks_threshold,
            "shapiro": ext.shapiro_threshold,
            "ood": self.policy.ood.max_fraction,
            "mmd": float("inf") if self.policy.mmd.threshold is None else self.policy.mmd.threshold,
        }

    def kind_of(self, caller: str, kind: str | None = None) -> str:
        """The kind of traffic a call of *caller* is judged as: *kind* (the request's
        own, e.g. from a header the authenticating proxy sets), else what
        ``policy.kinds`` says of *caller*, else the default kind ``"*"``. A kind with no
        thresholds of its own is judged by the default kind's (:attr:`thresholds`)."""
        if kind is None:
            kinds = self.policy.kinds
            kind = kinds(caller) if callable(kinds) else kinds.get(caller)
        return DEFAULT_KIND if kind is None else _check_kind(kind)

    def kinds(self) -> dict[str, dict[str, Any]]:
        """Each kind with thresholds or a reference of its own, and the default kind
        ``"*"``: its thresholds and its reference's size (None: no reference)."""
        th, refs = self._kind_thresholds, self._kind_references
        out = {
            DEFAULT_KIND: {
                "thresholds": dict(self.thresholds),
                "reference": self.reference.size if self.reference is not None else None,
            }
        }
        for k in sorted(set(th) | set(refs)):
            ref = refs.get(k, self.reference)
            out[k] = {
                "thresholds": dict(th.get(k, self.thresholds)),
                "reference": ref.size if ref is not None else None,
            }
        return out

    def peaks(
        self, streams: Mapping[str, Sequence[Any]], groups: Mapping[str, str] | None = None
    ) -> dict[str, dict[str, float]]:
        """Each stream's most alarming statistic per detector (extraction, ood, mmd):
        *streams* maps a caller to its requests (each what :meth:`screen` takes after the
        caller), replayed in order on fresh state, without findings or answers, against
        the reference of its kind in *groups* (``{caller: kind}``; that kind's own
        reference, if it has one, else the default)."""
        out: dict[str, dict[str, float]] = {}
        never = {"extraction": float("inf"), "ood": float("inf"), "mmd": float("inf")}
        never["shapiro"] = float("-inf")
        pol = self.policy
        refs = self._kind_references
        for name, requests in streams.items():
            kind = groups.get(name) if groups is not None else None
            reference = refs.get(kind, self.reference) if kind is not None else self.reference
            c = _Caller(pol.rate, self._history, pol.extraction, pol.ood, pol.mmd)
            for inputs in requests:
                if isinstance(inputs, Mapping):
                    feats = self._features((), dict(inputs))
                else:
                    feats = self._features((inputs,), {})
                self._detect(c, name, feats, never, reference)
            out[name] = dict(c.peaks)
        return out

    def calibrate(
        self,
        streams: Mapping[str, Sequence[Any]],
        *,
        target_fpr: float = 0.01,
        margin: float = 1.0,
        groups: Mapping[str, str] | None = None,
        default: str | Sequence[str] | None = None,
        kind_margin: float | None = None,
    ) -> dict[str, float]:
        """Set the thresholds of the extraction (KS), ood and MMD detectors from benign
        traffic: each detector's threshold is the ``1 - target_fpr`` quantile of the
        benign callers' peak statistics (:meth:`peaks`), times *margin* (>= 1), so that at
        most that share of callers like these would be flagged. Takes effect at once
        (running callers keep their windows); returns the default kind's thresholds.

        *streams*: at least ``1 / target_fpr`` benign callers' requests (more is better),
        kept apart from the traffic the result is judged on.

        *groups*: each stream's kind of traffic (``{caller: "keywords", ...}``). Each kind
        gets its own thresholds, from its own callers' quantile (judged against its own
        reference, if it has one): a caller of that kind (``policy.kinds``, or the
        request's ``kind=``) is judged by them. A kind of fewer than ``1 / target_fpr``
        callers has its largest peak as its quantile: an estimate of its tail only as
        good as its count (logged).

        *kind_margin* (>= 1; None: *margin*): the margin on each kind's own thresholds
        (before the floor below), the default kind's keeping *margin*. A kind's own
        threshold is its callers' largest peak when it has fewer than ``1 / target_fpr``
        of them, so about ``1 / (n + 1)`` of new callers of that kind exceed it; headroom
        there is safe to add because it loosens only for callers the operator has named
        as that kind: callers of no kind (an attacker's unnamed id) stay judged by the
        default kind's thresholds.

        A kind only loosens: per detector, a kind's threshold is the looser of its own
        and the default kind's (kinds exist to let legitimately different traffic
        through; a kind tighter than the default is a small-sample artefact). The floor
        holds whenever either changes (:meth:`set_thresholds` too); tighten everyone by
        tightening the default kind.

        Every caller of no kind, or of a kind with no thresholds, is judged by the
        default kind's (:attr:`thresholds`), which fail closed: a group named ``"*"``
        sets them; else *default* names the kinds that unknown callers may look like,
        and the default kind's thresholds are the quantile over the pooled peaks of
        all those kinds' callers (against the default kind's reference), times
        *margin*: a large pool, so a tail estimate with headroom; else, per detector,
        the tightest of every kind's. Without *groups* every stream is of the default
        kind. A calibration replaces every kind's thresholds: kinds it did not see fall
        back to the default's.

        Afterwards :attr:`calibration` says what was seen: ``callers``, ``groups``
        (callers per kind), ``quantiles`` (per detector and kind, before *margin*;
        ``"*"``: the pool's), ``own`` (each kind's thresholds from its own callers),
        ``thresholds`` (per kind after the floor, ``"*"`` the default), ``default``
        (how the default kind's were chosen) and ``set_by`` (per detector, the kind
        whose quantile set the default kind's threshold; ``"*"``: the pool).
        """
        import numpy as np

        if not 0 < target_fpr < 1 or margin < 1:
            raise ValueError("target_fpr is in (0, 1) and margin at least 1")
        if kind_margin is None:
            kind_margin = margin
        elif not kind_margin >= 1:
            raise ValueError(f"kind_margin is at least 1, not {kind_margin!r:.20}")
        if len(streams) < 1 / target_fpr:
            raise ValueError(
                f"calibrating to a {target_fpr:.2%} false-positive rate takes at least "
                f"{int(np.ceil(1 / target_fpr))} benign callers, not {len(streams)}"
            )
        kinds = dict(groups) if groups is not None else dict.fromkeys(streams, DEFAULT_KIND)
        missing = sorted(set(streams) - set(kinds))
        if missing:
            raise ValueError(f"calibration stream {missing[0]!r} has no group")
        sizes: dict[str, int] = {}
        for name in streams:
            sizes[_check_kind(kinds[name])] = sizes.get(kinds[name], 0) + 1
        self._check_room(set(sizes) - {DEFAULT_KIND}, replacing=True)
        named = [default] if isinstance(default, str) else list(default or ())
        if named and (groups is None or DEFAULT_KIND in sizes):
            raise ValueError(
                "default= names the groups unknown callers are judged like; "
                "there are none without groups=, and a group '*' is the default kind"
            )
        unknown = sorted(set(named) - set(sizes))
        if unknown:
            raise ValueError(f"default kind {unknown[0]!r} is not one of the groups")
        small = sorted(k for k, n in sizes.items() if n < 1 / target_fpr)
        if small and groups is not None:
            log.info(
                "guard calibration: %d of %d kinds have fewer than %d callers (e.g. %r, %d): "
                "their quantile is their largest peak",
                len(small),
                len(sizes),
                int(np.ceil(1 / target_fpr)),
                small[0],
                sizes[small[0]],
            )
        peaks = self.peaks(streams, kinds)
        quantiles: dict[str, dict[str, float]] = {}
        for det in CALIBRATED:
            per_kind: dict[str, list[float]] = {}
            for name, p in peaks.items():
                if det in p:
                    per_kind.setdefault(kinds[name], []).append(p[det])
            if per_kind:
                quantiles[det] = {
                    k: float(np.quantile(v, 1 - target_fpr, method="higher"))
                    for k, v in sorted(per_kind.items())
                }
        base = dict(self.thresholds)
        per_kind_th = {
            k: self._from_quantiles(
                {det: q[k] for det, q in quantiles.items() if k in q}, base, margin
            )
            for k in sorted(sizes)
        }
        new = dict(base)
        set_by: dict[str, str] = {}
        if DEFAULT_KIND in sizes:
            how = "the group '*'"
            new = per_kind_th[DEFAULT_KIND]
            set_by = {det: DEFAULT_KIND for det in quantiles if DEFAULT_KIND in quantiles[det]}
        elif named:
            pool = sorted(set(named))
            members = [n for n in streams if kinds[n] in pool]
            how = f"the {len(members)} callers of {pool} pooled"
            # The default kind's thresholds judge against the default reference: the
            # pooled kinds' peaks again against it where a kind has a reference of its own.
            own_ref = [n for n in members if kinds[n] in self._kind_references]
            pooled = {n: peaks[n] for n in members}
            if own_ref:
                pooled.update(self.peaks({n: streams[n] for n in own_ref}))
            pool_q: dict[str, float] = {}
            for det in CALIBRATED:
                values = [p[det] for p in pooled.values() if det in p]
                if values:
                    pool_q[det] = float(np.quantile(values, 1 - target_fpr, method="higher"))
                    quantiles[det] = {**quantiles[det], DEFAULT_KIND: pool_q[det]}
                    set_by[det] = DEFAULT_KIND
            if len(members) < 1 / target_fpr:
                log.info(
                    "guard calibration: the default kind's pool has %d callers, fewer than %d",
                    len(members),
                    int(np.ceil(1 / target_fpr)),
                )
            new = self._from_quantiles(pool_q, base, margin)
        else:
            how = "the tightest of every kind"
            for det in quantiles:
                key = self._key(det)
                candidates = [k for k in sizes if k in quantiles[det]]
                pick = min(candidates, key=lambda k: self._looseness(key, per_kind_th[k][key]))
                set_by[det] = pick
                new[key] = per_kind_th[pick][key]
        # Each kind's own, with its own margin (the default kind's above keep *margin*).
        own = {
            k: self._from_quantiles(
                {det: q[k] for det, q in quantiles.items() if k in q}, base, kind_margin
            )
            for k in sorted(sizes)
            if k != DEFAULT_KIND
        }
        self._set_thresholds(new, own)
        self.calibration = {
            "callers": len(peaks),
            "groups": dict(sorted(sizes.items())),
            "set_by": set_by,
            "quantiles": quantiles,
            "default": how,
            "margin": margin,
            "kind_margin": kind_margin,
            "own": own,
            "thresholds": {DEFAULT_KIND: dict(self.thresholds), **self._kind_thresholds},
        }
        return dict(self.thresholds)

    def _key(self, det: str) -> str:
        """The threshold a calibrated detector's quantile sets."""
        return "shapiro" if det == "extraction" and self._test == "shapiro" else det

    @staticmethod
    def _looseness(key: str, value: float) -> float:
        """Larger is looser (Shapiro-Wilk's W alarms below its threshold)."""
        return -value if key == "shapiro" else value

    def _floored(self, own: Mapping[str, float]) -> dict[str, float]:
        """A kind's thresholds: per detector the looser of its own and the default's."""
        default = self.thresholds
        return {
            k: v if self._looseness(k, v) >= self._looseness(k, default[k]) else default[k]
            for k, v in own.items()
        }

    def _from_quantiles(
        self, quantiles: Mapping[str, float], base: Mapping[str, float], margin: float
    ) -> dict[str, float]:
        """One kind's thresholds from its peaks' quantiles (detectors without: *base*)."""
        out = dict(base)
        for det, q in quantiles.items():
            if det == "extraction" and self._test == "shapiro":
                out["shapiro"] = -q / margin  # W: lower alarms
            elif det in ("extraction", "ood"):
                out[det] = min(1.0, q * margin)
            else:
                out["mmd"] = q * margin
        return out

    def _set_thresholds(
        self, default: dict[str, float], kinds: dict[str, dict[str, float]]
    ) -> None:
        """The default kind's thresholds and each kind's own; a kind's in force are its
        own floored at the default's (:meth:`_floored`)."""
        self.thresholds = dict(default)
        floored = {k: self._floored(th) for k, th in kinds.items()}
        # one assignment each: a running call sees the old or the new set of a kind
        self._kind_own = dict(kinds)
        self._kind_thresholds = floored
        # one record per kind with its own (with "kind"), then the default kind's
        for k, th in sorted(floored.items()):
            self._record(
                "guard.thresholds",
                decision="ok",
                detail={"kind": k, **{d: round(v, 6) for d, v in th.items()}},
            )
        self._record(
            "guard.thresholds", decision="ok", detail={k: round(v, 6) for k, v in default.items()}
        )

    def _check_room(self, kinds: set[str], *, replacing: bool = False) -> None:
        """At most MAX_KINDS kinds with thresholds or a reference of their own."""
        had = set(self._kind_references) | (set() if replacing else set(self._kind_thresholds))
        if len(had | kinds) > MAX_KINDS:
            raise ValueError(
                f"at most {MAX_KINDS} kinds of traffic have thresholds or a reference of their own"
            )

    def set_thresholds(self, *, kind: str | None = None, **thresholds: float) -> None:
        """Replace detector thresholds at run time (``extraction`` (KS D+), ``shapiro``
        (W), ``ood`` (share), ``mmd`` (MMD²)) of *kind* (None: the default kind's, which
        judge every caller of no kind with thresholds of its own); a kind given its
        first thresholds starts from the default kind's. A kind only loosens: per
        detector it is judged by the looser of its own and the default kind's, now and
        after the default kind's change. Recorded in the audit log."""
        bad = sorted(set(thresholds) - set(self.thresholds))
        if bad:
            raise ValueError(f"no threshold {bad[0]!r} (known: {', '.join(self.thresholds)})")
        kind = DEFAULT_KIND if kind is None else _check_kind(kind)
        given = {k: float(v) for k, v in thresholds.items()}
        if kind == DEFAULT_KIND:
            self._set_thresholds({**self.thresholds, **given}, self._kind_own)
            return
        self._check_room({kind})
        own = {**self._kind_own.get(kind, self.thresholds), **given}
        self._kind_own = {**self._kind_own, kind: own}
        new = self._floored(own)
        self._kind_thresholds = {**self._kind_thresholds, kind: new}
        self._record(
            "guard.thresholds",
            decision="ok",
            detail={"kind": kind, **{k: round(v, 6) for k, v in new.items()}},
        )

    def set_reference(self, reference: Any, *, kind: str | None = None) -> None:
        """Replace the reference sample at run time (featurised now); callers' windows are
        kept. *kind*: the reference of that kind's callers only (None: the default
        kind's, which every kind without its own uses). Calibrate again after it: the
        thresholds were set against the old one."""
        kind = DEFAULT_KIND if kind is None else _check_kind(kind)
        ref = Reference.of(self._featurize_reference(reference), self.policy.ood, self.policy.mmd)
        if kind == DEFAULT_KIND:
            self.reference = ref
        else:
            self._check_room({kind})
            self._kind_references = {**self._kind_references, kind: ref}
        detail: dict[str, Any] = {"size": ref.size}
        if kind != DEFAULT_KIND:
            detail["kind"] = kind
        self._record("guard.reference", decision="ok", detail=detail)

    def forget_kind(self, kind: str) -> bool:
        """Drop *kind*'s own thresholds and reference: its callers get the default kind's
        from now on. Returns whether it had any."""
        kind = _check_kind(kind)
        had = kind in self._kind_thresholds or kind in self._kind_references
        self._kind_thresholds = {k: v for k, v in self._kind_thresholds.items() if k != kind}
        self._kind_own = {k: v for k, v in self._kind_own.items() if k != kind}
        self._kind_references = {k: v for k, v in self._kind_references.items() if k != kind}
        if had:
            self._record("guard.kind-forgotten", decision="ok", detail={"kind": kind})
        return had

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
        self.metrics.inc(
            "sealstore_guard_findings_total", {"detector": f.detector, "response": response}
        )
        log.warning(
            "guard %s: %s finding for caller %s: %s -> %s",
            self.target.name,
            f.detector,
            f.caller,
            f.detail,
            response,
        )
        try:
            self._record(
                "guard.finding",
                decision="flagged",
                code=f.detector,
                reason=f.detail,
                detail={
                    "caller": f.caller,
                    "response": response,
                    "queries": c.queries,
                    "statistic": round(f.statistic, 4),
                    "threshold": round(float(f.threshold), 4),
                },
            )
        except Exception as exc:  # whatever the cause, fail closed: no unrecorded finding
            self.metrics.inc("sealstore_guard_audit_failures_total")
            log.error(
                "guard %s: finding not recorded: %s: %s", self.target.name, type(exc).__name__, exc
            )
            with c.lock:
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
            with c.lock:
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
            self._refuse(
                caller, "refused", f"caller {caller!r} is refused after a {detector} finding"
            )
        rate = self.policy.throttle_rate
        c.tokens = min(1.0, c.tokens + (now - c.token_time) * rate)
        c.token_time = now
        if c.tokens < 1.0:
            self._refuse(
                caller,
                "throttled",
                f"caller {caller!r} is throttled to {rate:g} call(s)/s after a {detector} finding",
            )
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
            c = self._callers[caller] = _Caller(
                pol.rate, self._history, pol.extraction, pol.ood, pol.mmd
            )
        c.last_seen = now
        return c

    def _penalized(self) -> float:
        now = self._clock()
        with self._lock:
            return float(
                sum(
                    1
                    for c in self._callers.values()
                    if c.penalty is not None and (c.penalty[1] is None or c.penalty[1] > now)
                )
            )

    # -- operator ---------------------------------------------------------------------------
    def lift(self, caller: str | None = None) -> list[str]:
        """End the throttle or refusal of *caller* (None: of every caller); returns who."""
        with self._lock:
            names = [caller] if caller is not None else list(self._callers)
            found = [(n, self._callers.get(n)) for n in names]
        lifted = []
        for name, c in found:
            if c is None:
                continue
            with c.lock:
                if c.penalty is not None:
                    c.penalty = None
                    c.clear()
                    lifted.append(name)
        if lifted:
            self._record("guard.lift", decision="ok", detail={"callers": lifted[:64]})
        return lifted

    def status(self) -> dict[str, Any]:
        """Callers with a penalty (and the kind their latest call was judged as), each
        kind's thresholds and reference size (:meth:`kinds`), and the lockdown state
        (names and codes only)."""
        now = self._clock()
        with self._lock:
            penalized = {
                k: {
                    "response": c.penalty[0],
                    "detector": c.penalty[2],
                    "kind": c.kind,
                    "seconds_left": None if c.penalty[1] is None else round(c.penalty[1] - now, 1),
                }
                for k, c in self._callers.items()
                if c.penalty is not None and (c.penalty[1] is None or c.penalty[1] > now)
            }
        return {
            "model": self.target.name,
            "callers": len(self._callers),
            "penalized": penalized,
            "kinds": self.kinds(),
            "stopped": None
            if self._stopped is None
            else dict(zip(("code", "reason"), self._stopped, strict=True)),
        }

    def serve_metrics(self, host: str = "127.0.0.1", port: int = 0) -> Any:
        """Answer ``GET /metrics`` on *host:port* (loopback by default); returns the server."""
        return serve_metrics(self.metrics.render, host, port)

    # -- audit --------------------------------------------------------------------------
    def _record(self, action: str, **fields: Any) -> None:
        t = self.target
        detail = {"model": t.name, **fields.pop("detail", {})}
        if t.store is not None:
            from sealstore.vault.auditing import record

            record(
                t.store,
                action,
                tenant=t.tenant,
                artifact=t.artifact,
                version=t.version,
                detail=detail,
                **fields,
            )
            return
        from sealstore.vault.auditing import principal

        self._log().append(
            who=principal(),
            action=action,
            tenant=t.tenant,
            artifact=t.artifact,
            version=t.version,
            detail=detail,
            **fields,
        )

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
            self._refuse(
                caller,
                "standing-unknown",
                "the broker has not confirmed this model's "
                f"standing for over {self.policy.lockdown_grace:g} s",
            )

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
            log.warning(
                "guard %s: standing check failed: %s: %s", self.target.name, type(exc).__name__, exc
            )
            return
        self._answered = time.monotonic()
        self._stopped = stopped
        if stopped is not None and stopped != self._recorded_stop:
            log.error("guard %s: stopped by incident response: %s", self.target.name, stopped[1])
            self.alerts.fire("guard.stopped", model=self.target.name, code=stopped[0])
            try:
                self._record("guard.stopped", decision="denied", code=stopped[0], reason=stopped[1])
            except Exception as exc:  # the stop holds whether or not it is recorded
                self.metrics.inc("sealstore_guard_audit_failures_total")
                log.error(
                    "guard %s: stop not recorded: %s: %s", self.target.name, type(exc).__name__, exc
                )
        self._recorded_stop = stopped


def _rows(args: tuple, kwargs: dict, feats: Any) -> int:
    if feats is not None:
        return int(feats.shape[0])
    for x in (*args, *kwargs.values()):
        shape = getattr(x, "shape", None)
        if shape:
            return int(shape[0])
    return 1


def guard(
    model: Any,
    *,
    policy: GuardPolicy | Mapping[str, Any] | None = None,
    target: Target | None = None,
    standing: Sequence[Any] = (),
    clock: Callable[[], float] = time.monotonic,
    hook: bool = True,
) -> Any:
    """Guard *model* (a torch module) in place and return it; ``model.sealstore_guard``
    is the :class:`Guard` (metrics, status, lift, remove, screen, calibrate).

    ``hook=False``: no forward pre-hook (and no generate wrapper): the server screens
    each request with ``model.sealstore_guard.screen(caller, inputs)`` or the ASGI
    middleware (:mod:`sealstore.loaders.inference_guard.serving`) before batching.

    Raises:
        ValueError: a bad policy, or a module that is guarded already.
    """
    policy = GuardPolicy() if policy is None else _policy(policy)
    if getattr(model, "sealstore_guard", None) is not None:
        raise ValueError("this module is guarded already (model.sealstore_guard.remove() first)")
    sources = standing_sources(policy, standing)
    g = Guard(model, policy, target=target, standing=sources, clock=clock, hook=hook)
    model.sealstore_guard = g
    return model


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
