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

from interscope._models import AuditReport

ReportLike = AuditReport | dict[str, Any]

#: PNG files written next to the HTML page.
PLOT_FILES = ("interactions_by_order.png", "delta_by_order.png")


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


def _ratios(report: dict[str, Any]) -> list[float]:
    profile = report["profile"]
    ratios = profile.get("ratios") or []
    if len(ratios) == len(profile["orders"]):
        return [float(r) for r in ratios]
    n = max(int(report.get("n_players") or 0) - 2, 1)
    return [int(m) / n for m in profile["orders"]]


def band_means(report: dict[str, Any], key: str) -> tuple[float, float, float]:
    """Mean of a per-order curve over low (ratio <= 1/3), middle and high (> 2/3) orders."""
    values = report["profile"].get(key) or []
    bands: tuple[list[float], list[float], list[float]] = ([], [], [])
    for ratio, value in zip(_ratios(report), values, strict=True):
        if value is None:
            continue
        bands[0 if ratio <= 1 / 3 else 1 if ratio <= 2 / 3 else 2].append(float(value))
    return (
        sum(bands[0]) / len(bands[0]) if bands[0] else math.nan,
        sum(bands[1]) / len(bands[1]) if bands[1] else math.nan,
        sum(bands[2]) / len(bands[2]) if bands[2] else math.nan,
    )


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _ci(profile: dict[str, Any], key: str) -> tuple[list[float], list[float]] | None:
    ci = profile.get(f"{key}_ci")
    if not ci or len(ci) != 2 or any(v is None for v in ci[0] + ci[1]):
        return None
    return ci[0], ci[1]


def plot_interactions(reports: Sequence[ReportLike]) -> bytes:
    """PNG: mean |I^(m)| by order ratio, clean (solid) vs adversarial (dashed), per model."""
    from matplotlib.figure import Figure  # the `plot` extra; Figure avoids pyplot's globals

    figure = Figure(figsize=(7, 4.2))
    axes = figure.add_subplot()
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for n, report in enumerate(as_dict(r) for r in reports):
        color = colors[n % len(colors)]
        profile, ratios = report["profile"], _ratios(report)
        for key, style, label in (
            ("clean_mean_abs", "-", "clean"),
            ("adversarial_mean_abs", "--", "adversarial"),
        ):
            axes.plot(
                ratios,
                profile[key],
                style,
                marker="o",
                ms=3,
                color=color,
                label=f"{report['model']} {label}",
            )
            ci = _ci(profile, key)
            if ci is not None:
                axes.fill_between(ratios, ci[0], ci[1], color=color, alpha=0.12, lw=0)
    axes.set_xlabel("order ratio m / (n - 2)")
    axes.set_ylabel("mean |I^(m)(i, j)|")
    axes.set_title("Interaction strength by order: clean vs adversarial")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def plot_delta(reports: Sequence[ReportLike]) -> bytes:
    """PNG: Delta I^(m) = E[I(x) - I(x_adv)] by order ratio with its 95% CI, per model."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2))
    axes = figure.add_subplot()
    for report in (as_dict(r) for r in reports):
        profile, ratios = report["profile"], _ratios(report)
        (line,) = axes.plot(ratios, profile["delta_mean"], marker="o", ms=3, label=report["model"])
        ci = _ci(profile, "delta_mean")
        if ci is not None:
            axes.fill_between(ratios, ci[0], ci[1], color=line.get_color(), alpha=0.15, lw=0)
    axes.axhline(0.0, color="black", lw=0.8)
    axes.set_xlabel("order ratio m / (n - 2)")
    axes.set_ylabel("Delta I^(m) (clean - adversarial)")
    axes.set_title("How the attack moved interactions, by order")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


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


def render_html(reports: Sequence[ReportLike], images: dict[str, bytes] | None = None) -> str:
    """One self-contained HTML page: headline table, plots (inlined PNGs), per-class tables."""
    dicts = [as_dict(r) for r in reports]
    images = images or {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>interscope audit report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:4px 10px;text-align:right}th{background:#f3f3f3}td:first-child,"
        "th:first-child{text-align:left}img{max-width:100%}.note{color:#666;font-size:90%}",
        "</style></head><body><h1>interscope audit report</h1>",
        "<h2>Models</h2><table><tr><th>model</th><th>samples</th><th>clean acc</th>"
        "<th>robust acc</th><th>|I| low (clean / adv)</th><th>|I| middle</th>"
        "<th>|I| high</th></tr>",
    ]
    for row in comparison_rows(dicts):
        bands = "".join(
            f"<td>{_fmt(row[b][0])} / {_fmt(row[b][1])}</td>" for b in ("low", "middle", "high")
        )
        parts.append(
            f"<tr><td>{_fmt(row['model'])}</td><td>{row['n_samples']}</td>"
            f"<td>{_fmt(row['clean_accuracy'])}</td><td>{_fmt(row['robust_accuracy'])}</td>"
            f"{bands}</tr>"
        )
    parts.append(
        "</table><p class='note'>Low, middle and high orders: order ratio m/(n-2) up to 1/3, "
        "up to 2/3, above 2/3; mean |I^(m)| over pairs and samples.</p>"
    )
    captions = {
        "interactions_by_order.png": "Interaction strength by order, clean vs adversarial "
        "(bands: 95% CI over samples)",
        "delta_by_order.png": "Delta I by order (clean minus adversarial)",
    }
    for name in PLOT_FILES:
        if name in images:
            data = base64.b64encode(images[name]).decode()
            parts.append(
                f"<h2>{captions[name]}</h2><img alt='{name}' src='data:image/png;base64,{data}'>"
            )
    if not images:
        parts.append("<p class='note'>Plots need matplotlib: pip install 'interscope[plot]'.</p>")
    for report in dicts:
        parts.append(
            f"<h2>Per class: {_fmt(report['model'])}</h2><table><tr><th>class</th>"
            "<th>n</th><th>clean acc</th><th>robust acc</th></tr>"
        )
        for c in report.get("per_class", []):
            parts.append(
                f"<tr><td>{_fmt(c['name'])}</td><td>{c['n']}</td>"
                f"<td>{_fmt(c['clean_accuracy'])}</td><td>{_fmt(c['robust_accuracy'])}</td></tr>"
            )
        config = html.escape(json.dumps(report.get("config", {}), indent=1, sort_keys=True))
        parts.append(
            f"</table><details><summary>configuration (fingerprint "
            f"{_fmt(report.get('fingerprint', ''))})</summary><pre>{config}</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def write_report(
    reports: ReportLike | Sequence[ReportLike], out: str | Path, *, plots: bool = True
) -> dict[str, Path]:
    """Write report.json (one per model: DIR/report.json, or DIR/<model>/report.json for
    several), the PNG plots and report.html into `out`; returns the paths by file name."""
    items = [reports] if isinstance(reports, (AuditReport, dict)) else list(reports)
    if not items:
        raise ValueError("no reports to write")
    dicts = [as_dict(r) for r in items]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for report in dicts:
        folder = out if len(dicts) == 1 else out / _slug(report["model"])
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "report.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        written[str(path.relative_to(out))] = path
    images: dict[str, bytes] = {}
    if plots:
        try:
            images = {PLOT_FILES[0]: plot_interactions(dicts), PLOT_FILES[1]: plot_delta(dicts)}
        except ImportError:
            images = {}
    for name, data in images.items():
        (out / name).write_bytes(data)
        written[name] = out / name
    (out / "report.html").write_text(render_html(dicts, images))
    written["report.html"] = out / "report.html"
    return written
