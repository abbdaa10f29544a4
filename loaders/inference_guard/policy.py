"""What the guard watches for and how it answers: the policy dataclasses, and what is guarded."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

RESPONSES = ("log", "throttle", "refuse")
DETECTORS = ("rate", "volume", "extraction", "ood", "mmd")


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
    exempt: tuple[str, ...] = ()  # callers (a bulk indexer, say) the rate detectors skip


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
class MmdPolicy:
    """A windowed two-sample test: each caller's last ``window`` query embeddings
    against the reference sample, by the maximum mean discrepancy (MMD², unbiased,
    Gaussian kernel, bandwidth the reference's median pairwise distance).

    A window is a finding when its MMD² is above ``threshold``. None: the test
    runs only once a threshold is set, by ``Guard.calibrate`` from benign
    callers' traffic at a target false-positive rate (or ``set_thresholds``):
    windows drawn at random from the reference itself are far more varied than
    one real user's, and would make a threshold that flags users.
    ``sample``: reference points the test compares with (a random subset, for
    a bounded cost). Needs a reference sample.
    """

    enabled: bool = True
    window: int = 100
    every: int = 10
    min_queries: int = 50
    threshold: float | None = None
    sample: int = 500


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
        kinds: each caller's kind of traffic, for thresholds (and a reference)
            per kind (``Guard.calibrate(groups=...)``, ``set_thresholds(kind=...)``):
            a mapping ``{caller: kind}`` or ``fn(caller) -> kind | None``. A caller
            it does not name, and a kind with no thresholds of its own, gets the
            default kind's (``"*"``). A request may name its kind instead
            (``screen(..., kind=)``, ``GuardMiddleware(kind_header=...)``).
    """

    rate: RatePolicy = field(default_factory=RatePolicy)
    extraction: ExtractionPolicy = field(default_factory=ExtractionPolicy)
    ood: OodPolicy = field(default_factory=OodPolicy)
    mmd: MmdPolicy = field(default_factory=MmdPolicy)
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
    kinds: Mapping[str, str] | Callable[[str], str | None] = field(default_factory=dict)

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
        if self.mmd.window < 2 or self.mmd.sample < 2:
            raise ValueError("mmd.window and mmd.sample are at least 2")
        if self.penalty is not None and self.penalty <= 0:
            raise ValueError("penalty is a positive number of seconds, or None (until lifted)")
        if not callable(self.kinds) and not isinstance(self.kinds, Mapping):
            raise ValueError("kinds is a mapping {caller: kind} or a function of the caller")
        if self.throttle_rate <= 0 or self.lockdown_poll <= 0 or self.lockdown_grace <= 0:
            raise ValueError("throttle_rate, lockdown_poll and lockdown_grace must be positive")

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any]) -> GuardPolicy:
        """A policy from a mapping (a YAML/JSON document); unknown keys are errors."""
        nested = {
            "rate": RatePolicy,
            "extraction": ExtractionPolicy,
            "ood": OodPolicy,
            "mmd": MmdPolicy,
        }
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
                if key == "rate" and "exempt" in value:
                    value = {**value, "exempt": tuple(value["exempt"])}
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


def _policy(spec: Any) -> GuardPolicy:
    if spec is True:
        return GuardPolicy()
    if isinstance(spec, GuardPolicy):
        return spec
    if isinstance(spec, Mapping):
        return GuardPolicy.from_mapping(spec)
    raise TypeError(f"guard= takes a GuardPolicy, a mapping or True, not {type(spec).__name__}")
