"""The load-time gradient check, and the torch.export loader's refusal of hostile archives."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from interscope_server.errors import InvalidArgument
from interscope_server.models import BackendOptions, TorchExportBackend, TorchScriptBackend
from interscope_server.models.gradient_check import check_gradients
from interscope_server.models.torch_export_backend import check_program
from tests.server.models.test_torch_exports import config_for
from tests.server.models.torch_exports import FAMILIES, AttentionViT, Family, export_program, trace

CPU = BackendOptions(device="cpu")
SHAPE = (1, 4, 4)


class _ScaledBackward(torch.autograd.Function):
    """Identity forward whose backward multiplies the gradient by `factor`: a wrong derivative."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


class _Net(nn.Module):
    """A small ReLU net; `factor` != 1 gives it a silently wrong backward pass."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(_ScaledBackward.apply(x, self.factor))


def test_true_gradients_pass_and_the_module_is_left_float32() -> None:
    net = _Net().eval()
    assert check_gradients(net, SHAPE, (0.0, 1.0), torch.device("cpu")) == ""
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_a_wrong_backward_is_caught() -> None:
    for factor in (0.5, 0.0):  # half the true gradient; a gradient that is wrongly zero
        note = check_gradients(_Net(factor).eval(), SHAPE, (0.0, 1.0), torch.device("cpu"))
        assert "disagrees with finite differences" in note, factor


class _Noisy(nn.Module):
    """_Net on its input plus fresh Gaussian noise each forward: a randomised model."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.net = _Net(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + 0.3 * torch.randn_like(x))


def test_a_stochastic_module_is_checked_for_one_noise_draw() -> None:
    noisy = _Noisy().eval()
    x = torch.rand(1, *SHAPE)
    assert not torch.equal(noisy(x), noisy(x))  # random indeed
    torch.manual_seed(5)
    state = torch.get_rng_state()
    assert check_gradients(noisy, SHAPE, (0.0, 1.0), torch.device("cpu")) == ""
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    for factor in (0.5, 0.0):  # a wrong backward is still caught, noise or not
        note = check_gradients(_Noisy(factor).eval(), SHAPE, (0.0, 1.0), torch.device("cpu"))
        assert "disagrees with finite differences" in note, factor


def test_a_float32_only_module_is_checked_in_float32() -> None:
    class Float32Only(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _Net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype != torch.float32:
                raise RuntimeError("expected float32")
            return self.net(x)

    assert check_gradients(Float32Only().eval(), SHAPE, (0.0, 1.0), torch.device("cpu")) == ""
    wrong = Float32Only().eval()
    wrong.net.factor = 2.0
    assert "float32" in check_gradients(wrong, SHAPE, (0.0, 1.0), torch.device("cpu"))


@pytest.mark.parametrize("module", [AttentionViT, lambda: FAMILIES["vit"].build()])
def test_traced_fast_path_attention_loads_without_gradients(module, tmp_path: Path) -> None:
    torch.manual_seed(0)
    family = Family("vit", module, FAMILIES["vit"].shape, 4)
    path = trace(family.build().eval(), family.shape, tmp_path / "m.pt", no_grad=True)
    backend = TorchScriptBackend(config_for(family, "torchscript", path), path, CPU)
    assert not backend.gradients_available and backend.torch_module() is None
    assert "backward pass fails" in backend.gradient_note
    assert "derivative for aten::_" in backend.gradient_note  # the op torch names
    x = np.random.default_rng(0).uniform(0, 1, (3, *family.shape)).astype(np.float32)
    assert backend.forward(x).shape == (3, 4)  # black-box attacks still work


# -- torch.export archives that would run code -------------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: proof that a pickle in the archive ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def mlp_archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    return export_program(FAMILIES["mlp"].build(), FAMILIES["mlp"].shape, path).read_bytes()


def _rewrite(data: bytes, change: dict[str, bytes | None]) -> bytes:
    """The archive with members (named relative to its root) replaced, added or removed."""
    source = zipfile.ZipFile(io.BytesIO(data))
    root = source.namelist()[0].split("/", 1)[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            member = info.filename[len(root) + 1 :]
            if member in change:
                continue
            target.writestr(info.filename, source.read(info))
        for member, content in change.items():
            if content is not None:
                target.writestr(f"{root}/{member}", content)
    return out.getvalue()


def _load(data: bytes, folder: Path) -> TorchExportBackend:
    path = folder / "model.pt2"
    path.write_bytes(data)
    return TorchExportBackend(config_for(FAMILIES["mlp"], "torch_export", path), path, CPU)


def test_a_clean_archive_loads(mlp_archive: bytes, tmp_path: Path) -> None:
    backend = _load(mlp_archive, tmp_path)
    assert backend.format == "torch_export" and backend.gradients_available


def test_a_pickled_weight_is_refused_without_running_it(mlp_archive: bytes, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    source = zipfile.ZipFile(io.BytesIO(mlp_archive))
    root = source.namelist()[0].split("/", 1)[0]
    config = json.loads(source.read(f"{root}/data/weights/model_weights_config.json"))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    hostile = _rewrite(
        mlp_archive,
        {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            f"data/weights/{first['path_name']}": pickle.dumps(_Payload(marker)),
        },
    )
    with pytest.raises(InvalidArgument, match="pickled object"):
        _load(hostile, tmp_path)
    assert not marker.exists()
    # The guard is what stands between the file and the payload: torch's own loader runs it.
    with pytest.raises(Exception):  # noqa: B017 - the payload returns None, not a tensor
        torch.export.load(io.BytesIO(hostile))
    assert marker.exists()


def test_unsafe_sample_inputs_and_extra_members_are_refused(
    mlp_archive: bytes, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    hostile = _rewrite(mlp_archive, {"data/sample_inputs/model.pt": pickle.dumps(_Payload(marker))})
    with pytest.raises(InvalidArgument, match="sample inputs are not plain tensors"):
        _load(hostile, tmp_path)
    assert not marker.exists()
    aoti = _rewrite(mlp_archive, {"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(InvalidArgument, match="AOTInductor"):
        _load(aoti, tmp_path)
    custom = _rewrite(mlp_archive, {"data/constants/custom_obj_0": b"x"})
    with pytest.raises(InvalidArgument, match="custom_obj_0"):
        _load(custom, tmp_path)
    with pytest.raises(InvalidArgument, match="not a zip archive"):
        _load(b"not a zip", tmp_path)


def test_a_graph_calling_a_python_function_is_refused(mlp_archive: bytes, tmp_path: Path) -> None:
    source = zipfile.ZipFile(io.BytesIO(mlp_archive))
    root = source.namelist()[0].split("/", 1)[0]
    graph = source.read(f"{root}/models/model.json").decode()
    assert "torch.ops.aten.tanh.default" in graph
    hostile = _rewrite(
        mlp_archive,
        {"models/model.json": graph.replace("torch.ops.aten.tanh.default", "torch.os.getcwd")},
    )
    with pytest.raises(InvalidArgument, match="not an allowed operator"):
        _load(hostile, tmp_path)
    # torch's own verifier refuses that at load; check_program refuses it too, in case a
    # future verifier lets more through.
    program = torch.export.load(io.BytesIO(mlp_archive))
    check_program(program, "m")
    node = next(n for n in program.graph.nodes if n.target == torch.ops.aten.tanh.default)
    node.target = os.getcwd
    with pytest.raises(InvalidArgument, match="getcwd"):
        check_program(program, "m")
