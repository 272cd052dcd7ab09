"""Written findings of audit reports: plain sentences from documented thresholds, numbers beside."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from interscope._summary import Z95

#: Order bands by ratio r = m / (n - 2): low r <= 1/3 < middle r <= 2/3 < high (as the tables).
BAND_NAMES = ("low", "middle", "high")
LOW_EDGE = 1 / 3
HIGH_EDGE = 2 / 3

#: A change counts as a rise (or fall) only when its 95% CI over samples excludes 0; below
#: NEGLIGIBLE (relative, 5%) a significant change is still called small, not a rise.
NEGLIGIBLE = 0.05
#: Below this many samples the normal-approximation intervals are themselves rough: say so.
FEW_SAMPLES = 10
#: A class with fewer samples than this is flagged "small n" in the per-class tables.
SMALL_CLASS = 5


def band_of(ratio: float) -> int:
    """0, 1 or 2: the band (low, middle, high) of an order ratio."""
    return 0 if ratio <= LOW_EDGE else 1 if ratio <= HIGH_EDGE else 2


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% CI (normal approximation over n paired samples)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": _num(self.mean), "ci": [_num(self.low), _num(self.high)], "n": self.n}


def _num(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def interval(values: np.ndarray) -> Interval:
    """Mean of `values` with a 95% CI; with one value the interval is the point (n = 1)."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(np.mean(values))
    half = Z95 * float(np.std(values, ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return Interval(mean, mean - half, mean + half, n)


def proportion(successes: int, n: int) -> Interval:
    """Wilson 95% interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    p = successes / n
    z2 = Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n)


def order_ratios(report: dict[str, Any]) -> list[float]:
    """The ratio m/(n-2) of each order of a report (computed when an old report lacks them)."""
    profile = report["profile"]
    ratios = profile.get("ratios") or []
    if len(ratios) == len(profile["orders"]):
        return [float(r) for r in ratios]
    n = max(int(report.get("n_players") or 0) - 2, 1)
    return [int(m) / n for m in profile["orders"]]


def band_rows(report: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample (rows) and band (3 columns): mean |I| over the band's orders, clean and
    adversarial; samples that failed or have other orders than the report's are left out.
    A band with no computed order is NaN."""
    orders = list(report["profile"]["orders"])
    bands = np.array([band_of(r) for r in order_ratios(report)], dtype=np.int64)
    clean_rows, adv_rows = [], []
    for sample in report.get("samples", []):
        clean, adv = sample.get("clean_mean_abs"), sample.get("adversarial_mean_abs")
        if sample.get("error") or clean is None or adv is None:
            continue
        if list(sample.get("orders", orders)) != orders:
            continue
        clean_rows.append(_by_band(np.asarray(clean, dtype=np.float64), bands))
        adv_rows.append(_by_band(np.asarray(adv, dtype=np.float64), bands))
    shape = (len(clean_rows), 3)
    return np.asarray(clean_rows).reshape(shape), np.asarray(adv_rows).reshape(shape)


def _by_band(values: np.ndarray, bands: np.ndarray) -> np.ndarray:
    return np.array(
        [values[bands == b].mean() if np.any(bands == b) else math.nan for b in range(3)]
    )


@dataclass(frozen=True)
class BandChange:
    """How the attack moved mean |I| in one band: absolute and relative to the clean mean."""

    band: str
    clean: float
    adversarial: float
    #: adversarial - clean, paired over samples.
    change: Interval
    #: change / clean mean (the clean mean taken as fixed: it is the reference, not a variate).
    relative: Interval

    def to_dict(self) -> dict[str, Any]:
        return {
            "band": self.band,
            "clean": _num(self.clean),
            "adversarial": _num(self.adversarial),
            "change": self.change.to_dict(),
            "relative": self.relative.to_dict(),
        }


def band_changes(report: dict[str, Any]) -> list[BandChange]:
    """Low, middle and high bands that have computed orders, with paired changes and CIs."""
    clean, adv = band_rows(report)
    out = []
    for b, name in enumerate(BAND_NAMES):
        if len(clean) == 0 or np.isnan(clean[:, b]).all():
            continue
        base = float(clean[:, b].mean())
        diff = adv[:, b] - clean[:, b]
        scale = base if base > 0 else math.nan
        out.append(
            BandChange(name, base, float(adv[:, b].mean()), interval(diff), interval(diff / scale))
        )
    return out


def _pct(value: float) -> str:
    # Rounded first, so a tiny negative change prints +0%, not -0%.
    return f"{round(value * 100):+d}%" if math.isfinite(value) else "n/a"


def _pct_ci(iv: Interval) -> str:
    return f"95% CI {_pct(iv.low)} to {_pct(iv.high)}"


def _attack_phrase(settings: dict[str, str]) -> str:
    parts = [settings.get("attack", "the attack")]
    detail = [settings[k] for k in ("norm",) if settings.get(k)]
    if settings.get("eps"):
        detail.append(f"eps {settings['eps']}")
    if settings.get("steps"):
        detail.append(f"{settings['steps']} steps")
    return parts[0] + (f" ({', '.join(detail)})" if detail else "")


def model_paragraph(report: dict[str, Any], settings: dict[str, str]) -> list[str]:
    """The sentences of one model's finding, in reading order."""
    name = report["model"]
    n = int(report.get("n_samples") or 0)
    if n == 0:
        return [f"{name}: no sample was audited without error, so nothing can be said."]
    robust = proportion(round(float(report["robust_accuracy"]) * n), n)
    clean_acc = float(report["clean_accuracy"])
    sentences = [
        f"{name}: under {_attack_phrase(settings)}, robust accuracy is "
        f"{robust.mean:.2f} ({round(robust.mean * n)} of {n} samples; 95% CI "
        f"{robust.low:.2f}–{robust.high:.2f}), against {clean_acc:.2f} clean."
    ]
    changes = band_changes(report)
    if not changes:
        return [*sentences, "No interaction profile was computed, so no order is discussed."]
    listing = " / ".join(_pct(c.relative.mean) for c in changes)
    names = " / ".join(c.band for c in changes)
    sentences.append(
        f"The attack changed mean interaction strength |I^(m)| by {listing} at {names} orders "
        "(adversarial vs clean, paired over samples)."
    )
    sentences.append(_which_orders(changes, n))
    if n < FEW_SAMPLES:
        sentences.append(
            f"Only {n} samples: the intervals are rough (normal approximation); read these as "
            "indications, not findings."
        )
    return sentences


def _rose(change: BandChange) -> bool:
    return change.relative.excludes_zero and change.relative.low > NEGLIGIBLE


def _which_orders(changes: list[BandChange], n: int) -> str:
    """Where the attack worked: claimed only as far as the intervals go (see the thresholds)."""
    if n < 2:
        return "One sample gives no interval, so no change is claimed."
    by_name = {c.band: c for c in changes}
    moved = [c for c in changes if c.relative.excludes_zero]
    if not moved:
        return (
            "No band's change can be told apart from sampling noise (every 95% interval "
            "includes zero): the data show no effect of the attack on interaction strength."
        )
    low, high = by_name.get("low"), by_name.get("high")
    if high is not None and low is not None and _rose(high):
        gap = high.relative.mean - low.relative.mean
        # The gap's interval: the two bands' relative changes are paired over the same samples,
        # but the report keeps only their intervals; adding the half-widths in quadrature is
        # exact for independent estimates and conservative for positively correlated ones.
        half = math.hypot(
            high.relative.high - high.relative.mean, low.relative.high - low.relative.mean
        )
        if gap - half > 0:
            return (
                f"The rise at high orders ({_pct(high.relative.mean)}, "
                f"{_pct_ci(high.relative)}) exceeds the one at low orders "
                f"({_pct(low.relative.mean)}) by {_pct(gap)} (95% CI {_pct(gap - half)} to "
                f"{_pct(gap + half)}): the attack worked mainly through high-order "
                "interactions, the paper's signature of an adversarial perturbation."
            )
        return (
            f"High-order strength rose ({_pct(high.relative.mean)}, {_pct_ci(high.relative)}), "
            f"but not clearly more than low-order strength ({_pct(low.relative.mean)}, "
            f"{_pct_ci(low.relative)}): the intervals of the two overlap, so the data do not "
            "show which orders the attack worked through."
        )
    parts = []
    for c in moved:
        verb = "rose" if c.relative.mean > 0 else "fell"
        parts.append(
            f"{c.band}-order strength {verb} ({_pct(c.relative.mean)}, {_pct_ci(c.relative)})"
        )
    rest = [c.band for c in changes if c not in moved]
    tail = f"; the change at {' and '.join(rest)} orders is within noise" if rest else ""
    return "Only " + "; ".join(parts) + tail + "."


def comparison(reports: Sequence[dict[str, Any]], settings: Sequence[dict[str, str]]) -> list[str]:
    """Sentences comparing the first model with each other (same attack and players only)."""
    if len(reports) < 2:
        return []
    first, out = reports[0], []
    for other, other_settings in zip(reports[1:], settings[1:], strict=True):
        same = all(
            settings[0].get(k) == other_settings.get(k)
            for k in ("attack", "norm", "eps", "steps", "players", "baseline", "value function")
        )
        a, b = first["model"], other["model"]
        if not same:
            out.append(
                f"{a} and {b} were audited with different settings, so they are not compared."
            )
            continue
        out.append(_compare_robust(first, other))
        out.append(_compare_high(first, other))
    return [s for s in out if s]


def _compare_robust(a: dict[str, Any], b: dict[str, Any]) -> str:
    na, nb = int(a.get("n_samples") or 0), int(b.get("n_samples") or 0)
    if not na or not nb:
        return ""
    pa, pb = float(a["robust_accuracy"]), float(b["robust_accuracy"])
    diff = pb - pa
    half = Z95 * math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
    ci = f"difference {diff:+.2f}, 95% CI {diff - half:+.2f} to {diff + half:+.2f}"
    if diff - half > 0 or diff + half < 0:
        more, less = (b, a) if diff > 0 else (a, b)
        return (
            f"{more['model']} is more robust than {less['model']}: robust accuracy "
            f"{pb:.2f} vs {pa:.2f} ({ci})."
        )
    return (
        f"The robust accuracies of {a['model']} ({pa:.2f}) and {b['model']} ({pb:.2f}) cannot "
        f"be told apart at these sample sizes ({ci})."
    )


def _compare_high(a: dict[str, Any], b: dict[str, Any]) -> str:
    ha = next((c for c in band_changes(a) if c.band == "high"), None)
    hb = next((c for c in band_changes(b) if c.band == "high"), None)
    if ha is None or hb is None or ha.relative.n < 2 or hb.relative.n < 2:
        return ""
    diff = ha.relative.mean - hb.relative.mean
    # Different models, different samples' attacks: independent estimates, so the half-widths
    # add in quadrature.
    half = math.hypot(ha.relative.high - ha.relative.mean, hb.relative.high - hb.relative.mean)
    text = (
        f"The attack raised high-order strength by {_pct(ha.relative.mean)} on {a['model']} and "
        f"{_pct(hb.relative.mean)} on {b['model']} (difference {_pct(diff)}, 95% CI "
        f"{_pct(diff - half)} to {_pct(diff + half)})"
    )
    if diff - half > 0 or diff + half < 0:
        bigger = a["model"] if diff > 0 else b["model"]
        return text + f": {bigger}'s predictions were moved more through complex contexts."
    return text + ": the two cannot be told apart."


def findings(
    reports: Sequence[dict[str, Any]], settings: Sequence[dict[str, str]]
) -> dict[str, Any]:
    """Everything the report's summary shows: paragraphs per model, comparisons, band numbers."""
    return {
        "thresholds": {
            "bands": f"low r <= {LOW_EDGE:.3f} < middle r <= {HIGH_EDGE:.3f} < high, r = m/(n-2)",
            "significant": "95% CI excludes 0",
            "negligible_relative_change": NEGLIGIBLE,
            "few_samples": FEW_SAMPLES,
            "small_class": SMALL_CLASS,
        },
        "models": [
            {
                "model": r["model"],
                "sentences": model_paragraph(r, s),
                "bands": [c.to_dict() for c in band_changes(r)],
            }
            for r, s in zip(reports, settings, strict=True)
        ],
        "comparison": comparison(reports, settings),
    }
