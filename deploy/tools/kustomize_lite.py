#!/usr/bin/env python3
"""Render our kustomizations without kustomize: the fallback of .ci/check-deploy.

Supports exactly what deploy/kubernetes uses, and refuses anything else loudly rather than
rendering it wrongly:

- ``resources``: YAML files (one or more documents) and directories holding a kustomization;
- ``images``: ``name`` matched against the image without its tag or digest, then ``newName``,
  ``newTag`` and ``digest`` applied, in every container list of every object;
- ``patches``: RFC 6902 JSON patches (a YAML list of operations; ``path`` or inline ``patch``)
  with a ``target`` selecting by group, version, kind, name and namespace.

Order of application follows kustomize: a base is rendered completely, then the overlay's
patches, then the overlay's image rewrites. When `kubectl kustomize` (kustomize v4+) is
available, check-deploy and tests/deploy compare its output with ours object by object.

Usage: kustomize_lite.py DIR                 render DIR to stdout (multi-document YAML)
       kustomize_lite.py --compare DIR FILE  exit 1 unless FILE (e.g. `kubectl kustomize DIR`
                                             output) holds the same objects as our rendering
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")

Obj = dict[str, Any]


class RenderError(Exception):
    """The kustomization uses something this renderer does not implement, or is malformed."""


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    raise RenderError(f"{directory}: no kustomization.yaml")


def _load_documents(path: Path) -> list[Obj]:
    with path.open() as stream:
        docs = [doc for doc in yaml.safe_load_all(stream) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise RenderError(f"{path}: every document must be an object with apiVersion, kind")
    return docs


# -- RFC 6902 ---------------------------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _child(container: Any, token: str, path: str) -> Any:
    if isinstance(container, dict):
        if token not in container:
            raise RenderError(f"patch path {path!r}: no key {token!r}")
        return container[token]
    if isinstance(container, list):
        index = _index(container, token, path, allow_end=False)
        return container[index]
    raise RenderError(f"patch path {path!r}: cannot descend into a scalar at {token!r}")


def _index(container: list[Any], token: str, path: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit():
        raise RenderError(f"patch path {path!r}: {token!r} is not a list index")
    index = int(token)
    limit = len(container) if allow_end else len(container) - 1
    if index > limit:
        raise RenderError(f"patch path {path!r}: index {index} out of range")
    return index


def apply_json_patch(document: Obj, operations: list[Obj]) -> Obj:
    """Apply RFC 6902 add/remove/replace/test operations (move and copy are not needed here)."""
    result = copy.deepcopy(document)
    for operation in operations:
        op, path = operation.get("op"), operation.get("path")
        if not isinstance(path, str):
            raise RenderError(f"patch operation without a path: {operation!r}")
        *parents, last = _pointer(path) or [""]
        if last == "" and not parents:
            raise RenderError("patching the whole document is not supported")
        parent: Any = result
        for token in parents:
            parent = _child(parent, token, path)
        if op == "add":
            value = copy.deepcopy(operation["value"])
            if isinstance(parent, list):
                parent.insert(_index(parent, last, path, allow_end=True), value)
            else:
                parent[last] = value
        elif op == "remove":
            _child(parent, last, path)  # must exist (RFC 6902 4.2)
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        elif op == "replace":
            _child(parent, last, path)  # must exist (RFC 6902 4.3)
            value = copy.deepcopy(operation["value"])
            if isinstance(parent, list):
                parent[int(last)] = value
            else:
                parent[last] = value
        elif op == "test":
            if _child(parent, last, path) != operation.get("value"):
                raise RenderError(f"patch test failed at {path!r}")
        else:
            raise RenderError(f"patch op {op!r} not supported (add, remove, replace, test)")
    return result


# -- transformers -----------------------------------------------------------------------------


def _group_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _matches(obj: Obj, target: Obj) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise RenderError(f"patch target selectors not supported: {sorted(unknown)}")
    group, version = _group_version(obj["apiVersion"])
    metadata = obj.get("metadata", {})
    actual = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": metadata.get("name"),
        "namespace": metadata.get("namespace"),
    }
    return all(actual[key] == value for key, value in target.items())


def _split_image(image: str) -> tuple[str, str, str]:
    """name, ':tag' or '', '@digest' or '' (a registry port's colon is not a tag)."""
    name, at, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon:], at + digest
    return name, "", at + digest


