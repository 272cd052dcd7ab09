"""Audit reports: report.json, PNG plots and one self-contained HTML page (images inlined)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from interscope._findings import BAND_NAMES, SMALL_CLASS, findings, interval, order_ratios
from interscope._models import AuditReport
from interscope._summary import Z95

ReportLike = AuditReport | dict[str, Any]

#: PNG files written next to the HTML page.
PLOT_FILES = (
    "interactions_by_order.png",
    "delta_by_order.png",
    "contribution_by_order.png",
    "specificity_by_order.png",
    "disentanglement_by_order.png",
    "class_patterns.png",
)

#: One colour per model for the whole report (Okabe-Ito: tells apart under colour blindness).
MODEL_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")

_ATTACKS = {
    "ATTACK_KIND_FGSM": "FGSM",
    "ATTACK_KIND_PGD": "PGD",
    "ATTACK_KIND_PGD_MARGIN": "PGD stopped at a logit margin",
    "ATTACK_KIND_APGD": "APGD",
    "ATTACK_KIND_SQUARE": "Square (black-box)",
    "ATTACK_KIND_SIMBA": "SimBA (black-box)",
    "ATTACK_KIND_AUTOATTACK": "AutoAttack (standard)",
    "ATTACK_KIND_FAB": "FAB",
}
_NORMS = {"NORM_LINF": "L∞", "NORM_L2": "L2"}
_VALUES = {
    "VALUE_FUNCTION_LOG_PROB": "log p(y | x)",
    "VALUE_FUNCTION_LOG_ODDS": "log-odds of y",
    "VALUE_FUNCTION_LOGIT": "logit z_y",
    "VALUE_FUNCTION_PROB": "p(y | x)",
}
_ESTIMATORS = {
    "ESTIMATOR_KIND_AUTO": "auto",
    "ESTIMATOR_KIND_EXACT": "exact (all 2^n subsets)",
    "ESTIMATOR_KIND_SAMPLED": "sampled contexts",
}


def as_dict(report: ReportLike) -> dict[str, Any]:
    """The report.json form of a report (AuditReport.to_dict(), or a dict read back)."""
    return report.to_dict() if isinstance(report, AuditReport) else report


def load_report(path: str | Path) -> dict[str, Any]:
    """A report.json read back (or the report.json inside a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "profile" not in data or "samples" not in data:
        raise ValueError(f"{path} is not an interscope report.json")
    return data


def band_means(report: dict[str, Any], key: str) -> tuple[float, float, float]:
    """Mean of a per-order curve over low (ratio <= 1/3), middle and high (> 2/3) orders."""
    return _bands(report, report["profile"].get(key) or [])


def _bands(report: dict[str, Any], values: Sequence[Any]) -> tuple[float, float, float]:
    """Mean of per-order `values` (None: not known) over the low, middle and high bands."""
    bands: tuple[list[float], list[float], list[float]] = ([], [], [])
    if not values:  # a report.json without this curve
        return (math.nan, math.nan, math.nan)
    for ratio, value in zip(order_ratios(report), values, strict=True):
        if value is None:
            continue
        bands[0 if ratio <= 1 / 3 else 1 if ratio <= 2 / 3 else 2].append(float(value))
    return (
        sum(bands[0]) / len(bands[0]) if bands[0] else math.nan,
        sum(bands[1]) / len(bands[1]) if bands[1] else math.nan,
        sum(bands[2]) / len(bands[2]) if bands[2] else math.nan,
    )


# -- settings ---------------------------------------------------------------------------------


def _spec(report: dict[str, Any]) -> dict[str, Any]:
    """The attack and profile settings as the server resolved them (its defaults filled in),
    else as the client sent them."""
    for summary in report.get("server_summaries") or []:
        spec = (summary.get("provenance") or {}).get("spec")
        if spec:
            return dict(spec)
    return dict(report.get("config") or {})


def _players(profile: dict[str, Any], n_players: int) -> str:
    players = profile.get("players") or {}
    if "grid" in players:
        grid = players["grid"]
        return f"{grid.get('rows', 0)}×{grid.get('cols', 0)} grid of cells ({n_players} players)"
    if "features" in players:
        return f"feature groups ({n_players} players)"
    if "mask" in players:
        return f"a mask of player ids ({n_players} players)"
    return f"{n_players} players"


def _baseline(profile: dict[str, Any]) -> str:
    baseline = profile.get("baseline") or {"zero": True}
    if "mean" in baseline:
        return "per-channel mean"
    if "constant" in baseline:
        return f"constant {baseline['constant']:g}"
    if "blur" in baseline:
        return "blurred copy of the input"
    if "tensor" in baseline:
        return "a given tensor"
    return "zero"


def _contexts(profile: dict[str, Any]) -> str:
    if profile.get("estimator") == "ESTIMATOR_KIND_EXACT":
        return "all subsets"
    sampling = profile.get("sampling") or {}
    count = int(sampling.get("contexts_per_order") or 0)
    text = f"{count} per order" if count else "the server's default"
    sharing = sampling.get("context_sharing", "CONTEXT_SHARING_AUTO")
    if sharing == "CONTEXT_SHARING_INDEPENDENT":
        text += ", separate per pair"
    return text


def _orders_text(report: dict[str, Any]) -> str:
    orders = ", ".join(str(m) for m in report["profile"].get("orders") or []) or "none"
    missing = _missing_orders(report)
    return orders + (f" (not computed: {', '.join(map(str, missing))})" if missing else " (all)")


def settings(report: ReportLike) -> dict[str, str]:
    """The settings table of one model, in human names (the raw config stays in report.json)."""
    data = as_dict(report)
    spec = _spec(data)
    attack, profile = spec.get("attack") or {}, spec.get("profile") or {}
    steps = int(attack.get("steps") or 0)
    versions: dict[str, str] = {}
    for summary in data.get("server_summaries") or []:
        versions.update((summary.get("provenance") or {}).get("versions") or {})
    return {
        "model": f"{data['model']} ({str(data.get('model_content_hash', ''))[:19] or 'no hash'})",
        "attack": _ATTACKS.get(str(attack.get("kind", "")), str(attack.get("kind", "?"))),
        "norm": _NORMS.get(str(attack.get("norm", "")), str(attack.get("norm", "?"))),
        "eps": f"{float(attack.get('eps', 0.0)):g}",
        "steps": str(steps) if steps else "the attack's default",
        "step size": f"{float(attack['step_size']):g}" if attack.get("step_size") else "default",
        "restarts": str(int(attack.get("restarts") or 1)),  # 0 on the wire: the default, 1
        "players": _players(profile, int(data.get("n_players") or 0)),
        "baseline": _baseline(profile),
        "value function": _VALUES.get(str(profile.get("value", "")), "log p(y | x)"),
        "estimator": _ESTIMATORS.get(str(profile.get("estimator", "")), "auto"),
        "contexts": _contexts(profile),
        "orders computed": _orders_text(data),
        "seed": f"attack {attack.get('seed', 0)}, profile {profile.get('seed', 0)}",
        "samples": f"{data.get('n_samples', 0)} audited, {data.get('n_failed', 0)} failed",
        "server versions": ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        or "not reported",
    }


# -- plots -------------------------------------------------------------------------------------


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _ci(profile: dict[str, Any], key: str) -> tuple[list[float], list[float]] | None:
    ci = profile.get(f"{key}_ci")
    if not ci or len(ci) != 2 or any(v is None for v in ci[0] + ci[1]):
        return None
    return ci[0], ci[1]


def _order_axis(axes: Any, reports: Sequence[dict[str, Any]]) -> None:
    """Orders on the x axis, every computed order ticked (no order hides between ticks)."""
    orders = sorted({int(m) for r in reports for m in r["profile"]["orders"]})
    if orders and len(orders) <= 32:
        axes.set_xticks(orders)
    n = max(int(r.get("n_players") or 0) for r in reports)
    axes.set_xlabel(f"order m (context size; n - 2 = {n - 2})" if n > 2 else "order m")
    axes.grid(alpha=0.3)


def _legend(axes: Any) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    else:  # e.g. a report.json without per-sample curves
        axes.text(0.5, 0.5, "no per-sample data", ha="center", transform=axes.transAxes)


def _per_sample(report: dict[str, Any], key: str) -> np.ndarray:
    """(samples, orders) of a per-sample curve; samples without it or with other orders left
    out."""
    orders = list(report["profile"]["orders"])
    rows = [
        s[key]
        for s in report.get("samples", [])
        if not s.get("error")
        and s.get(key) is not None
        and list(s.get("orders", orders)) == orders
        and len(s[key]) == len(orders)
    ]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(orders))


