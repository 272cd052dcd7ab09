"""`interscope demo`: build the demo models, serve them on a free port, audit both, report."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from interscope._client import Client
from interscope._gallery import build_gallery
from interscope._models import AuditReport
from interscope._options import AttackOptions, ProfileOptions
from interscope._progress import ProgressBar
from interscope.report import ReportLike, comparison_rows, specificity_rows, write_report

DEMO_MODELS = ("digits-cnn", "digits-cnn-adv")


@dataclass(frozen=True)
class DemoOptions:
    """Sizes of the demo: defaults finish in well under 3 minutes on 2 CPU cores."""

    workdir: Path = Path("demo-out")
    #: An existing (or to be built) demo repository; default WORKDIR/repository.
    repository: Path | None = None
    out: Path | None = None
    samples: int = 48
    eps: float = 0.1
    steps: int = 10
    grid: int = 4
    estimator: str = "sampled"
    contexts_per_order: int = 16
    seed: int = 0
    progress: bool = True
    #: Samples per model in the report's gallery (exact profiles, about 3 s each here).
    gallery: int = 2


def comparison_table(reports: list[AuditReport]) -> str:
    """The demo's text table: accuracies and low/middle/high-order |I|, clean -> adversarial."""
    header = (
        f"{'model':<16} {'clean acc':>9} {'robust acc':>10}   "
        f"{'|I| low':>15} {'|I| middle':>15} {'|I| high':>15}"
    )
    lines = [header, "-" * len(header)]
    for row in comparison_rows(reports):
        bands = " ".join(
            f"{row[b][0]:>6.3f} -> {row[b][1]:<5.3f}" for b in ("low", "middle", "high")
        )
        lines.append(
            f"{row['model']:<16} {row['clean_accuracy']:>9.3f} {row['robust_accuracy']:>10.3f}   "
            f"{bands}"
        )
    lines.append(
        "(|I|: mean |I^(m)(i,j)| over pairs and samples, clean -> adversarial; orders "
        "low <= 1/3 < middle <= 2/3 < high of n-2)"
    )
    return "\n".join(lines)


def specificity_table(reports: Sequence[ReportLike]) -> str:
    """The demo's second table: category specificity (epsilon^2) and D^(m) by band."""
    header = (
        f"{'model':<16} {'spec low':>15} {'spec middle':>15} {'spec high':>15}   "
        f"{'D low':>15} {'D high':>15}"
    )
    lines = [header, "-" * len(header)]
    for row in specificity_rows(reports):
        spec = " ".join(f"{c:>6.3f} -> {a:<5.3f}" for c, a in row["adjusted"])
        d = " ".join(
            f"{c:>6.3f} -> {a:<5.3f}" for c, a in (row["disentanglement"][k] for k in (0, 2))
        )
        lines.append(f"{row['model']:<16} {spec}   {d}")
    lines.append(
        "(spec: chance-adjusted share of per-pair I^(m) variance explained by class, epsilon^2; "
        "D: disentanglement; clean -> adversarial; docs/interactions.md)"
    )
    return "\n".join(lines)


def run_demo(options: DemoOptions, *, stream: TextIO | None = None) -> list[AuditReport]:
    """Run the whole demo over real gRPC against an embedded server; returns both reports."""
    # Lazy: only the demo needs the server (and torch); the SDK itself stays light.
    from interscope_server.config import Settings
    from interscope_server.demo import TEST_DATA_FILE, build_demo_repository
    from interscope_server.server import BackgroundServer

    out_stream = stream if stream is not None else sys.stdout
    started = time.monotonic()
    repository = options.repository or options.workdir / "repository"
    print(
        f"demo repository: {repository} (built on first use, then reused)",
        file=out_stream,
        flush=True,  # piped (CI, logs), say what is happening before the work starts
    )
    build_demo_repository(repository)
    with np.load(repository / TEST_DATA_FILE) as data:
        x, y = data["x"][: options.samples], data["y"][: options.samples]
    settings = Settings(
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        model_repository=repository,
        load_models=list(DEMO_MODELS),
    )
    attack = AttackOptions(
        attack="pgd",
        norm="linf",
        eps=options.eps,
        steps=options.steps,
        step_size=2.5 * options.eps / options.steps,
        seed=options.seed,
    )
    profile = ProfileOptions(
        grid=(options.grid, options.grid),
        estimator=options.estimator,
        contexts_per_order=options.contexts_per_order,
        seed=options.seed,
    )
    out_dir = options.out or options.workdir / "report"
    reports: list[AuditReport] = []
    pages: list[dict[str, object]] = []
    with BackgroundServer(settings) as server:
        print(
            f"embedded server on {server.address}; auditing {len(x)} digits per model "
            f"(PGD L-inf eps {options.eps}, {options.grid}x{options.grid} players, "
            f"{options.estimator} profile)",
            file=out_stream,
            flush=True,
        )
        with Client(server.address) as client:
            for model in DEMO_MODELS:
                with ProgressBar(f"audit {model}", enabled=options.progress) as bar:
                    report = client.audit(
                        model=model,
                        x=x,
                        y=y,
                        attack=attack,
                        profile=profile,
                        on_progress=bar.audit_progress,
                        return_adversarial=options.gallery > 0,
                    )
                reports.append(report)
                info = client.get_model(model)
                gallery = build_gallery(
                    client,
                    report,
                    x,
                    profile,
                    count=options.gallery,
                    classes=info.classes,
                    layout=info.input.layout,
                )
                pages.append({**report.to_dict(), "gallery": gallery})
    print(file=out_stream)
    print(comparison_table(reports), file=out_stream)
    print(file=out_stream)
    print(specificity_table(reports), file=out_stream)
    written = write_report(pages, out_dir)
    print(
        f"\nreport: {written['report.html']} (+ per-model report.json and PNG plots) "
        f"in {time.monotonic() - started:.0f} s",
        file=out_stream,
    )
    return reports