def _rewrite_image(image: str, rules: list[Obj]) -> str:
    name, tag, digest = _split_image(image)
    for rule in rules:
        unknown = set(rule) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise RenderError(f"images fields not supported: {sorted(unknown)}")
        if rule["name"] != name:
            continue
        name = rule.get("newName", name)
        if "newTag" in rule:
            tag, digest = f":{rule['newTag']}", ""
        if "digest" in rule:
            tag, digest = "", f"@{rule['digest']}"
        return f"{name}{tag}{digest}"
    return image


def _apply_images(node: Any, rules: list[Obj]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in CONTAINER_LISTS and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = _rewrite_image(container["image"], rules)
            _apply_images(value, rules)
    elif isinstance(node, list):
        for item in node:
            _apply_images(item, rules)


# -- render -----------------------------------------------------------------------------------


def render(directory: Path) -> list[Obj]:
    """The objects a kustomization directory renders to, in resource order."""
    directory = directory.resolve()
    kfile = _kustomization_file(directory)
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{kfile}: fields not supported by kustomize_lite: {sorted(unknown)}")

    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(render(path))
        elif path.is_file():
            objects.extend(_load_documents(path))
        else:
            raise RenderError(f"{kfile}: resource {entry!r} not found")

    for patch in spec.get("patches", []):
        if "path" in patch:
            operations = yaml.safe_load((directory / patch["path"]).read_text())
        elif "patch" in patch:
            operations = yaml.safe_load(patch["patch"])
        else:
            raise RenderError(f"{kfile}: a patch needs path or patch")
        if not isinstance(operations, list):
            raise RenderError(f"{kfile}: only JSON 6902 patches (a list of operations) supported")
        target = patch.get("target")
        if not target:
            raise RenderError(f"{kfile}: a JSON 6902 patch needs a target")
        hits = [i for i, obj in enumerate(objects) if _matches(obj, target)]
        if not hits:
            raise RenderError(f"{kfile}: patch target {target} matches no object")
        for i in hits:
            objects[i] = apply_json_patch(objects[i], operations)

    rules = spec.get("images", [])
    for obj in objects:
        _apply_images(obj, rules)
    return objects


def dump(objects: list[Obj]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=True, default_flow_style=False)


def _key(obj: Obj) -> tuple[str, str, str, str]:
    metadata = obj.get("metadata", {})
    return (obj["apiVersion"], obj["kind"], metadata.get("namespace", ""), metadata["name"])


def differences(ours: list[Obj], theirs: list[Obj]) -> list[str]:
    """What differs between two renderings, object by object (kustomize orders by kind)."""
    mine = {_key(obj): obj for obj in ours}
    other = {_key(obj): obj for obj in theirs}
    found = [f"only in kustomize_lite: {key}" for key in sorted(mine.keys() - other.keys())]
    found += [f"only in the other rendering: {key}" for key in sorted(other.keys() - mine.keys())]
    found += [
        f"differs: {key}\n--- kustomize_lite\n{dump([mine[key]])}--- other\n{dump([other[key]])}"
        for key in sorted(mine.keys() & other.keys())
        if mine[key] != other[key]
    ]
    return found


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2:
            sys.stdout.write(dump(render(Path(argv[1]))))
            return 0
        if len(argv) == 4 and argv[1] == "--compare":
            with open(argv[3]) as stream:
                theirs = [doc for doc in yaml.safe_load_all(stream) if doc is not None]
            found = differences(render(Path(argv[2])), theirs)
            for line in found:
                print(f"kustomize_lite: {line}", file=sys.stderr)
            return 1 if found else 0
    except RenderError as error:
        print(f"kustomize_lite: {error}", file=sys.stderr)
        return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
