"""Audits: resumable from a checkpoint, and exactly once over three replicas with one stopped."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import interscope
from interscope_server.config import Settings
from interscope_server.server import BackgroundServer

#: A cheap audit: 3x3 players with the exact estimator (deterministic), a short PGD.
AUDIT_ATTACK = {"attack": "pgd", "eps": 0.1, "steps": 4, "step_size": 0.05}
AUDIT_PROFILE = {"grid": (3, 3), "estimator": "exact"}


class _Interrupt(Exception):
    pass


def _ids_in(checkpoint: Path) -> list[str]:
    lines = checkpoint.read_text().splitlines()[1:]
    return [json.loads(line)["sample"]["id"] for line in lines]


def test_interrupted_audit_resumes_from_its_checkpoint(
    server: BackgroundServer, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = digits
    checkpoint = tmp_path / "audit.jsonl"

    def interrupt(progress: interscope.AuditProgress) -> None:
        if progress.done >= 4:
            raise _Interrupt

    with interscope.Client(server.address) as client:
        with pytest.raises(_Interrupt):
            client.audit(
                model="digits-cnn",
                x=x,
                y=y,
                attack=AUDIT_ATTACK,
                profile=AUDIT_PROFILE,
                checkpoint=checkpoint,
                on_progress=interrupt,
            )
        first = _ids_in(checkpoint)
        assert 4 <= len(first) < len(x) and len(set(first)) == len(first)
        report = client.audit(
            model="digits-cnn",
            x=x,
            y=y,
            attack=AUDIT_ATTACK,
            profile=AUDIT_PROFILE,
            checkpoint=checkpoint,
        )
        # Samples in the checkpoint were not sent again: the servers saw only the rest.
        assert report.resumed_samples == len(first)
        assert sum(s.n_samples + s.n_failed for s in report.server_summaries) == len(x) - len(first)
        ids = [s.id for s in report.samples]
        assert ids == [str(i) for i in range(len(x))]
        assert sorted(_ids_in(checkpoint)) == sorted(ids)
        fresh = client.audit(
            model="digits-cnn", x=x, y=y, attack=AUDIT_ATTACK, profile=AUDIT_PROFILE
        )
        _assert_same_summary(report, fresh)
        with pytest.raises(interscope.CheckpointError):
            client.audit(
                model="digits-cnn",
                x=x,
                y=y,
                attack={**AUDIT_ATTACK, "eps": 0.2},
                profile=AUDIT_PROFILE,
                checkpoint=checkpoint,
            )
        before = checkpoint.read_bytes()
        # Other data under the same config and ids: the old results would be wrong for it.
        other_inputs = x[::-1].copy()
        other_labels = (y + 1) % 10
        for changed in ({"x": other_inputs, "y": y}, {"x": x, "y": other_labels}):
            with pytest.raises(interscope.CheckpointError, match="other data"):
                client.audit(
                    model="digits-cnn",
                    attack=AUDIT_ATTACK,
                    profile=AUDIT_PROFILE,
                    checkpoint=checkpoint,
                    **changed,
                )
        with pytest.raises(interscope.CheckpointError, match="other data"):
            client.audit(
                model="digits-cnn",
                x=x,
                y=y,
                ids=[f"s{i}" for i in range(len(x))],
                attack=AUDIT_ATTACK,
                profile=AUDIT_PROFILE,
                checkpoint=checkpoint,
            )
        assert checkpoint.read_bytes() == before, "a refused rerun changed the checkpoint"


def _assert_same_summary(a: interscope.AuditReport, b: interscope.AuditReport) -> None:
    assert a.summary.n_samples == b.summary.n_samples
    assert a.summary.clean_accuracy == b.summary.clean_accuracy
    assert a.summary.robust_accuracy == b.summary.robust_accuracy
    np.testing.assert_array_equal(a.summary.orders, b.summary.orders)
    for key in ("clean_mean_abs", "adversarial_mean_abs", "delta_mean"):
        np.testing.assert_allclose(
            getattr(a.summary, key).mean, getattr(b.summary, key).mean, rtol=1e-4, atol=1e-6
        )


def test_audit_over_three_replicas_survives_one_stopping(
    server: BackgroundServer,
    demo_repository: Path,
    digits: tuple[np.ndarray, np.ndarray],
    make_settings: Callable[..., Settings],
) -> None:
    x, y = digits
    replicas = [BackgroundServer(make_settings(demo_repository)).start() for _ in range(3)]
    halfway = threading.Event()
    try:
        victim = replicas[1]
        stopper = threading.Thread(target=lambda: (halfway.wait(60), victim.stop()))
        stopper.start()

        def progress(p: interscope.AuditProgress) -> None:
            if p.done >= 3:
                halfway.set()

        with interscope.Client(replicas[0].address) as client:
            report = client.audit(
                model="digits-cnn",
                x=x,
                y=y,
                attack=AUDIT_ATTACK,
                profile=AUDIT_PROFILE,
                addresses=[r.address for r in replicas],
                streams_per_address=1,
                window=1,
                on_progress=progress,
            )
        stopper.join(timeout=60)
        assert halfway.is_set()
        ids = [s.id for s in report.samples]
        assert ids == [str(i) for i in range(len(x))]
        assert all(s.error is None for s in report.samples), [
            s.error for s in report.samples if s.error
        ]
        with interscope.Client(server.address) as single:
            alone = single.audit(
                model="digits-cnn", x=x, y=y, attack=AUDIT_ATTACK, profile=AUDIT_PROFILE
            )
        _assert_same_summary(report, alone)
    finally:
        halfway.set()
        for replica in replicas:
            replica.stop()


def test_audit_summary_reports_specificity_and_disentanglement_like_the_server(
    server: BackgroundServer, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    with interscope.Client(server.address) as client:
        report = client.audit(
            model="digits-cnn",
            x=x,
            y=y,
            attack=AUDIT_ATTACK,
            profile=AUDIT_PROFILE,
            streams_per_address=1,  # one stream: its server summary covers every sample
        )
    (served,) = report.server_summaries
    ours = report.summary
    n_orders = len(ours.orders)
    for which in ("clean_specificity", "adversarial_specificity"):
        mine, theirs = getattr(ours, which), getattr(served, which)
        assert mine is not None and theirs is not None
        assert mine.eta_squared.shape == (n_orders,)
        assert ((mine.eta_squared >= 0) & (mine.eta_squared <= 1)).all(), mine.eta_squared
        assert (mine.adjusted <= 1).all()
        labels = sorted(set(y.tolist()))
        assert mine.chance == pytest.approx((len(labels) - 1) / (len(y) - 1))
        np.testing.assert_array_equal(mine.classes, labels)
        np.testing.assert_array_equal(mine.pairs, theirs.pairs)
        assert mine.class_means.shape == (len(labels), n_orders, len(mine.pairs))
        # Same code, same per-sample values; only the summation order may differ.
        np.testing.assert_allclose(mine.eta_squared, theirs.eta_squared, rtol=1e-10)
        np.testing.assert_allclose(mine.adjusted, theirs.adjusted, rtol=1e-10)
        np.testing.assert_allclose(mine.adjusted_stderr, theirs.adjusted_stderr, rtol=1e-8)
        assert (mine.adjusted_stderr > 0).all()
        np.testing.assert_allclose(mine.class_means, theirs.class_means, rtol=1e-10, atol=1e-15)
    for which in ("clean_disentanglement", "adversarial_disentanglement"):
        mine_d, theirs_d = getattr(ours, which), getattr(served, which)
        assert mine_d is not None and theirs_d is not None
        assert ((mine_d.mean >= 0) & (mine_d.mean <= 1)).all()
        np.testing.assert_allclose(mine_d.mean, theirs_d.mean, rtol=1e-10)
        np.testing.assert_allclose(mine_d.ci_low, theirs_d.ci_low, rtol=1e-10)
    # The per-sample pairs are what the SDK recomputed it from; their standard errors were
    # not asked for and stay off the wire.
    clean = report.samples[0].perturbation.clean
    assert clean.interactions is not None and clean.interactions.shape == (n_orders, 36)
    assert clean.interactions_stderr is None
