"""GPU readiness: the paper-scale model on CUDA, through onnxruntime's CUDA and TensorRT execution
providers (IO binding, FP32 and FP16, large batches), against raw torch on CUDA, then one
paper-scale Profile through a real interscope server on the GPU.

Run by `bench/gpu_check.sh` (which installs the GPU extra first); never by the tests. Each
figure is forwards/s measured side by side in this one process. `--allow-cpu` runs the same
code on the CPU provider (to check the script itself on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paper import SIZE, ResNet18, build_repository, profile_options

BATCHES = (256, 1024, 4096)
SECONDS = 3.0


def rate(run: Callable[[], object], batch: int, sync: Callable[[], None]) -> float:
    run()
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        run()
        done += batch
    sync()
    return done / (time.perf_counter() - start)


def export(net: torch.nn.Module, path: Path, half: bool) -> None:
    example = torch.rand(1, 3, SIZE, SIZE)
    module = net
    if half:  # an FP16 graph end to end, as teams export for GPU serving
        module, example = net.half(), example.half()
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    net.float()


def onnx_rate(path: Path, provider: str, batch: int, half: bool, device: str) -> float:
    options: list[object] = [provider]
    if provider == "TensorrtExecutionProvider":
        cache = tempfile.mkdtemp(prefix="trt-")
        trt = {"trt_fp16_enable": half, "trt_engine_cache_enable": True}
        options = [(provider, {**trt, "trt_engine_cache_path": cache}), "CUDAExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=options)
    dtype = np.float16 if half else np.float32
    x = np.random.default_rng(0).uniform(size=(batch, 3, SIZE, SIZE)).astype(dtype)
    binding = session.io_binding()
    # IO binding: the input lives on the device once; outputs stay there (no host copies).
    value = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
    binding.bind_ortvalue_input("input", value)
    binding.bind_output("logits", device)
    return rate(lambda: session.run_with_iobinding(binding), batch, binding.synchronize_outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--allow-cpu", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    if not cuda and not args.allow_cpu:
        sys.exit(
            "no CUDA: torch.cuda.is_available() is False or onnxruntime lacks the CUDA provider "
            f"(providers: {ort.get_available_providers()}); install the gpu extra on a CUDA host"
        )
    device = "cuda" if cuda else "cpu"
    batches = BATCHES if cuda else (256,)
    print(f"torch {torch.__version__} on {device}; onnxruntime {ort.__version__}")
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    torch.manual_seed(0)
    net = ResNet18().eval()
    root = Path(tempfile.mkdtemp(prefix="interscope-gpu-"))
    export(net, root / "fp32.onnx", half=False)
    export(net, root / "fp16.onnx", half=True)
    gpu_providers = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    providers = [p for p in ort.get_available_providers() if p in gpu_providers]
    if not cuda:
        providers = ["CPUExecutionProvider"]
    target = net.to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for batch in batches:
        for half in (False, True):
            if half and not cuda:
                continue
            x = torch.rand(batch, 3, SIZE, SIZE, device=device)
            with torch.inference_mode():
                model = target.half() if half else target.float()
                inputs = x.half() if half else x
                raw = rate(lambda m=model, i=inputs: m(i), batch, sync)
            line = f"batch {batch:5d} {'FP16' if half else 'FP32'}: raw torch {raw:,.0f}/s"
            for provider in providers:
                path = root / ("fp16.onnx" if half else "fp32.onnx")
                try:
                    got = onnx_rate(path, provider, batch, half, device)
                    line += f"; {provider.removesuffix('ExecutionProvider')} {got:,.0f}/s"
                    line += f" ({got / raw:.2f}x)"
                except Exception as exc:  # report a provider that fails, keep measuring
                    line += f"; {provider}: failed ({type(exc).__name__}: {exc})"
            print(line, flush=True)
    target.float()
    serve(root, device)


def serve(root: Path, device: str) -> None:
    """One paper-scale Profile through an interscope server on `device`."""
    import interscope
    from interscope_server.config import Settings
    from interscope_server.server import BackgroundServer

    # Large batches are what a GPU needs to be busy.
    build_repository(root / "repository", **({"max_batch_size": 4096} if device == "cuda" else {}))
    os.environ.setdefault("INTERSCOPE_MODEL_HOSTS", "process")
    settings = Settings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        metrics_host="127.0.0.1",
        model_repository=root / "repository",
        device="cuda" if device == "cuda" else "cpu",
    )  # type: ignore[call-arg]
    x = np.random.default_rng(0).uniform(size=(1, 3, SIZE, SIZE)).astype(np.float32)
    with BackgroundServer(settings) as server, interscope.Client(server.address) as client:
        print(f"server model device: {client.get_model('resnet18-64').device}")
        options = profile_options(4, False)
        client.profile(model="resnet18-64", x=x, label=[0], **profile_options(2, False))
        start = time.perf_counter()
        result = client.profile(model="resnet18-64", x=x, label=[0], **options)
        wall = time.perf_counter() - start
        forwards = result.profiles[0].forwards
        print(
            f"paper-scale Profile (16x16 grid, 200 pairs, 10 orders, 4 contexts): "
            f"{forwards:,} forwards in {wall:.1f} s = {forwards / wall:,.0f} forwards/s"
        )


if __name__ == "__main__":
    main()
