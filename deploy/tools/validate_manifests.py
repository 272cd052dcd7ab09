#!/usr/bin/env python3
"""Validate rendered Kubernetes manifests offline; exit 1 on any problem.

Three layers, because a schema alone lets the expensive mistakes through:

1. every built-in object against the OpenAPI schema of a pinned Kubernetes version with
   kubernetes-validate in strict mode (unknown fields are errors, not silently dropped);
2. CRDs, which kubernetes-validate has no schemas for: the ServiceMonitor
   (monitoring.coreos.com/v1) is checked here field by field against the operator's documented
   structure; any other CRD fails until someone adds a checker (never a silent skip);
3. cross-references the API server would accept but that break at run time: Service, PDB and
   ServiceMonitor selectors that select no pods, an HPA aimed at a missing Deployment, envFrom
   or volumes naming a missing ConfigMap (or env a missing ConfigMap key), probes and Service
   ports naming no container port; Jobs' pod templates included.

Usage: validate_manifests.py --kubernetes-version 1.31.0 FILE.yaml [FILE.yaml ...]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

Obj = dict[str, Any]
DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$"
)  # Prometheus duration, as the CRD's pattern
SERVICE_MONITOR_ENDPOINT_KEYS = {
    "port",
    "targetPort",
    "path",
    "scheme",
    "params",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "honorTimestamps",
    "metricRelabelings",
    "relabelings",
    "bearerTokenSecret",
    "authorization",
    "basicAuth",
    "oauth2",
    "tlsConfig",
    "followRedirects",
    "enableHttp2",
    "filterRunning",
    "proxyUrl",
    "trackTimestampsStaleness",
}
SERVICE_MONITOR_SPEC_KEYS = {
    "endpoints",
    "selector",
    "namespaceSelector",
    "jobLabel",
    "targetLabels",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
    "labelLimit",
    "labelNameLengthLimit",
    "labelValueLengthLimit",
    "keepDroppedTargets",
    "attachMetadata",
    "scrapeProtocols",
    "fallbackScrapeProtocol",
    "bodySizeLimit",
    "scrapeClass",
    "selectorMechanism",
}


def _name(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    """matchLabels only; matchExpressions would need the full grammar and we do not use it."""
    if "matchExpressions" in selector:
        raise ValueError("matchExpressions not supported by this checker")
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def check_service_monitor(obj: Obj) -> Iterator[str]:
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        yield f"apiVersion must be monitoring.coreos.com/v1, got {obj.get('apiVersion')!r}"
    extra = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
    if extra:
        yield f"unexpected top-level fields {sorted(extra)}"
    if not isinstance(obj.get("metadata", {}).get("name"), str):
        yield "metadata.name is required"
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        yield "spec is required"
        return
    for key in sorted(set(spec) - SERVICE_MONITOR_SPEC_KEYS):
        yield f"spec.{key}: unknown field"
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (
        selector.get("matchLabels") or selector.get("matchExpressions")
    ):
        yield "spec.selector needs matchLabels or matchExpressions (an empty one selects all)"
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        yield "spec.endpoints must be a non-empty list"
        return
    for i, endpoint in enumerate(endpoints):
        where = f"spec.endpoints[{i}]"
        if not isinstance(endpoint, dict):
            yield f"{where} must be an object"
            continue
        for key in sorted(set(endpoint) - SERVICE_MONITOR_ENDPOINT_KEYS):
            yield f"{where}.{key}: unknown field"
        if ("port" in endpoint) == ("targetPort" in endpoint):
            yield f"{where}: exactly one of port (a Service port name) or targetPort"
        if "port" in endpoint and not isinstance(endpoint["port"], str):
            yield f"{where}.port must be a port name (string)"
        path = endpoint.get("path", "/metrics")
        if not isinstance(path, str) or not path.startswith("/"):
            yield f"{where}.path must start with '/'"
        if endpoint.get("scheme", "http") not in ("http", "https"):
            yield f"{where}.scheme must be http or https"
        for key in ("interval", "scrapeTimeout"):
            value = endpoint.get(key)
            if value is not None and (not isinstance(value, str) or not DURATION.match(value)):
                yield f"{where}.{key}: {value!r} is not a Prometheus duration"


def _pod_templates(objects: list[Obj]) -> list[tuple[Obj, Obj]]:
    """(workload, pod template) for Deployments, StatefulSets, DaemonSets and Jobs."""
    kinds = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
    return [(o, o["spec"]["template"]) for o in objects if o.get("kind") in kinds]


def check_references(objects: list[Obj]) -> Iterator[str]:
    by_kind: dict[str, dict[str, Obj]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    templates = _pod_templates(objects)
    pod_labels = [t.get("metadata", {}).get("labels", {}) for _, t in templates]

    for workload, template in templates:
        selector = workload["spec"].get("selector", {})
        # A Job's selector is generated by the API server unless given.
        generated = workload["kind"] == "Job" and not selector
        if not generated and not _selects(selector, template.get("metadata", {}).get("labels", {})):
            yield f"{_name(workload)}: spec.selector does not match its pod template labels"
        pod = template["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for volume in pod.get("volumes", []):
            ref = volume.get("configMap", {}).get("name")
            if ref and ref not in by_kind.get("ConfigMap", {}):
                yield f"{_name(workload)}: volume {volume['name']} names missing ConfigMap {ref}"
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{_name(workload)} container {container['name']}"
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef", {})
                if (
                    ref
                    and not ref.get("optional")
                    and ref["name"] not in by_kind.get("ConfigMap", {})
                ):
                    yield f"{where}: envFrom names missing ConfigMap {ref['name']}"
            for variable in container.get("env", []):
                key_ref = variable.get("valueFrom", {}).get("configMapKeyRef")
                if not key_ref or key_ref.get("optional"):
                    continue
                config_map = by_kind.get("ConfigMap", {}).get(key_ref["name"])
                if config_map is None or key_ref["key"] not in config_map.get("data", {}):
                    yield (
                        f"{where}: env {variable['name']} names missing ConfigMap key "
                        f"{key_ref['name']}/{key_ref['key']}"
                    )
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    yield f"{where}: volumeMount {mount['name']} has no volume"
            ports = container.get("ports", [])
            names = {p.get("name") for p in ports}
            numbers = {p["containerPort"] for p in ports}
            for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(probe_kind) or {}
                for handler in ("grpc", "httpGet", "tcpSocket"):
                    port = probe.get(handler, {}).get("port")
                    if port is not None and port not in names | numbers:
                        yield f"{where}: {probe_kind} port {port!r} is not a container port"

    all_ports: list[Obj] = [
        p for _, t in templates for c in t["spec"]["containers"] for p in c.get("ports", [])
    ]
    for service in by_kind.get("Service", {}).values():
        selector = {"matchLabels": service["spec"].get("selector", {})}
        if not any(_selects(selector, labels) for labels in pod_labels):
            yield f"{_name(service)}: selector matches no pod template"
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if not any(target in (p.get("name"), p["containerPort"]) for p in all_ports):
                yield f"{_name(service)}: targetPort {target!r} is no container port"

    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        if not any(_selects(pdb["spec"]["selector"], labels) for labels in pod_labels):
            yield f"{_name(pdb)}: selector matches no pod template"

    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["name"] not in by_kind.get(ref["kind"], {}):
            yield f"{_name(hpa)}: scaleTargetRef {ref['kind']}/{ref['name']} not in the manifests"
        elif "replicas" in by_kind[ref["kind"]][ref["name"]]["spec"]:
            yield f"{_name(hpa)}: its target sets spec.replicas, which fights the autoscaler"

    for monitor in by_kind.get("ServiceMonitor", {}).values():
        selected = [
            s
            for s in by_kind.get("Service", {}).values()
            if _selects(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        if not selected:
            yield f"{_name(monitor)}: selector matches no Service's labels"
        for endpoint in monitor["spec"]["endpoints"]:
            port = endpoint.get("port")
            if port and not any(
                port == p.get("name") for s in selected for p in s["spec"].get("ports", [])
            ):
                yield f"{_name(monitor)}: endpoint port {port!r} is no port of the Service"


def validate(objects: list[Obj], kubernetes_version: str) -> list[str]:
    problems: list[str] = []
    for obj in objects:
        group = obj.get("apiVersion", "").rpartition("/")[0]
        if obj.get("kind") == "ServiceMonitor" and group == "monitoring.coreos.com":
            found = [f"{_name(obj)}: {p}" for p in check_service_monitor(obj)]
            problems += found
            if not found:
                print(f"  ok     {_name(obj)}: CRD (no schema offline), our structural checker")
            continue
        try:
            kubernetes_validate.validate(obj, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
            problems.append(f"{_name(obj)}: {path}: {error.message}")
            continue
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(
                f"{_name(obj)}: no Kubernetes {kubernetes_version} schema for "
                f"{obj.get('apiVersion')} {obj.get('kind')} (a CRD needs a checker here)"
            )
            continue
        print(f"  ok     {_name(obj)}: kubernetes {kubernetes_version} schema (strict)")
    if not problems:
        problems += list(check_references(objects))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    failed = False
    for path in args.files:
        objects = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        print(f"{path}: {len(objects)} objects")
        if not objects:
            print("  FAIL: renders to nothing")
            failed = True
        for problem in validate(objects, args.kubernetes_version):
            print(f"  FAIL {problem}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
