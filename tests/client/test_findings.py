"""The report's written summary on synthetic audits whose answers are known by construction."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from interscope._findings import band_changes, findings, interval, proportion
from interscope.report import render_html, settings

ORDERS = [1, 4, 7, 10, 13]  # n = 16: ratios 1/14 .. 13/14, two low, one middle, two high


def _report(
    model: str,
    rise: tuple[float, float, float],
    *,
    n: int = 40,
    noise: float = 0.01,
    robust: float = 0.25,
    seed: int = 0,
) -> dict[str, Any]:
    """An audit of `n` samples whose adversarial |I| is the clean one times 1 + rise[band]
    plus Gaussian noise of sd `noise` (relative): the true relative changes are `rise`."""
    rng = np.random.default_rng(seed)
    bands = [0, 0, 1, 2, 2]
    samples = []
    for k in range(n):
        clean = np.full(len(ORDERS), 1.0)
        adv = clean * (1 + np.array([rise[b] for b in bands])) + rng.normal(0, noise, len(ORDERS))
        samples.append(
            {
                "id": str(k),
                "error": None,
                "orders": ORDERS,
                "clean_mean_abs": clean.tolist(),
                "adversarial_mean_abs": adv.tolist(),
            }
        )
    return {
        "model": model,
        "n_players": 16,
        "n_samples": n,
        "n_failed": 0,
        "clean_accuracy": 1.0,
        "robust_accuracy": robust,
        "config": {
            "attack": {"kind": "ATTACK_KIND_PGD", "norm": "NORM_LINF", "eps": 0.1, "steps": 10},
            "profile": {
                "players": {"grid": {"rows": 4, "cols": 4}},
                "estimator": "ESTIMATOR_KIND_SAMPLED",
                "value": "VALUE_FUNCTION_LOG_PROB",
                "sampling": {"contexts_per_order": 16},
            },
        },
        "profile": {
            "orders": ORDERS,
            "ratios": [m / 14 for m in ORDERS],
            "clean_mean_abs": [1.0] * 5,
            "adversarial_mean_abs": [1.0] * 5,
            "delta_mean": [0.0] * 5,
        },
        "per_class": [
            {"label": 0, "name": "zero", "n": n - 1, "clean_accuracy": 1.0, "robust_accuracy": 0.3},
            {"label": 1, "name": "one", "n": 1, "clean_accuracy": 1.0, "robust_accuracy": 0.0},
        ],
        "samples": samples,
    }


def _sentences(*reports: dict[str, Any]) -> dict[str, Any]:
    return findings(list(reports), [settings(r) for r in reports])


def test_a_rise_only_at_high_orders_is_called_the_papers_signature() -> None:
    out = _sentences(_report("a", (0.0, 0.0, 0.45)))
    text = " ".join(out["models"][0]["sentences"])
    assert "robust accuracy is 0.25 (10 of 40 samples" in text
    assert "under PGD (L∞, eps 0.1, 10 steps)" in text
    assert "+0% / +0% / +45% at low / middle / high orders" in text
    assert "worked mainly through high-order interactions" in text
    high = next(b for b in out["models"][0]["bands"] if b["band"] == "high")
    assert high["relative"]["mean"] == pytest.approx(0.45, abs=0.01)
    assert high["relative"]["ci"][0] > 0.4


def test_no_change_claims_no_effect() -> None:
    text = " ".join(_sentences(_report("a", (0.0, 0.0, 0.0)))["models"][0]["sentences"])
    assert "every 95% interval includes zero" in text
    assert "mainly" not in text and "rose" not in text


def test_overlapping_intervals_do_not_say_which_orders() -> None:
    # High rises more on average than low, but with this noise and 12 samples their
    # intervals overlap: the page must not claim the high-order signature.
    report = _report("a", (0.20, 0.2, 0.30), n=12, noise=0.2, seed=3)
    low, _, high = band_changes(report)
    assert high.relative.low > 0.05 and low.relative.high > high.relative.low
    text = " ".join(_sentences(report)["models"][0]["sentences"])
    assert "do not show which orders the attack worked through" in text
    assert "mainly through high-order" not in text


def test_a_rise_at_low_orders_only_is_reported_as_such() -> None:
    text = " ".join(_sentences(_report("a", (0.3, 0.0, 0.0)))["models"][0]["sentences"])
    assert "Only low-order strength rose (+30%" in text
    assert "the change at middle and high orders is within noise" in text


def test_few_samples_and_a_single_sample_are_flagged() -> None:
    few = " ".join(_sentences(_report("a", (0.0, 0.0, 0.45), n=6))["models"][0]["sentences"])
    assert "Only 6 samples: the intervals are rough" in few
    one = " ".join(_sentences(_report("a", (0.0, 0.0, 0.45), n=1))["models"][0]["sentences"])
    assert "One sample gives no interval, so no change is claimed." in one


def test_two_models_compared_only_as_far_as_the_intervals_allow() -> None:
    weak = _report("weak", (0.0, 0.0, 0.45), robust=0.1, seed=1)
    strong = _report("strong", (0.0, 0.0, 0.10), robust=0.8, seed=2)
    text = " ".join(_sentences(weak, strong)["comparison"])
    assert "strong is more robust than weak: robust accuracy 0.80 vs 0.10" in text
    assert "+45% on weak and +10% on strong" in text
    assert "weak's predictions were moved more through complex contexts" in text
    close = _report("close", (0.0, 0.0, 0.45), robust=0.15, seed=4)
    text = " ".join(_sentences(weak, close)["comparison"])
    assert "cannot be told apart at these sample sizes" in text
    assert "the two cannot be told apart" in text
    other = _report("other", (0.0, 0.0, 0.45))
    other["config"]["attack"]["eps"] = 0.3
    assert "different settings" in " ".join(_sentences(weak, other)["comparison"])


def test_intervals_match_known_values() -> None:
    # Wilson 95% for 0 of 10 has upper bound 0.2775 (the normal one would claim [0, 0]).
    zero = proportion(0, 10)
    assert zero.mean == 0 and zero.low == 0 and zero.high == pytest.approx(0.2775, abs=1e-4)
    half = interval(np.array([1.0, 3.0]))
    assert half.mean == 2 and half.high - 2 == pytest.approx(1.959964 * np.sqrt(2) / np.sqrt(2))


def test_page_states_settings_in_words_and_flags_small_classes() -> None:
    page = render_html([_report("a", (0.0, 0.0, 0.45))])
    assert "ATTACK_KIND" not in page.split("raw configuration")[0]
    for shown in ("PGD", "L∞", "4×4 grid of cells (16 players)", "log p(y | x)", "16 per order"):
        assert shown in page
    assert "1, 4, 7, 10, 13 (not computed: 0, 2, 3, 5, 6, 8, 9, 11, 12, 14)" in page
    # Fields the spec leaves at 0 mean the server's default: one restart, not zero.
    assert settings(_report("a", (0.0, 0.0, 0.45)))["restarts"] == "1"
    assert "one <em>(small n)</em>" in page and "zero <em>(small n)</em>" not in page
    assert page.count("<img ") == page.count("<img alt='")


def test_gallery_cell_totals_sum_each_players_pairs_by_band() -> None:
    from types import SimpleNamespace

    from interscope._gallery import cell_totals

    # n = 4 (orders 0, 1, 2; ratios 0, 0.5, 1): pairs (0,1), (0,2), (2,3).
    result = SimpleNamespace(
        n_players=4,
        pairs=np.array([[0, 1], [0, 2], [2, 3]]),
        interactions=np.array([[1.0, -2.0, 3.0], [9.0, 9.0, 9.0], [0.5, 0.0, -4.0]]),
    )
    low, high = cell_totals(result, np.array([0.0, 0.5, 1.0]))
    assert low == [3.0, 1.0, 5.0, 3.0]  # order 0 only: |1| + |-2|, |1|, |-2| + |3|, |3|
    assert high == [0.5, 0.5, 4.0, 4.0]  # order 2 only


def test_gallery_pages_for_image_and_tabular_models(tmp_path: Path) -> None:
    from interscope.report import write_report

    rng = np.random.default_rng(0)
    image = rng.random((1, 8, 8))
    tabular = rng.random(4)
    maps = {
        f"{kind}_{which}": rng.normal(size=4).tolist()
        for kind in ("shapley", "cells_low", "cells_high")
        for which in ("clean", "adversarial")
    }

    def entry(x: np.ndarray) -> dict[str, Any]:
        names = {
            "label_name": "a",
            "clean_prediction_name": "a",
            "adversarial_prediction_name": "b",
        }
        return {"id": "s0", "why": "most affected", "x": x.tolist(),
                "x_adv": (x + 0.1).tolist(), **names, **maps}  # fmt: skip

    for name, x, grid in (("img", image, [2, 2]), ("tab", tabular, None)):
        report = _report(name, (0.0, 0.0, 0.45))
        report["gallery"] = {"entries": [entry(x)], "grid": grid, "note": ""}
        write_report(report, tmp_path / name)
        page = (tmp_path / name / "report.html").read_text()
        assert page.count("<img alt='Sample s0 (most affected), label a") == 1
        # The PDF: the summary page, two plots (no order terms here) and the sample.
        pdf = (tmp_path / name / "report.pdf").read_bytes()
        assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type /Page\b", pdf)) == 4


def _with_specificity(report: dict[str, Any], low: float, high: float) -> dict[str, Any]:
    """`report` with specificity scores `low` on its two low orders and `high` on the rest, and
    class patterns for three classes over pairs (0, 1) and (1, 2)."""
    adjusted = [low, low, high, high, high]
    found = {
        "eta_squared": [0.5 + a / 2 for a in adjusted],
        "adjusted": adjusted,
        "chance": 0.25,
        "n_samples": 40,
        "classes": [0, 1, 2],
        "class_counts": [20, 10, 10],
        "pairs": [[0, 1], [1, 2]],
        "lowest_order_class_means": [[1.0, -1.0], [0.5, 0.0], [-2.0, 2.0]],
    }
    report["specificity"] = {"clean": found, "adversarial": {**found, "adjusted": [0.1] * 5}}
    report["profile"]["clean_disentanglement"] = [0.9, 0.8, 0.7, 0.6, 0.5]
    report["profile"]["adversarial_disentanglement"] = [0.8, 0.7, 0.6, 0.5, 0.4]
    return report


def test_report_shows_specificity_and_disentanglement_by_band(tmp_path: Path) -> None:
    from interscope._demo import specificity_table
    from interscope.report import specificity_rows, write_report

    reports = [
        _with_specificity(_report("std", (0.0, 0.0, 0.45)), 0.3, 0.1),
        _with_specificity(_report("adv", (0.0, 0.0, 0.2)), 0.6, 0.2),
    ]
    rows = specificity_rows(reports)
    assert rows[1]["adjusted"][0] == (0.6, 0.1)  # low band: clean, adversarial
    assert rows[1]["adjusted"][2] == pytest.approx((0.2, 0.1))  # high band
    assert rows[0]["disentanglement"][0] == pytest.approx((0.85, 0.75))
    assert rows[0]["chance"] == 0.25
    written = write_report(reports, tmp_path)
    for name in ("specificity_by_order.png", "disentanglement_by_order.png", "class_patterns.png"):
        assert written[name].read_bytes().startswith(b"\x89PNG")
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Category specificity and disentanglement</h2>" in page
    assert "<tr><td>adv</td><td>0.250</td><td>0.600 / 0.100</td>" in page
    for title in ("Category specificity by order", "Disentanglement by order"):
        assert f"<img alt='{title}." in page
    assert "<img alt='Per-class interaction patterns at the lowest order." in page
    saved = json.loads((tmp_path / "adv" / "report.json").read_text())
    assert saved["specificity"]["clean"]["adjusted"][0] == 0.6
    table = specificity_table(reports).splitlines()
    assert " ".join(table[3].split()) == (
        "adv 0.600 -> 0.100 0.200 -> 0.100 0.200 -> 0.100 0.850 -> 0.750 0.550 -> 0.450"
    )


def test_report_without_specificity_leaves_the_section_out() -> None:
    page = render_html([_report("a", (0.0, 0.0, 0.45))])
    assert "Category specificity" not in page
