"""The deploy/ manifests: what they promise (GPU, security, balancing, scaling) and that the
settings they pass are ones the server accepts. Rendered with deploy/tools/kustomize_lite.py,
and compared with `kubectl kustomize` where a kubectl with kustomize v4+ is installed."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from interscope_server.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = REPO_ROOT / "deploy" / "kubernetes"
BASE = KUSTOMIZE_DIR / "base"
CPU = KUSTOMIZE_DIR / "overlays" / "cpu"
JOBS = KUSTOMIZE_DIR / "jobs"
MERGE = JOBS / "merge"
GPU_RESOURCE = "nvidia.com/gpu"

Obj = dict[str, Any]


def _load_tool(name: str) -> ModuleType:
    """deploy/tools is scripts, not a package: import a file by path."""
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "deploy" / "tools" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


kustomize_lite = _load_tool("kustomize_lite")
validate_manifests = _load_tool("validate_manifests")


def _render(directory: Path) -> dict[str, Obj]:
    objects: list[Obj] = kustomize_lite.render(directory)
    return {obj["kind"]: obj for obj in objects}


def _container(objects: dict[str, Obj]) -> Obj:
    containers: list[Obj] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.fixture(scope="module")
def base() -> dict[str, Obj]:
    return _render(BASE)


@pytest.fixture(scope="module")
def cpu() -> dict[str, Obj]:
    return _render(CPU)


def _kubectl_with_modern_kustomize() -> str | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    version = subprocess.run(
        [kubectl, "version", "--client"], capture_output=True, text=True, timeout=60
    ).stdout
    match = re.search(r"Kustomize Version: v(\d+)", version)
    return kubectl if match and int(match.group(1)) >= 4 else None


@pytest.mark.parametrize(
    "directory", [BASE, CPU, JOBS, MERGE], ids=["base", "cpu", "jobs", "merge"]
)
def test_fallback_renderer_matches_kubectl_kustomize(directory: Path) -> None:
    kubectl = _kubectl_with_modern_kustomize()
    if kubectl is None:
        pytest.skip(
            "no kubectl with kustomize v4+ on PATH to compare kustomize_lite against (Debian's "
            "kubernetes-client embeds kustomize v2; install an upstream kubectl >= 1.21)"
        )
    rendered = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert rendered.returncode == 0, rendered.stderr
    theirs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc is not None]
    assert kustomize_lite.differences(kustomize_lite.render(directory), theirs) == []


@pytest.mark.parametrize(
    "directory", [BASE, CPU, JOBS, MERGE], ids=["base", "cpu", "jobs", "merge"]
)
def test_every_object_validates_offline(directory: Path) -> None:
    objects = kustomize_lite.render(directory)
    assert validate_manifests.validate(objects, "1.29.0") == []


def test_base_runs_on_a_gpu_with_grpc_probes(base: dict[str, Obj]) -> None:
    container = _container(base)
    assert container["resources"]["limits"][GPU_RESOURCE] == 1
    assert container["resources"]["requests"][GPU_RESOURCE] == 1
    assert base["ConfigMap"]["data"]["INTERSCOPE_DEVICE"] == "cuda"
    assert container["image"].endswith("-cuda")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090}


def test_cpu_overlay_has_no_gpu_and_runs_on_the_cpu_image(cpu: dict[str, Obj]) -> None:
    pod = cpu["Deployment"]["spec"]["template"]["spec"]
    assert GPU_RESOURCE not in str(pod)
    assert cpu["ConfigMap"]["data"]["INTERSCOPE_DEVICE"] == "cpu"
    images = {c["image"] for c in pod["containers"] + pod["initContainers"]}
    assert images == {"ghcr.io/interscope/interscope:0.1.0-cpu"}
    init = pod["initContainers"][0]
    assert init["args"] == ["demo-repository", "/models"]
    assert {"name": "models", "emptyDir": {"sizeLimit": "512Mi"}} in pod["volumes"]


@pytest.mark.parametrize("variant", ["base", "cpu"])
def test_pods_run_locked_down(variant: str, request: pytest.FixtureRequest) -> None:
    objects: dict[str, Obj] = request.getfixturevalue(variant)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "memory" in container["resources"]["limits"]
    # The model repository is never writable by the server.
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}


def test_headless_service_and_autoscaling_contract(base: dict[str, Obj]) -> None:
    service = base["Service"]["spec"]
    assert service["clusterIP"] == "None"  # DNS lists every pod: client-side round_robin
    hpa = base["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "interscope_rpc_in_flight"
    assert "replicas" not in base["Deployment"]["spec"]  # the HPA owns it
    grace = float(base["ConfigMap"]["data"]["INTERSCOPE_GRACE_SECONDS"])
    pod = base["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > grace + 5  # preStop sleep + drain fit


def test_adapter_rule_serves_the_hpa_metric(base: dict[str, Obj]) -> None:
    rules = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "adapter-rules.yaml").read_text())
    served = {rule["name"]["as"] for rule in rules["rules"]["custom"]}
    for metric in base["HorizontalPodAutoscaler"]["spec"]["metrics"]:
        assert metric["pods"]["metric"]["name"] in served


@pytest.mark.parametrize("variant", ["base", "cpu"])
def test_configmap_is_settings_the_server_accepts(
    variant: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects: dict[str, Obj] = request.getfixturevalue(variant)
    data: dict[str, str] = objects["ConfigMap"]["data"]
    for key, value in data.items():
        assert key.startswith("INTERSCOPE_"), key
        monkeypatch.setenv(key, value)
    settings = Settings()  # extra="forbid" and field validation, as `interscope serve` would
    assert settings.port == 50051
    assert settings.metrics_port == 9090
    assert str(settings.model_repository) == "/models"


def test_dockerfile_env_defaults_are_settings_fields() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    keys = set(re.findall(r"\b(INTERSCOPE_[A-Z_]+)=", dockerfile))
    assert {"INTERSCOPE_PORT", "INTERSCOPE_METRICS_PORT", "INTERSCOPE_MODEL_REPOSITORY"} <= keys
    fields = {f"INTERSCOPE_{name.upper()}" for name in Settings.model_fields}
    assert keys <= fields, f"not Settings fields: {sorted(keys - fields)}"


def test_checker_catches_broken_references(base: dict[str, Obj]) -> None:
    """The cross-reference layer finds what schemas cannot: names that point nowhere."""
    broken = yaml.safe_load(yaml.safe_dump(list(base.values())))
    by_kind = {obj["kind"]: obj for obj in broken}
    container = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["port"] = 50052
    by_kind["ServiceMonitor"]["spec"]["endpoints"][0]["port"] = "http-metrics"
    by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] = "nope"
    problems = "\n".join(validate_manifests.check_references(broken))
    assert "readinessProbe port 50052" in problems
    assert "endpoint port 'http-metrics'" in problems
    assert "Deployment/nope" in problems


def test_service_monitor_checker_rejects_bad_structure(base: dict[str, Obj]) -> None:
    monitor = yaml.safe_load(yaml.safe_dump(base["ServiceMonitor"]))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    monitor["spec"]["endpoints"][0]["portt"] = "metrics"
    problems = list(validate_manifests.check_service_monitor(monitor))
    assert any("not a Prometheus duration" in p for p in problems)
    assert any("portt: unknown field" in p for p in problems)
    assert list(validate_manifests.check_service_monitor(base["ServiceMonitor"])) == []


def test_container_command_and_healthcheck_work_with_the_overlay_settings(
    cpu: dict[str, Obj], demo_repository: Path, tmp_path: Path
) -> None:
    """What the image runs, without a container engine: `interscope serve` configured by the
    cpu overlay's ConfigMap, probed by the Dockerfile's HEALTHCHECK command, drained by SIGTERM.
    Only the addresses change (loopback, free ports) and /models becomes the demo repository."""
    # The console script sits beside the interpreter running the tests (the venv need not be
    # activated, so it may not be on PATH).
    interscope = str(Path(sys.executable).parent / "interscope")
    assert Path(interscope).is_file(), f"no console script at {interscope}: pip install ."
    container = _container(cpu)
    assert container["args"] == ["serve"]
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    healthcheck = re.findall(r'CMD \["sh", "-c", "(interscope health [^"]+)"\]', dockerfile)
    assert len(healthcheck) == 2  # the cpu and gpu stages

    env = {
        **os.environ,
        **cpu["ConfigMap"]["data"],
        "INTERSCOPE_HOST": "127.0.0.1",
        "INTERSCOPE_METRICS_HOST": "127.0.0.1",
        "INTERSCOPE_PORT": str(_free_port()),
        "INTERSCOPE_METRICS_PORT": str(_free_port()),
        "INTERSCOPE_MODEL_REPOSITORY": str(demo_repository),
        "HOME": str(tmp_path),
        # In the image the console script is on PATH; here it is beside the interpreter.
        "PATH": os.pathsep.join([str(Path(interscope).parent), os.environ.get("PATH", "")]),
    }
    log = tmp_path / "serve.log"
    with log.open("w") as stream:
        server = subprocess.Popen(
            [interscope, *container["args"]], env=env, stdout=stream, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run(
                ["sh", "-c", healthcheck[0]], env=env, capture_output=True, text=True, timeout=60
            )
            if probe.returncode == 0:
                break
            assert probe.returncode != 127, f"HEALTHCHECK command not found: {probe.stderr}"
            assert server.poll() is None, f"serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"never healthy:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=float(env["INTERSCOPE_GRACE_SECONDS"]) + 10) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _expanded(args: list[str], env: dict[str, str]) -> list[str]:
    """Container args with $(VAR) replaced as the kubelet does."""
    return [re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], arg) for arg in args]


def test_audit_job_shards_over_completions_and_checkpoints_on_the_claim(
    base: dict[str, Obj],
) -> None:
    """The Indexed Job runs `interscope audit` on shard JOB_COMPLETION_INDEX of as many shards
    as it has completions, against the base's headless Service, checkpointing on the claim."""
    from interscope.cli import _shard, build_parser

    jobs = {obj["kind"]: obj for obj in kustomize_lite.render(JOBS)}
    job, config = jobs["Job"], jobs["ConfigMap"]["data"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == int(config["AUDIT_SHARDS"])
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {key: value for key, value in config.items()}
    env.update(JOB_COMPLETION_INDEX="2", POD_NAMESPACE="team")
    declared = {v["name"] for v in container["env"]}
    used = set(re.findall(r"\$\(([A-Z_]+)\)", " ".join(container["args"])))
    assert used <= declared, f"$(VAR) not declared in env: {sorted(used - declared)}"
    args = build_parser().parse_args(_expanded(container["args"], env))
    assert args.command == "audit"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JOB_COMPLETION_INDEX", "2")
        assert _shard(args) == (2, int(config["AUDIT_SHARDS"]))
    service = base["Service"]
    port = service["spec"]["ports"][0]["port"]
    assert args.address == f"dns:///{service['metadata']['name']}.team.svc.cluster.local:{port}"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "audit")
    assert str(args.checkpoint) == f"{mount['mountPath']}/checkpoints/shard-2.jsonl"
    assert str(args.data).startswith(mount["mountPath"] + "/")
    claim = next(v for v in pod["volumes"] if v["name"] == "audit")
    assert (
        claim["persistentVolumeClaim"]["claimName"]
        == jobs["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert "ReadWriteMany" in jobs["PersistentVolumeClaim"]["spec"]["accessModes"]
    # A pod that dies is retried per index (a fresh pod resuming from its checkpoint).
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimitPerIndex"] >= 1

    (merge,) = kustomize_lite.render(MERGE)
    (merger,) = merge["spec"]["template"]["spec"]["containers"]
    merged = build_parser().parse_args(merger["args"])
    assert merged.command == "audit-merge"
    assert [str(p) for p in merged.checkpoints] == [str(args.checkpoint.parent)]


def test_checker_catches_a_missing_config_key_in_a_job() -> None:
    broken = yaml.safe_load(yaml.safe_dump(kustomize_lite.render(JOBS)))
    config = next(obj for obj in broken if obj["kind"] == "ConfigMap")
    del config["data"]["AUDIT_EPS"]
    problems = "\n".join(validate_manifests.check_references(broken))
    assert "interscope-audit-config/AUDIT_EPS" in problems
    assert list(validate_manifests.check_references(kustomize_lite.render(JOBS))) == []
