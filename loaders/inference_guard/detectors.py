"""The detectors: the features of a query, the per-caller windows, and the four tests.

Rate / volume (sliding windows against caps and the caller's usual rate),
extraction (PRADA: nearest-query distances, KS against a reference sample or
Shapiro-Wilk), out-of-distribution (norms and nearest reference point) and
MMD (a windowed two-sample test of the caller's query embeddings against the
reference sample).
Each detector takes the caller's state and returns its findings; the hook
(``hook.py``) decides what to do with them.
"""

from __future__ import annotations

import math
import random
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sealstore.loaders.inference_guard.policy import (
    ExtractionPolicy,
    MmdPolicy,
    OodPolicy,
    RatePolicy,
)

_EPS = 1e-6  # a distance below this is the same query again: it teaches nothing new


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
    mmd_points: Any = None  # torch [S, D]: the subset the MMD test compares with
    mmd_gamma: float = 1.0  # the kernel: exp(-gamma * squared distance)
    mmd_rr: float = 0.0  # the mean kernel value between distinct sample points

    @classmethod
    def of(cls, feats: Any, ood: OodPolicy, mmd: MmdPolicy | None = None) -> Reference:
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
        ref = cls(
            size=int(feats.shape[0]),
            nn_sorted=np.sort(nn),
            norm_lo=float(lo),
            norm_hi=float(hi),
            nn_max=float(np.quantile(nn, ood.nn_quantile)),
            points=feats,
            points_sq=(feats * feats).sum(1),
        )
        ref._mmd_setup(mmd or MmdPolicy())
        return ref

    def _mmd_setup(self, pol: MmdPolicy) -> None:
        """The MMD sample (a seeded random subset of at most *sample* points) and the
        kernel's bandwidth (the sample's median pairwise squared distance)."""
        import torch

        n = self.size
        order = random.Random(0).sample(range(n), n)
        s = max(2, min(pol.sample, n))
        sample = self.points[order[:s]]
        sq = (sample * sample).sum(1)
        d2 = _sq_dist(sample, sq, sample, sq).clamp(min=0)
        off = ~torch.eye(s, dtype=torch.bool)
        med = float(d2[off].median())
        self.mmd_gamma = 1.0 / max(med, 1e-12)  # exp(-d^2 / median d^2)
        self.mmd_points = sample
        self.mmd_rr = float(torch.exp(-self.mmd_gamma * d2)[off].mean())

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
    def __init__(
        self,
        rate: RatePolicy,
        history: int,
        ext: ExtractionPolicy,
        ood: OodPolicy,
        mmd: MmdPolicy | None = None,
    ):
        self.lock = threading.Lock()  # this caller's state: callers do not wait on each other
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
        self.recent: deque[Any] = deque(maxlen=(mmd or MmdPolicy()).window)  # rows, for MMD
        self.mmd_since = 0
        self.peaks: dict[str, float] = {}  # detector -> its most alarming statistic so far
        self.queries = 0
        self.penalty: tuple[str, float | None, str] | None = None  # (response, until, detector)
        self.tokens = 1.0
        self.token_time = 0.0
        self.fired: dict[str, float] = {}  # detector -> when it last fired
        self.last_seen = 0.0
        self.kind = "*"  # the kind of traffic its latest call was judged as

    def clear(self) -> None:
        """Forget the detector windows and which detectors fired: after a lift or when a
        penalty ends, the caller starts over (its refused calls were never observed)."""
        self.dmins.clear()
        self.ood.clear()
        self.recent.clear()
        self.since_test = self.mmd_since = 0
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


# -- the detectors ----------------------------------------------------------------------


def rate_findings(pol: RatePolicy, c: _Caller, caller: str, now: float, n: int) -> list[Finding]:
    """The rate and volume detectors: one call of *n* rows by *caller* at *now*."""
    if not pol.enabled or caller in pol.exempt:
        return []
    out = []
    for det, win, cap, floor in (
        ("rate", c.short, pol.max_queries, pol.floor),
        ("volume", c.long, pol.max_volume, pol.volume_floor),
    ):
        total = win.add(now, n)
        usual = pol.factor * win.baseline if win.baseline is not None else 0.0
        if cap is not None and total > cap:
            out.append(
                Finding(
                    caller,
                    det,
                    total,
                    cap,
                    f"{total} queries in {win.seconds:g} s, over the cap of {cap}",
                )
            )
        elif total > max(floor, usual):
            why = (
                f"{pol.factor:g}x the caller's usual {win.baseline:.0f}"
                if usual > floor
                else f"the floor of {floor} (no usual rate above it)"
            )
            text = f"{total} queries in {win.seconds:g} s, over {why}"
            out.append(Finding(caller, det, total, max(floor, usual), text))
    return out


