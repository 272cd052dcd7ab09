"""Every way torch users export a CNN, an MLP and a ViT loads with true gradients.

Each export is made here, in the test session, by the exporters users run (torch.onnx classic
and dynamo, torch.jit.script and trace, torch.export). Each must load with gradients, forward
like the original module (and, for ONNX, its converted module like onnxruntime), give the
original module's input gradients, and take a PGD attack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from interscope_server.attacks import AttackSpec, run_attack
from interscope_server.models import BackendOptions, ModelConfig, OnnxBackend, TensorSpec
from interscope_server.models.backend import Backend
from interscope_server.models.registry import open_backend
from tests.server.models.torch_exports import (
    CLASSIC_OPSETS,
    DYNAMO_OPSETS,
    FAMILIES,
    Family,
    classic_opset,
    export_onnx,
    export_program,
    script,
    trace,
)

CPU = BackendOptions(device="cpu")

#: Forward outputs of one float32 graph run by two engines (op order, fused kernels) agree to
#: about 1e-6 here; 1e-4 leaves room without hiding a wrong op, which is off by O(0.1).
FORWARD_TOL = 1e-4
#: Input gradients, relative to the largest entry: backward passes of equal graphs in float32.
GRADIENT_RTOL = 1e-3


@dataclass(frozen=True)
class Case:
    """One export of one family: `kind` names the exporter, `opset` the ONNX opset asked for."""

    family: str
    kind: str
    opset: int = 0

    @property
    def id(self) -> str:
        return f"{self.family}-{self.kind}{self.opset or ''}"

    @property
    def format(self) -> str:
        if self.kind in ("classic", "dynamo"):
            return "onnx"
        return "torch_export" if self.kind.startswith("pt2") else "torchscript"


CASES = [
    *(Case(f, "classic", classic_opset(f, o)) for f in FAMILIES for o in CLASSIC_OPSETS),
    *(Case(f, "dynamo", o) for f in FAMILIES for o in DYNAMO_OPSETS),
    *(Case(f, kind) for f in FAMILIES for kind in ("script", "trace", "pt2")),
    Case("cnn", "pt2-fixed-batch"),
]


def make_export(case: Case, folder: Path) -> Path:
    """The model file for `case`, written by the exporter the case names."""
    family = FAMILIES[case.family]
    module = family.build()
    if case.format == "onnx":
        path = folder / f"{case.id}.onnx"
        data = export_onnx(module, family.shape, dynamo=case.kind == "dynamo", opset=case.opset)
        path.write_bytes(data)
        return path
    if case.kind == "script":
        return script(module, folder / f"{case.id}.pt")
    if case.kind == "trace":
        return trace(module, family.shape, folder / f"{case.id}.pt")
    dynamic = case.kind == "pt2"
    return export_program(module, family.shape, folder / f"{case.id}.pt2", dynamic=dynamic)


def config_for(family: Family, model_format: str, path: Path, name: str = "m") -> ModelConfig:
    return ModelConfig(
        name=name,
        format=model_format,  # type: ignore[arg-type]
        file=path.name,
        input=TensorSpec(name="input", shape=list(family.shape)),
        classes=[f"c{i}" for i in range(family.classes)],
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case], Path]:
    """Makes each case's export on first use (so -k runs only the exporters it needs)."""
    folder = tmp_path_factory.mktemp("exports")
    made: dict[Case, Path] = {}

    def get(case: Case) -> Path:
        if case not in made:
            made[case] = make_export(case, folder)
        return made[case]

    return get


def _gradient(module: torch.nn.Module, x: np.ndarray, weights: torch.Tensor) -> np.ndarray:
    inputs = torch.from_numpy(x).requires_grad_(True)
    (grad,) = torch.autograd.grad((module(inputs) * weights).sum(), inputs)
    return grad.numpy()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_export_loads_with_the_original_modules_outputs_and_gradients(
    case: Case, exports: Callable[[Case], Path]
) -> None:
    family = FAMILIES[case.family]
    path = exports(case)
    if case.format == "onnx":
        written = {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""]
        # The dynamo exporter keeps 18 where it cannot convert down (see DYNAMO_OPSETS).
        assert written == case.opset or (case.kind == "dynamo" and written == 18), written
    backend: Backend = open_backend(config_for(family, case.format, path), path, CPU)
    try:
        assert backend.gradients_available, backend.gradient_note
        assert backend.gradient_note == ""
        module = backend.torch_module()
        assert module is not None
        original = family.build()
        rng = np.random.default_rng(7)
        x = rng.uniform(0, 1, (5, *family.shape)).astype(np.float32)
        with torch.no_grad():
            reference = original(torch.from_numpy(x)).numpy()
            converted = module(torch.from_numpy(x)).numpy()
        served = backend.forward(x)
        np.testing.assert_allclose(served, reference, rtol=FORWARD_TOL, atol=FORWARD_TOL)
        if isinstance(backend, OnnxBackend):
            # backend.forward is onnxruntime; the module is the converter's torch graph.
            np.testing.assert_allclose(converted, served, rtol=FORWARD_TOL, atol=FORWARD_TOL)
        else:
            np.testing.assert_allclose(converted, reference, rtol=FORWARD_TOL, atol=FORWARD_TOL)

        weights = torch.from_numpy(rng.standard_normal(family.classes).astype(np.float32))
        expected = _gradient(original, x, weights)
        got = _gradient(module, x, weights)
        scale = float(np.abs(expected).max())
        assert scale > 1e-4  # a real gradient, not zeros
        np.testing.assert_allclose(got, expected, rtol=GRADIENT_RTOL, atol=GRADIENT_RTOL * scale)

        labels = served.argmax(1)
        spec = AttackSpec("pgd", eps=0.2, steps=5, value_range=(0.0, 1.0))
        report = run_attack(spec, x, labels, module, backend.forward, batch_size=4)
        assert report.summary.n_examples == 5
        for result in report.results:
            assert np.abs(result.x_adv - x[result.index]).max() <= 0.2 + 1e-6
        # PGD follows the served gradients: the label margin must fall on average.
        clean = np.mean([r.clean_margin for r in report.results])
        adversarial = np.mean([r.adversarial_margin for r in report.results])
        assert adversarial < clean - 1e-3, (clean, adversarial)
    finally:
        backend.close()