def _curve(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stats = [interval(rows[:, k]) for k in range(rows.shape[1])]
    return (
        np.array([s.mean for s in stats]),
        np.array([s.low for s in stats]),
        np.array([s.high for s in stats]),
    )


def interactions_figure(reports: Sequence[ReportLike]) -> Any:
    """PNG: mean |I^(m)| by order, clean (solid) vs adversarial (dashed), one colour per model."""
    return _by_order_figure(
        [as_dict(r) for r in reports],
        "mean_abs",
        "mean |I^(m)(i, j)|",
        "Interaction strength by order: clean (solid) vs adversarial (dashed)",
    )


def _by_order_figure(dicts: Sequence[dict[str, Any]], key: str, ylabel: str, title: str) -> Any:
    """One axes: profile[clean_KEY] solid and profile[adversarial_KEY] dashed per model, with
    their 95% CI bands."""
    from matplotlib.figure import Figure  # the `plot` extra; Figure avoids pyplot's globals

    figure = Figure(figsize=(8, 4.4))
    axes = figure.add_subplot()
    for n, report in enumerate(dicts):
        color = MODEL_COLORS[n % len(MODEL_COLORS)]
        profile, orders = report["profile"], report["profile"]["orders"]
        for which, style in (("clean", "-"), ("adversarial", "--")):
            values = profile.get(f"{which}_{key}")
            if not values:
                continue
            axes.plot(
                orders,
                [math.nan if v is None else float(v) for v in values],
                style,
                marker="o",
                ms=3,
                color=color,
                label=f"{report['model']} {which}",
            )
            ci = _ci(profile, f"{which}_{key}")
            if ci is not None:
                axes.fill_between(orders, ci[0], ci[1], color=color, alpha=0.12, lw=0)
    _order_axis(axes, dicts)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    _legend(axes)
    return figure


def delta_figure(reports: Sequence[ReportLike]) -> Any:
    """PNG: adversarial minus clean by order, signed mean I^(m) (left) and strength mean
    |I^(m)| (right), with 95% CIs: a rise caused by the attack reads upward."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    signed, strength = figure.subplots(1, 2)
    dicts = [as_dict(r) for r in reports]
    for n, report in enumerate(dicts):
        color = MODEL_COLORS[n % len(MODEL_COLORS)]
        profile, orders = report["profile"], report["profile"]["orders"]
        # delta_mean is clean - adversarial (the paper's Delta I); negate it so up means the
        # attack raised the interaction.
        rise = [-float(v) if v is not None else math.nan for v in profile["delta_mean"]]
        signed.plot(orders, rise, marker="o", ms=3, color=color, label=report["model"])
        ci = _ci(profile, "delta_mean")
        if ci is not None:
            signed.fill_between(
                orders, [-v for v in ci[1]], [-v for v in ci[0]], color=color, alpha=0.15, lw=0
            )
        clean = _per_sample(report, "clean_mean_abs")
        adv = _per_sample(report, "adversarial_mean_abs")
        if len(clean) and clean.shape == adv.shape:
            mean, low, high = _curve(adv - clean)
            strength.plot(orders, mean, marker="o", ms=3, color=color, label=report["model"])
            strength.fill_between(orders, low, high, color=color, alpha=0.15, lw=0)
    for axes, title, label in (
        (signed, "Signed interaction, adversarial − clean", "E[I^(m)(x_adv) − I^(m)(x)]"),
        (strength, "Strength, adversarial − clean", "E[|I^(m)(x_adv)| − |I^(m)(x)|]"),
    ):
        axes.axhline(0.0, color="black", lw=0.8)
        _order_axis(axes, dicts)
        axes.set_title(title + " (up: the attack raised it)", fontsize=10)
        axes.set_ylabel(label)
        _legend(axes)
    return figure


def contribution_figure(reports: Sequence[ReportLike]) -> Any | None:
    """PNG: each order's share of the utility drop v(x) - v(x_adv), the paper's order-weighted
    sum over ordered pairs of (n-1-m)/(n(n-1)) * Delta I^(m)(i,j); None without the data."""
    from matplotlib.figure import Figure

    dicts = [as_dict(r) for r in reports]
    rows = [_per_sample(r, "order_terms") for r in dicts]
    if not any(len(r) for r in rows):
        return None
    figure = Figure(figsize=(8, 4.2))
    axes = figure.add_subplot()
    for n, (report, terms) in enumerate(zip(dicts, rows, strict=True)):
        if not len(terms):
            continue
        color = MODEL_COLORS[n % len(MODEL_COLORS)]
        orders = report["profile"]["orders"]
        mean, low, high = _curve(terms)
        axes.plot(orders, mean, marker="o", ms=3, color=color, label=report["model"])
        axes.fill_between(orders, low, high, color=color, alpha=0.15, lw=0)
    axes.axhline(0.0, color="black", lw=0.8)
    _order_axis(axes, dicts)
    axes.set_ylabel("Σ_(i≠j) (n−1−m)/(n(n−1)) · ΔI^(m)(i, j)")
    axes.set_title("Each order's contribution to the utility drop v(x) − v(x_adv) (up: lowers v)")
    _legend(axes)
    return figure


def _image(values: np.ndarray, layout: str = "") -> tuple[np.ndarray, bool]:
    """An (H, W) or (H, W, 3) array for imshow from one input, and whether it is an image.
    The model's layout decides; without one (older servers), channels-first (C, H, W) with C
    of 1 or 3 is taken, then channels-last."""
    if layout == "features":
        return values.reshape(-1), False
    if values.ndim == 2:
        return values, True
    if values.ndim == 3:
        if layout == "NCHW" or (layout != "NHWC" and values.shape[0] in (1, 3)):
            values = np.moveaxis(values, 0, -1)
        if values.shape[-1] == 1:
            return values[..., 0], True
        if values.shape[-1] == 3:
            return values, True
    return values.reshape(-1), False


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((values - low) / (high - low if high > low else 1.0), 0.0, 1.0)


def sample_figure(entry: dict[str, Any], grid: list[int] | None, layout: str = "") -> Any:
    """PNG of one gallery sample: inputs, amplified perturbation, and heatmaps over the image
    (or bar charts per feature for a tabular model)."""
    from matplotlib.figure import Figure

    clean = np.asarray(entry["x"], dtype=np.float64)
    adv = np.asarray(entry["x_adv"], dtype=np.float64)
    picture, is_image = _image(clean, layout)
    maps = [
        ("Shapley value", "shapley", "RdBu_r", True),
        ("pairwise |I|, low orders", "cells_low", "viridis", False),
        ("pairwise |I|, high orders", "cells_high", "viridis", False),
    ]
    have_maps = entry.get("shapley_clean") is not None or entry.get("cells_low_clean") is not None
    if not is_image:
        return _plot_tabular(entry, clean, adv, maps if have_maps else [])
    adv_picture, _ = _image(adv, layout)
    low, high = float(min(clean.min(), adv.min())), float(max(clean.max(), adv.max()))
    delta = adv - clean
    scale = float(np.abs(delta).max())
    rows = 1 + (1 if have_maps and grid else 0)
    figure = Figure(figsize=(13, 3.2 * rows), layout="constrained")
    # One subfigure per row: the rows' colour bars then take room in their own row only.
    subfigures = figure.subfigures(rows, 1, squeeze=False)[:, 0]
    panels = [sub.subplots(1, 6 if rows > 1 else 3, squeeze=False)[0] for sub in subfigures]
    gray = "gray" if picture.ndim == 2 else None
    top = panels[0]
    top[0].imshow(_scaled(picture, low, high), cmap=gray)
    top[0].set_title(f"clean: {entry['clean_prediction_name']}", fontsize=9)
    top[1].imshow(_scaled(adv_picture, low, high), cmap=gray)
    top[1].set_title(f"adversarial: {entry['adversarial_prediction_name']}", fontsize=9)
    amplified, _ = _image(delta / scale if scale > 0 else delta, layout)
    shown = amplified if amplified.ndim == 2 else amplified.mean(axis=-1)
    image = top[2].imshow(shown, cmap="RdBu_r", vmin=-1, vmax=1)
    top[2].set_title(f"perturbation ×{1 / scale if scale else 1:.3g} (max {scale:.3g})", fontsize=9)
    subfigures[0].colorbar(image, ax=top[2], fraction=0.046)
    for axes in top[3:]:
        axes.set_visible(False)
    if rows > 1 and grid:
        for column, (title, key, cmap, signed) in enumerate(maps):
            pair = [entry.get(f"{key}_clean"), entry.get(f"{key}_adversarial")]
            bottom = panels[1][2 * column : 2 * column + 2]
            if pair[0] is None or pair[1] is None:
                for axes in bottom:
                    axes.set_visible(False)
                continue
            cells = [np.asarray(p, dtype=np.float64).reshape(grid) for p in pair]
            # One colour scale for clean and adversarial, so the two maps can be compared.
            top_value = float(max(np.nanmax(np.abs(c)) for c in cells)) or 1.0
            limits = (-top_value, top_value) if signed else (0.0, top_value)
            for axes, cell_map, which, source in zip(
                bottom, cells, ("clean", "adversarial"), (picture, adv_picture), strict=True
            ):
                height, width = source.shape[:2]
                axes.imshow(_scaled(source, low, high), cmap=gray)
                drawn = axes.imshow(
                    cell_map,
                    cmap=cmap,
                    vmin=limits[0],
                    vmax=limits[1],
                    alpha=0.6,
                    extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                    interpolation="nearest",
                )
                axes.set_title(f"{title}\n{which}", fontsize=8)
            subfigures[1].colorbar(drawn, ax=list(bottom), fraction=0.046)
    for axes in (a for row in panels for a in row):
        axes.set_xticks([])
        axes.set_yticks([])
    return figure


def _plot_tabular(
    entry: dict[str, Any],
    clean: np.ndarray,
    adv: np.ndarray,
    maps: list[tuple[str, str, str, bool]],
) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 2.6 * (1 + len(maps))), layout="constrained")
    panels = figure.subplots(1 + len(maps), 1, squeeze=False)[:, 0]
    width = 0.4
    rows: list[tuple[str, Any, Any]] = [("input value", clean.reshape(-1), adv.reshape(-1))]
    rows += [(t, entry.get(f"{k}_clean"), entry.get(f"{k}_adversarial")) for t, k, _, _ in maps]
    for axes, (title, first, second) in zip(panels, rows, strict=True):
        if first is None or second is None:
            axes.set_visible(False)
            continue
        index = np.arange(len(first))
        axes.bar(index - width / 2, first, width, label="clean", color="#0072B2")
        axes.bar(index + width / 2, second, width, label="adversarial", color="#D55E00")
        axes.set_title(title, fontsize=9)
        axes.set_xticks(index)
        axes.legend(fontsize=7)
        axes.axhline(0.0, color="black", lw=0.6)
    panels[-1].set_xlabel("player (feature or feature group)")
    return figure


def plot_interactions(reports: Sequence[ReportLike]) -> bytes:
    """PNG of `interactions_figure`."""
    return _png(interactions_figure(reports))


def plot_delta(reports: Sequence[ReportLike]) -> bytes:
    """PNG of `delta_figure`."""
    return _png(delta_figure(reports))


def plot_contribution(reports: Sequence[ReportLike]) -> bytes | None:
    """PNG of `contribution_figure`; None without per-sample order terms."""
    figure = contribution_figure(reports)
    return None if figure is None else _png(figure)


def plot_sample(entry: dict[str, Any], grid: list[int] | None, layout: str = "") -> bytes:
    """PNG of `sample_figure`."""
    return _png(sample_figure(entry, grid, layout))


def _text_page(dicts: Sequence[dict[str, Any]], found: dict[str, Any]) -> Any:
    """The PDF's first page: the summary sentences and each model's settings, as text."""
    import textwrap

    from matplotlib.figure import Figure

    lines = ["interscope audit report", ""]
    for model in found["models"]:
        lines += [*textwrap.wrap(" ".join(model["sentences"]), 100), ""]
    if found["comparison"]:
        lines += [*textwrap.wrap(" ".join(found["comparison"]), 100), ""]
    for report in dicts:
        lines.append(f"Settings of {report['model']}:")
        for key, value in settings(report).items():
            lines += textwrap.wrap(f"  {key}: {value}", 100, subsequent_indent="      ")
        lines.append("")
    figure = Figure(figsize=(8.27, 11.69))  # A4 portrait
    figure.text(0.06, 0.97, "\n".join(lines), va="top", family="DejaVu Sans", fontsize=7.5)
    return figure


# -- HTML --------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def comparison_rows(reports: Sequence[ReportLike]) -> list[dict[str, Any]]:
    """Per model: accuracies and low/middle/high-order strength, clean and adversarial."""
    rows = []
    for report in (as_dict(r) for r in reports):
        clean = band_means(report, "clean_mean_abs")
        adv = band_means(report, "adversarial_mean_abs")
        rows.append(
            {
                "model": report["model"],
                "n_samples": report["n_samples"],
                "clean_accuracy": report["clean_accuracy"],
                "robust_accuracy": report["robust_accuracy"],
                "low": (clean[0], adv[0]),
                "middle": (clean[1], adv[1]),
                "high": (clean[2], adv[2]),
            }
        )
    return rows


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:0 auto;padding:1em;max-width:1400px;"
    "color:#222;line-height:1.45}"
    ".scroll{overflow-x:auto}table{border-collapse:collapse;margin:.6em 0}"
    "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%;height:auto}"
    ".note{color:#555;font-size:90%}.small td{background:#fff4e0}"
    ".finding{border-left:5px solid var(--c);padding:.2em .9em;margin:.8em 0;background:#fafafa}"
    ".swatch{display:inline-block;width:.9em;height:.9em;background:var(--c);margin-right:.3em;"
    "vertical-align:-.1em}.settings td{text-align:left}"
    "figure{margin:1em 0}figcaption{font-size:92%;color:#444}"
    "@media (max-width:700px){body{padding:.4em}td,th{padding:3px 5px;font-size:90%}}"
)


def _img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode()
    return f"<img alt='{html.escape(alt, quote=True)}' src='data:image/png;base64,{encoded}'>"


def _missing_orders(report: dict[str, Any]) -> list[int]:
    n = int(report.get("n_players") or 0)
    computed = {int(m) for m in report["profile"]["orders"]}
    return [m for m in range(max(n - 1, 0)) if m not in computed]


def _gallery_alt(entry: dict[str, Any]) -> str:
    return (
        f"Sample {entry['id']} ({entry['why']}), label {entry['label_name']}: clean input "
        f"predicted {entry['clean_prediction_name']}, adversarial input predicted "
        f"{entry['adversarial_prediction_name']}, the amplified perturbation, and heatmaps of "
        "Shapley values and of each cell's total pairwise interaction at low and high orders, "
        "clean and adversarial"
    )


def render_html(
    reports: Sequence[ReportLike],
    images: dict[str, bytes] | None = None,
    gallery_images: dict[str, list[bytes]] | None = None,
) -> str:
    """One self-contained HTML page: findings, settings, headline table, plots (inlined PNGs),
    the sample gallery and per-class tables."""
    dicts = [as_dict(r) for r in reports]
    images = images or {}
    gallery_images = gallery_images or {}
    table = [settings(r) for r in dicts]
    found = findings(dicts, table)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>interscope audit report</title><style>{_CSS}</style></head><body>",
        "<h1>interscope audit report</h1><h2>Summary</h2>",
    ]
    for n, model in enumerate(found["models"]):
        color = MODEL_COLORS[n % len(MODEL_COLORS)]
        text = " ".join(html.escape(s) for s in model["sentences"])
        parts.append(f"<p class='finding' style='--c:{color}'>{text}</p>")
    if found["comparison"]:
        parts.append("<p>" + " ".join(html.escape(s) for s in found["comparison"]) + "</p>")
    parts.append(
        "<p class='note'>How these sentences are decided: orders fall in bands by ratio "
        "m/(n−2) (low up to 1/3, middle up to 2/3, high above); a change is called a rise or "
        "fall only when its 95% interval over samples excludes zero; a rise is said to be "
        "mainly at high orders only when its lead over the low-order rise has an interval "
        "above zero. Percentages are changes of mean |I| relative to the clean mean.</p>"
    )
    parts.append("<h2>Settings</h2><div class='scroll'><table class='settings'><tr><th></th>")
    parts += [
        f"<th><span class='swatch' style='--c:{MODEL_COLORS[n % len(MODEL_COLORS)]}'></span>"
        f"{_fmt(r['model'])}</th>"
        for n, r in enumerate(dicts)
    ]
    parts.append("</tr>")
    for key in table[0]:
        cells = "".join(f"<td>{_fmt(row.get(key))}</td>" for row in table)
        parts.append(f"<tr><th>{_fmt(key)}</th>{cells}</tr>")
    parts.append("</table></div>")
    parts.append(
        "<h2>Models</h2><div class='scroll'><table><tr><th>model</th><th>samples</th>"
        "<th>clean acc</th><th>robust acc</th><th>|I| low (clean / adv)</th>"
        "<th>|I| middle</th><th>|I| high</th></tr>"
    )
    for row in comparison_rows(dicts):
        bands = "".join(
            f"<td>{_fmt(row[b][0])} / {_fmt(row[b][1])}</td>" for b in ("low", "middle", "high")
        )
        parts.append(
            f"<tr><td>{_fmt(row['model'])}</td><td>{row['n_samples']}</td>"
            f"<td>{_fmt(row['clean_accuracy'])}</td><td>{_fmt(row['robust_accuracy'])}</td>"
            f"{bands}</tr>"
        )
    parts.append("</table></div>")
    missing = {r["model"]: _missing_orders(r) for r in dicts}
    gaps = "; ".join(
        f"{model}: orders {', '.join(map(str, orders))} not computed"
        for model, orders in missing.items()
        if orders
    )
    order_note = "Every computed order is plotted and ticked" + (f" ({gaps})" if gaps else "") + "."
    captions = {
        "interactions_by_order.png": (
            "Interaction strength by order",
            "Mean |I^(m)| over pairs and samples by order m, clean solid and adversarial "
            "dashed, bands 95% CI over samples. " + order_note,
        ),
        "delta_by_order.png": (
            "What the attack changed, by order (adversarial minus clean)",
            "Left: signed mean interaction E[I(x_adv) − I(x)] (the paper's ΔI^(m) with its "
            "sign flipped, so a rise reads upward). Right: the same for strength |I|. Bands: "
            "95% CI over samples. " + order_note,
        ),
        "contribution_by_order.png": (
            "Each order's contribution to the utility drop",
            "Mean over samples of Σ over ordered pairs of (n−1−m)/(n(n−1)) · ΔI^(m)(i, j): the "
            "part of v(x) − v(x_adv) that order m carries (the paper's decomposition; with a "
            "subset of orders, that subset's share). Up: the order lowered the utility.",
        ),
    }
    captions.update(_specificity_captions())
    for name in PLOT_FILES:
        if name == "specificity_by_order.png":
            parts += _specificity_html(dicts)
        if name in images:
            title, caption = captions[name]
            parts.append(
                f"<h2>{title}</h2><figure>{_img(images[name], title + '. ' + caption)}"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    if not images:
        parts.append("<p class='note'>Plots need matplotlib: pip install 'interscope[plot]'.</p>")
    parts += _gallery_html(dicts, gallery_images)
    parts += _masking_html(dicts)
    for report in dicts:
        parts.append(
            f"<h2>Per class: {_fmt(report['model'])}</h2><div class='scroll'><table><tr>"
            "<th>class</th><th>n</th><th>clean acc</th><th>robust acc</th></tr>"
        )
        for c in report.get("per_class", []):
            small = int(c["n"]) < SMALL_CLASS
            flag = " <em>(small n)</em>" if small else ""
            parts.append(
                f"<tr{' class=small' if small else ''}><td>{_fmt(c['name'])}{flag}</td>"
                f"<td>{c['n']}</td><td>{_fmt(c['clean_accuracy'])}</td>"
                f"<td>{_fmt(c['robust_accuracy'])}</td></tr>"
            )
        config = html.escape(json.dumps(report.get("config", {}), indent=1, sort_keys=True))
        parts.append(
            f"</table></div><p class='note'>Rows marked small n have fewer than {SMALL_CLASS} "
            "samples: their accuracies say little.</p><details><summary>raw configuration "
            f"(fingerprint {_fmt(report.get('fingerprint', ''))})</summary><pre>{config}</pre>"
            "</details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _masking_html(dicts: Sequence[dict[str, Any]]) -> list[str]:
    """Per model: its robustness curve (a table with bars) and its gradient-masking flags."""
    parts: list[str] = []
    for report in dicts:
        flags = report.get("masking_flags") or []
        curve = report.get("robustness_curve")
        parts.append(f"<h2>Gradient masking: {_fmt(report['model'])}</h2>")
        if curve and curve.get("eps"):
            parts.append(
                "<div class='scroll'><table><tr><th>eps</th><th>robust acc</th><th></th></tr>"
            )
            for eps, acc in zip(curve["eps"], curve["robust_accuracy"], strict=True):
                width = 0 if acc is None else round(200 * float(acc))
                parts.append(
                    f"<tr><td>{_fmt(eps)}</td><td>{_fmt(acc)}</td><td><div style='width:"
                    f"{width}px;height:0.8em;background:#4477aa'></div></td></tr>"
                )
            parts.append(
                "</table></div><p class='note'>Robustness curve: robust accuracy at each eps "
                "of the audit's eps sweep (the attack only). A larger ball holds the smaller "
                "one, so it should never rise.</p>"
            )
        if not flags:
            parts.append("<p>No gradient-masking flag was raised.</p>")
        for flag in flags:
            numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(flag["numbers"].items()))
            parts.append(
                f"<p><strong>{_fmt(flag['code'])}</strong> ({numbers}): {_fmt(flag['meaning'])}"
                f" <em>Try:</em> {_fmt(flag['advice'])}</p>"
            )
    return parts


def _gallery_html(dicts: Sequence[dict[str, Any]], pictures: dict[str, list[bytes]]) -> list[str]:
    parts: list[str] = []
    for report in dicts:
        gallery = report.get("gallery") or {}
        entries = gallery.get("entries") or []
        if not entries:
            continue
        parts.append(f"<h2>Sample gallery: {_fmt(report['model'])}</h2>")
        if gallery.get("note"):
            parts.append(f"<p class='note'>{_fmt(gallery['note'])}</p>")
        shown = pictures.get(report["model"], [])
        for k, entry in enumerate(entries):
            gaps = [
                entry.get(f"efficiency_gap_{w}")
                for w in ("clean", "adversarial")
                if entry.get(f"efficiency_gap_{w}") is not None
            ]
            check = (
                f" Shapley values sum to v(N) − v(0) within {max(abs(g) for g in gaps):.1e}."
                if gaps
                else ""
            )
            parts.append(
                f"<h3>Sample {_fmt(entry['id'])} ({_fmt(entry['why'])})</h3><p>Label "
                f"{_fmt(entry['label_name'])}. Clean prediction "
                f"{_fmt(entry['clean_prediction_name'])} (margin "
                f"{_fmt(entry.get('clean_margin'), 2)}); adversarial prediction "
                f"{_fmt(entry['adversarial_prediction_name'])} (margin "
                f"{_fmt(entry.get('adversarial_margin'), 2)}); utility drop v(x) − v(x_adv) "
                f"{_fmt(entry.get('utility_change'), 3)}; L∞ of the perturbation "
                f"{_fmt(entry.get('linf'), 3)}.{check} Margin: z_label − max of the other "
                "logits (below 0: misclassified). Heatmaps: exact profile over all orders; "
                "low orders are m/(n−2) up to 1/3, high above 2/3; clean and adversarial maps "
                "share one colour scale.</p>"
            )
            if k < len(shown):
                parts.append(f"<figure>{_img(shown[k], _gallery_alt(entry))}</figure>")
    return parts


# -- category specificity and disentanglement (docs/interactions.md) -------------------------


def _specificity(report: dict[str, Any], which: str) -> dict[str, Any] | None:
    found = (report.get("specificity") or {}).get(which)
    return found if isinstance(found, dict) and found.get("eta_squared") is not None else None


def _floats_or_nan(values: Sequence[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def specificity_figure(reports: Sequence[ReportLike]) -> Any | None:
    """PNG: category specificity by order, eta^2 with its chance level (left) and the
    chance-adjusted epsilon^2 (right), clean solid vs adversarial dashed; None without data."""
    from matplotlib.figure import Figure

    dicts = [as_dict(r) for r in reports]
    if not any(_specificity(r, w) for r in dicts for w in ("clean", "adversarial")):
        return None
    figure = Figure(figsize=(11, 4.2))
    raw, adjusted = figure.subplots(1, 2)
    for n, report in enumerate(dicts):
        color = MODEL_COLORS[n % len(MODEL_COLORS)]
        orders = report["profile"]["orders"]
        for which, style in (("clean", "-"), ("adversarial", "--")):
            found = _specificity(report, which)
            if found is None:
                continue
            for axes, key in ((raw, "eta_squared"), (adjusted, "adjusted")):
                axes.plot(orders, _floats_or_nan(found[key]), style, marker="o", ms=3,
                          color=color, label=f"{report['model']} {which}")  # fmt: skip
            se = found.get("adjusted_stderr")
            if se and len(se) == len(orders):
                mid = np.asarray(_floats_or_nan(found["adjusted"]))
                half = Z95 * np.asarray(_floats_or_nan(se))
                adjusted.fill_between(orders, mid - half, mid + half, color=color, alpha=0.1, lw=0)
            if which == "clean" and found.get("chance") is not None:
                raw.axhline(float(found["chance"]), color=color, lw=0.8, ls=":")
    raw.set_title("η²: share of per-pair I^(m) variance explained by class", fontsize=10)
    raw.set_ylabel("η² (dotted: chance (K−1)/(n−1))")
    adjusted.set_title("Chance-adjusted ε² = (η² − chance)/(1 − chance)", fontsize=10)
    adjusted.set_ylabel("ε² (0: no more than shuffled labels)")
    adjusted.axhline(0.0, color="black", lw=0.8)
    for axes in (raw, adjusted):
        _order_axis(axes, dicts)
        _legend(axes)
    return figure


def disentanglement_figure(reports: Sequence[ReportLike]) -> Any | None:
    """PNG: disentanglement D^(m) by order, clean solid vs adversarial dashed, 95% CI bands;
    None when no report has it."""
    dicts = [as_dict(r) for r in reports]
    if not any(r["profile"].get("clean_disentanglement") for r in dicts):
        return None
    return _by_order_figure(
        dicts,
        "disentanglement",
        "D^(m) = E_ij |E_S Δv| / E_S |Δv|",
        "Disentanglement by order: clean (solid) vs adversarial (dashed)",
    )


def _pattern_matrix(pairs: Sequence[Sequence[int]], values: Sequence[Any], n: int) -> np.ndarray:
    """The symmetric (n, n) matrix of per-pair values (NaN for pairs not computed)."""
    matrix = np.full((n, n), np.nan)
    for (i, j), value in zip(pairs, values, strict=True):
        matrix[i, j] = matrix[j, i] = math.nan if value is None else float(value)
    return matrix


def class_patterns_figure(reports: Sequence[ReportLike]) -> Any | None:
    """PNG: each class's mean I^(m)(i,j) at the lowest order computed, as a player x player
    matrix, one row per model and input (clean, adversarial); one colour scale per model."""
    from matplotlib.figure import Figure

    dicts = [as_dict(r) for r in reports]
    rows: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
        (r, w, found)
        for r in dicts
        for w in ("clean", "adversarial")
        if (found := _specificity(r, w)) and found.get("lowest_order_class_means")
    ]
    if not rows:
        return None
    columns = max(len(found["classes"]) for _, _, found in rows)
    figure = Figure(figsize=(min(1.3 * columns + 2.0, 16), 1.6 * len(rows) + 0.7))
    panels = figure.subplots(len(rows), 1, squeeze=False)[:, 0]
    scale: dict[str, float] = {}
    for report, _, found in rows:
        values = np.asarray(_floats_or_nan(np.ravel(found["lowest_order_class_means"]).tolist()))
        top = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        scale[report["model"]] = max(scale.get(report["model"], 0.0), top or 1.0)
    for axes, (report, which, found) in zip(panels, rows, strict=True):
        n = int(report.get("n_players") or 0) or 1 + max(max(p) for p in found["pairs"])
        # One image per row, the classes' matrices side by side with a blank column between
        # them: a handful of axes instead of one per class keeps the demo's report quick.
        tiles = [
            _pattern_matrix(found["pairs"], means, n) for means in found["lowest_order_class_means"]
        ]
        gap = np.full((n, 1), np.nan)
        mosaic = np.hstack([part for tile in tiles for part in (tile, gap)][:-1])
        limit = scale[report["model"]]
        drawn = axes.imshow(mosaic, cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes.set_xticks([k * (n + 1) + (n - 1) / 2 for k in range(len(tiles))])
        axes.set_xticklabels([f"class {c}" for c in found["classes"]], fontsize=7)
        axes.set_yticks([])
        axes.set_ylabel(f"{report['model']}\n{which}", fontsize=7)
        figure.colorbar(drawn, ax=axes, fraction=0.02, pad=0.01)
    order = dicts[0]["profile"]["orders"][0] if dicts[0]["profile"]["orders"] else "?"
    figure.suptitle(f"Mean I^(m)(i, j) per class at order m = {order} (player × player)")
    return figure


def _per_order(report: dict[str, Any], key: str, which: str) -> list[Any]:
    """A per-order curve: "disentanglement" from the profile, else a specificity score."""
    if key == "disentanglement":
        return list(report["profile"].get(f"{which}_disentanglement") or [])
    return list((_specificity(report, which) or {}).get(key) or [])


def specificity_rows(reports: Sequence[ReportLike]) -> list[dict[str, Any]]:
    """Per model, band means (low, middle, high) of the adjusted specificity, eta^2 and D^(m),
    each a (clean, adversarial) pair."""
    rows = []
    for report in (as_dict(r) for r in reports):
        row: dict[str, Any] = {"model": report["model"]}
        for key in ("adjusted", "eta_squared", "disentanglement"):
            clean, adv = (
                _bands(report, _per_order(report, key, w)) for w in ("clean", "adversarial")
            )
            row[key] = tuple(zip(clean, adv, strict=True))
        found = _specificity(report, "clean")
        row["chance"] = found.get("chance") if found else None
        rows.append(row)
    return rows


def _specificity_html(dicts: Sequence[dict[str, Any]]) -> list[str]:
    """The table of category specificity and disentanglement by band, before their plots."""
    rows = specificity_rows(dicts)
    known = [v for r in rows for band in r["disentanglement"] for v in band if math.isfinite(v)]
    if not known and all(r["chance"] is None for r in rows):
        return []
    parts = [
        "<h2>Category specificity and disentanglement</h2><p>The paper attributes the "
        "robustness of adversarially trained networks to <em>category-specific</em> low-order "
        "interactions. Category specificity is the share of the variance of the per-pair "
        "I^(m)(i, j) across samples that the samples' true classes explain (η², a one-way "
        "ANOVA per pair pooled over pairs); ε² subtracts what shuffled labels would explain "
        "(chance (K−1)/(n−1)), so 0 means no class signal. Bands are means over the orders "
        "in them (low: m/(n−2) up to 1/3). See docs/interactions.md for the definition and its "
        "limits.</p><div class='scroll'><table><tr><th>model</th><th>chance η²</th>"
    ]
    for name in ("ε²", "η²", "D^(m)"):
        parts += [f"<th>{name} {band} (clean / adv)</th>" for band in BAND_NAMES]
    parts.append("</tr>")
    for row in rows:
        cells = "".join(
            f"<td>{_fmt(clean)} / {_fmt(adv)}</td>"
            for key in ("adjusted", "eta_squared", "disentanglement")
            for clean, adv in row[key]
        )
        parts.append(f"<tr><td>{_fmt(row['model'])}</td><td>{_fmt(row['chance'])}</td>{cells}</tr>")
    parts.append("</table></div>")
    return parts


def _specificity_captions() -> dict[str, tuple[str, str]]:
    return {
        "specificity_by_order.png": (
            "Category specificity by order",
            "Left: η² by order m, the share of the across-sample variance of I^(m)(i, j) that "
            "class explains, pooled over pairs; dotted: its expected value under shuffled "
            "labels. Right: the chance-adjusted ε², bands ±1.96 jackknife standard errors. "
            "Clean solid, adversarial dashed; the adversarial inputs keep their true labels.",
        ),
        "disentanglement_by_order.png": (
            "Disentanglement by order",
            "D^(m) = E_ij |E_S Δv| / E_S |Δv| by order m (1: every context S moves the pair "
            "the same way), clean solid and adversarial dashed, bands 95% CI over samples.",
        ),
        "class_patterns.png": (
            "Per-class interaction patterns at the lowest order",
            "Each class's mean I^(m)(i, j) over its samples as a player × player matrix at the "
            "lowest order computed; rows: model and input; one colour scale per model.",
        ),
    }


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def _figures(
    dicts: Sequence[dict[str, Any]], found: dict[str, Any], pdf: Path
) -> tuple[dict[str, bytes], dict[str, list[bytes]]]:
    """Every figure once: its PNG for the page, and a page of report.pdf (matplotlib's PDF
    backend: vector plots, the summary as text)."""
    from matplotlib.backends.backend_pdf import PdfPages

    images: dict[str, bytes] = {}
    gallery_images: dict[str, list[bytes]] = {}
    with PdfPages(pdf) as pages:
        pages.savefig(_text_page(dicts, found))
        built = (
            interactions_figure(dicts),
            delta_figure(dicts),
            contribution_figure(dicts),
            specificity_figure(dicts),
            disentanglement_figure(dicts),
            class_patterns_figure(dicts),
        )
        for name, figure in zip(PLOT_FILES, built, strict=True):
            if figure is not None:
                images[name] = _png(figure)
                pages.savefig(figure, bbox_inches="tight")
        for report in dicts:
            gallery = report.get("gallery") or {}
            shown = gallery_images.setdefault(report["model"], [])
            for entry in gallery.get("entries", []):
                figure = sample_figure(entry, gallery.get("grid"), gallery.get("layout", ""))
                figure.suptitle(f"{report['model']}: sample {entry['id']} ({entry['why']})")
                shown.append(_png(figure))
                pages.savefig(figure, bbox_inches="tight")
    return images, gallery_images


def write_report(
    reports: ReportLike | Sequence[ReportLike], out: str | Path, *, plots: bool = True
) -> dict[str, Path]:
    """Write report.json (one per model: DIR/report.json, or DIR/<model>/report.json for
    several), the PNG plots, report.html and report.pdf into `out`; returns the paths by file
    name.

    Each report.json carries what the page shows of it: the summary sentences (`findings`),
    the settings table and the comparison with the other models, besides its data and gallery.
    """
    items = [reports] if isinstance(reports, (AuditReport, dict)) else list(reports)
    if not items:
        raise ValueError("no reports to write")
    dicts = [as_dict(r) for r in items]
    table = [settings(r) for r in dicts]
    found = findings(dicts, table)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for report, rows, model in zip(dicts, table, found["models"], strict=True):
        folder = out if len(dicts) == 1 else out / _slug(report["model"])
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "report.json"
        shown = {
            "settings": rows,
            "findings": {
                "sentences": model["sentences"],
                "bands": model["bands"],
                "comparison": found["comparison"],
                "thresholds": found["thresholds"],
            },
        }
        path.write_text(json.dumps({**report, **shown}, indent=1) + "\n")
        written[str(path.relative_to(out))] = path
    images: dict[str, bytes] = {}
    gallery_images: dict[str, list[bytes]] = {}
    if plots:
        try:
            images, gallery_images = _figures(dicts, found, out / "report.pdf")
        except ImportError:
            images, gallery_images = {}, {}
        else:
            written["report.pdf"] = out / "report.pdf"
    for name, data in images.items():
        (out / name).write_bytes(data)
        written[name] = out / name
    (out / "report.html").write_text(render_html(dicts, images, gallery_images))
    written["report.html"] = out / "report.html"
    return written