def extraction_findings(
    ext: ExtractionPolicy,
    test: str,
    reference: Reference | None,
    c: _Caller,
    caller: str,
    feats: Any,
    threshold: float | None = None,
) -> list[Finding]:
    """The extraction detector (PRADA): *test* is ``"ks"`` (against *reference*) or
    ``"shapiro"``; *threshold* overrides the policy's (a calibrated one)."""
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
    if test == "ks":
        assert reference is not None
        stat = ks_below(window, reference.nn_sorted)
        limit = ext.ks_threshold if threshold is None else threshold
        c.peaks["extraction"] = max(c.peaks.get("extraction", -math.inf), stat)
        if stat > limit:
            return [
                Finding(
                    caller,
                    "extraction",
                    stat,
                    limit,
                    f"KS D+ {stat:.3f} over {len(window)} nearest-query distances: "
                    "the caller's queries sit far closer together than natural "
                    "traffic's",
                )
            ]
        return []
    from scipy import stats

    w = float(stats.shapiro(window).statistic)
    limit = ext.shapiro_threshold if threshold is None else threshold
    c.peaks["extraction"] = max(c.peaks.get("extraction", -math.inf), -w)  # low W alarms
    if w < limit:
        return [
            Finding(
                caller,
                "extraction",
                w,
                limit,
                f"Shapiro-Wilk W {w:.3f} over {len(window)} nearest-query "
                "distances: not the normal shape of natural traffic",
            )
        ]
    return []


def ood_findings(
    pol: OodPolicy,
    ref: Reference | None,
    c: _Caller,
    caller: str,
    feats: Any,
    threshold: float | None = None,
) -> list[Finding]:
    """The out-of-distribution detector: the share of the caller's recent queries outside
    the reference's norms or nearest-neighbour distances (*ref*)."""
    if not pol.enabled or ref is None:
        return []
    norms = feats.norm(dim=1)
    nn = ref.nearest(feats)
    out = (norms < ref.norm_lo) | (norms > ref.norm_hi) | (nn > ref.nn_max)
    c.ood.extend(out.tolist())
    if len(c.ood) < pol.min_queries:
        return []
    share = sum(c.ood) / len(c.ood)
    limit = pol.max_fraction if threshold is None else threshold
    c.peaks["ood"] = max(c.peaks.get("ood", -math.inf), share)
    if share > limit:
        return [
            Finding(
                caller,
                "ood",
                share,
                limit,
                f"{share:.0%} of the last {len(c.ood)} queries are out of the "
                "reference distribution",
            )
        ]
    return []


def mmd_findings(
    pol: MmdPolicy,
    ref: Reference | None,
    c: _Caller,
    caller: str,
    feats: Any,
    threshold: float,
) -> list[Finding]:
    """The MMD detector: the caller's last ``window`` query embeddings against the
    reference sample, every ``every`` queries once ``min_queries`` are in."""
    if not pol.enabled or ref is None or ref.mmd_points is None:
        return []
    c.recent.extend(feats[-pol.window :])
    c.mmd_since += feats.shape[0]
    if len(c.recent) < min(pol.min_queries, pol.window) or c.mmd_since < pol.every:
        return []
    c.mmd_since = 0
    import torch

    stat = mmd2(torch.stack(list(c.recent)), ref)
    c.peaks["mmd"] = max(c.peaks.get("mmd", -math.inf), stat)
    if stat > threshold:
        return [
            Finding(
                caller,
                "mmd",
                stat,
                threshold,
                f"MMD² {stat:.4f} between the caller's last {len(c.recent)} queries and "
                "the reference sample: not the distribution of natural traffic",
            )
        ]
    return []


def mmd2(x: Any, ref: Reference) -> float:
    """Unbiased MMD² between the rows of *x* and the reference's MMD sample (Gaussian
    kernel of the reference's bandwidth): two matrix products."""
    import torch

    n = x.shape[0]
    y = ref.mmd_points
    xs, ys = (x * x).sum(1), (y * y).sum(1)
    kxx = torch.exp(-ref.mmd_gamma * _sq_dist(x, xs, x, xs).clamp(min=0))
    kxy = torch.exp(-ref.mmd_gamma * _sq_dist(x, xs, y, ys).clamp(min=0))
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    return float(xx + ref.mmd_rr - 2 * kxy.mean())


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
