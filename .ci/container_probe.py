"""Checks a running interscope container from outside against an in-process server, same models.

Run by .ci/check-container with the project's venv once the container reports healthy:
    python .ci/container_probe.py --address 127.0.0.1:PORT --metrics-port PORT --repository DIR
Exits 0 when every check passed, 1 (printing what differed) otherwise.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

import interscope
from interscope_server.config import Settings
from interscope_server.demo import DEMO_MODEL_NAMES, TEST_DATA_FILE
from interscope_server.server import BackgroundServer

#: Profiled on an ONNX model, attacked on a TorchScript one: both backends answer in the image.
PROFILE_MODEL = "digits-cnn"
ATTACK_MODEL = "digits-cnn-adv-ts"
#: The same model, inputs and seed on the same library versions give the same numbers; only the
#: thread count may differ (the container sees the machine's cores its own way), which reorders
#: float sums, so equality is checked to float32 rounding, not bit for bit.
RTOL = 1e-5
ATOL = 1e-6


def _profile(client: interscope.Client, x: np.ndarray, y: np.ndarray) -> interscope.ProfileResult:
    return client.profile(
        model=PROFILE_MODEL, x=x[:3], label=y[:3], grid=(2, 3), estimator="exact", seed=0
    )


def _attack(client: interscope.Client, x: np.ndarray, y: np.ndarray) -> interscope.AttackResult:
    return client.attack(model=ATTACK_MODEL, x=x[:8], y=y[:8], eps=0.1, steps=5, step_size=0.03)


def _minor(versions: dict[str, str]) -> dict[str, str]:
    python = versions.get("python", "")
    return {**versions, "python": ".".join(python.split(".")[:2])}


def _counters(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True, help="the container's gRPC host:port")
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--repository", type=Path, required=True, help="what /models holds")
    args = parser.parse_args()
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"{'ok' if ok else 'FAIL'}: {what}")
        if not ok:
            failures.append(what)

    def same(a: Any, b: Any, what: str) -> None:
        try:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)
        except AssertionError as error:
            check(False, f"{what}\n{error}")
        else:
            check(True, what)

    with np.load(args.repository / TEST_DATA_FILE) as data:
        x, y = data["x"], data["y"]

    with interscope.Client(args.address, timeout=120) as client:
        models = {m.name: m for m in client.list_models()}
        check(sorted(models) == sorted(DEMO_MODEL_NAMES), f"ListModels lists {sorted(models)}")
        check(all(m.device == "cpu" for m in models.values()), "every model serves on the cpu")
        profile = _profile(client, x, y)
        attack = _attack(client, x, y)

    settings = Settings(
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        model_repository=args.repository,
        load_models=[PROFILE_MODEL, ATTACK_MODEL],
    )
    with BackgroundServer(settings) as server, interscope.Client(server.address) as local:
        want_profile = _profile(local, x, y)
        want_attack = _attack(local, x, y)

    got, want = profile.provenance, want_profile.provenance
    assert got is not None and want is not None
    check(got.model_content_hash == want.model_content_hash, "the container serves the same file")
    # Python's patch release is the base image's (Debian's 3.11.2, say), not the venv's.
    check(
        _minor(got.versions) == _minor(want.versions),
        f"versions as tested: {got.versions} (here {want.versions})",
    )
    check(got.forwards == want.forwards, f"Profile: {got.forwards} forward passes")
    same(profile.mean, want_profile.mean, "Profile: mean interaction per order")
    same(profile.mean_abs, want_profile.mean_abs, "Profile: mean |interaction| per order")
    for mine, theirs in zip(profile.profiles, want_profile.profiles, strict=True):
        same(mine.ratios, theirs.ratios, f"Profile: input {mine.input_index}'s ratios")
    check(attack.success.tolist() == want_attack.success.tolist(), "Attack: same successes")
    check(
        attack.robust_accuracy == want_attack.robust_accuracy,
        f"Attack: robust accuracy {attack.robust_accuracy:.3f} (clean {attack.clean_accuracy:.3f})",
    )
    same(attack.adversarial, want_attack.adversarial, "Attack: adversarial inputs")

    counters = _counters(f"http://127.0.0.1:{args.metrics_port}/metrics")
    calls = "interscope_rpc_calls_total"
    for method in ("AnalysisService/Profile", "AnalysisService/Attack"):
        key = (calls, (("code", "OK"), ("method", method)))
        check(counters.get(key) == 1.0, f"/metrics: {method} OK counted once ({counters.get(key)})")
    forwards = counters.get(("interscope_model_forward_passes_total", (("model", PROFILE_MODEL),)))
    check(forwards == got.forwards, f"/metrics: {forwards} forward passes of {PROFILE_MODEL}")

    if failures:
        print(f"container probe: {len(failures)} check(s) failed")
        return 1
    print("container probe: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
