"""The report's sample gallery: the most and least affected samples, profiled exactly."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import numpy as np

from interscope._exceptions import InterscopeError
from interscope._findings import band_of
from interscope._models import AuditReport, ProfileResult
from interscope._options import ProfileOptions

#: Samples drawn by default: the most affected and the least affected one.
DEFAULT_COUNT = 2
#: The gallery's exact profiles cost 2^n forwards per input: 65,536 at 16 players (about 1.5 s
#: for the demo CNN on one core); beyond that it draws no heatmaps rather than wait minutes.
MAX_EXACT_PLAYERS = 16


class _Profiler(Protocol):
    """What the gallery needs of a client: one exact Profile call."""

    def profile(
        self, *, model: str, x: np.ndarray, label: np.ndarray, options: ProfileOptions
    ) -> ProfileResult: ...


def choose(report: AuditReport, count: int) -> list[tuple[int, str]]:
    """(sample index, why) of `count` samples: alternately the most and the least affected by
    the attack, by utility change v(N|x) - v(N|x_adv); samples without x_adv are skipped, and
    so are those misclassified clean while others remain (the attack had nothing to do there,
    so "least affected" would only say that)."""
    usable = [
        (i, s)
        for i, s in enumerate(report.samples)
        if s.error is None
        and s.perturbation is not None
        and s.adversarial is not None
        and math.isfinite(s.perturbation.utility_change)
    ]
    correct = [(i, s) for i, s in usable if s.clean_correct]
    scored = [(s.perturbation.utility_change, i) for i, s in (correct or usable) if s.perturbation]
    scored.sort()
    chosen: list[tuple[int, str]] = []
    most, least = len(scored) - 1, 0
    while len(chosen) < min(count, len(scored)):
        if len(chosen) % 2 == 0:
            chosen.append((scored[most][1], "most affected"))
            most -= 1
        else:
            chosen.append((scored[least][1], "least affected"))
            least += 1
    return chosen


def cell_totals(result: Any, ratios: np.ndarray) -> tuple[list[float], list[float]]:
    """Per player: total |I^(m)(i, j)| over its pairs, averaged over the low and over the high
    orders (ratio bands as in the findings)."""
    pairs = np.asarray(result.pairs, dtype=np.int64)
    inter = np.abs(np.asarray(result.interactions, dtype=np.float64))
    n = int(result.n_players)
    per_order = np.zeros((inter.shape[0], n))
    for column, (i, j) in enumerate(pairs):
        per_order[:, i] += inter[:, column]
        per_order[:, j] += inter[:, column]
    bands = np.array([band_of(float(r)) for r in ratios])
    low = per_order[bands == 0].mean(axis=0) if np.any(bands == 0) else np.full(n, math.nan)
    high = per_order[bands == 2].mean(axis=0) if np.any(bands == 2) else np.full(n, math.nan)
    return low.tolist(), high.tolist()


def build_gallery(
    client: _Profiler,
    report: AuditReport,
    x: np.ndarray,
    profile: ProfileOptions,
    *,
    count: int = DEFAULT_COUNT,
    classes: list[str] | None = None,
    layout: str = "",
) -> dict[str, Any]:
    """The gallery of `report` (audited with return_adversarial): per chosen sample, the
    inputs, predictions, margins and the exact profile (Shapley values, per-cell pairwise
    strength at low and high orders) of the clean and the adversarial input.

    The exact estimator is used so that Shapley values exist at all (sampled profiles give
    none) and every order is there; it needs 2^n forwards per input, so a model with too many
    players gets a gallery without heatmaps and a note saying why.
    """
    entries: list[dict[str, Any]] = []
    note = ""
    if report.n_players > MAX_EXACT_PLAYERS:
        note = (
            f"no heatmaps: their exact profiles of {report.n_players} players would need "
            f"2^{report.n_players} forwards per input (the gallery draws them up to "
            f"{MAX_EXACT_PLAYERS} players)"
        )
    exact = dataclasses.replace(
        profile,
        estimator="exact",
        return_pairs=True,
        orders=None,
        ratios=None,
        pairs=None,
        num_pairs=0,
        neighbor_radius=0,
        contexts_per_order=0,
        context_sharing="shared",
    )
    names = classes or []
    for index, why in choose(report, count):
        sample = report.samples[index]
        assert sample.adversarial is not None
        clean_x = np.asarray(x[index], dtype=np.float32)
        adv_x = np.asarray(sample.adversarial, dtype=np.float32).reshape(clean_x.shape)
        entry: dict[str, Any] = {
            "id": sample.id,
            "why": why,
            "label": sample.label,
            "label_name": _name(names, sample.label),
            "clean_prediction": sample.clean_prediction,
            "clean_prediction_name": _name(names, sample.clean_prediction),
            "adversarial_prediction": sample.adversarial_prediction,
            "adversarial_prediction_name": _name(names, sample.adversarial_prediction),
            "clean_margin": sample.clean_margin,
            "adversarial_margin": sample.adversarial_margin,
            "utility_change": sample.perturbation.utility_change if sample.perturbation else None,
            "linf": sample.linf,
            "x": clean_x.tolist(),
            "x_adv": adv_x.tolist(),
        }
        if not note:
            try:
                result = client.profile(
                    model=report.model,
                    x=np.stack([clean_x, adv_x]),
                    label=np.array([sample.label, sample.label]),
                    options=exact,
                )
            except (InterscopeError, ValueError) as error:
                note = f"no heatmaps: the exact profile they need was refused ({error})"
            else:
                entry.update(_profiles(result))
        entries.append(entry)
    grid = list(profile.grid) if profile.grid is not None else None
    image = layout != "features" and entries and np.asarray(entries[0]["x"]).ndim > 1
    if grid is None and not note and image:
        note = "no heatmaps over the image: they need grid players"
    # The input layout ("NCHW", "NHWC", "features"; "" from older servers) says how to draw x.
    return {"entries": entries, "grid": grid, "note": note, "layout": layout}


def _name(classes: list[str], label: int) -> str:
    return classes[label] if 0 <= label < len(classes) else str(label)


def _profiles(result: ProfileResult) -> dict[str, Any]:
    clean, adv = result.profiles
    out: dict[str, Any] = {"n_players": clean.n_players, "profile_orders": clean.orders.tolist()}
    for key, p in (("clean", clean), ("adversarial", adv)):
        low, high = cell_totals(p, p.ratios)
        shapley = p.shapley_values
        out[f"shapley_{key}"] = None if shapley is None else np.asarray(shapley).tolist()
        out[f"cells_low_{key}"] = low
        out[f"cells_high_{key}"] = high
        out[f"value_{key}"] = p.value_full
        # Efficiency: the Shapley values sum to v(N) - v(0); the page shows the gap.
        out[f"efficiency_gap_{key}"] = (
            None if shapley is None else float(np.sum(shapley) - (p.value_full - p.value_empty))
        )
    return out
