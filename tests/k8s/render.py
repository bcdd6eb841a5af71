"""A Python rendering of the kustomize features k8s/ uses (resources, namespace, labels, images, JSON 6902
patches with a kind/name target), for machines without kubectl. Where kubectl is installed, the tests check
that both render the same objects, so this stays an equivalent and not a guess."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
}


def load_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=_Loader) if d]


def render(directory: str | Path) -> list[dict[str, Any]]:
    directory = Path(directory)
    k = yaml.load((directory / "kustomization.yaml").read_text(), Loader=_Loader)
    known = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
    unknown = set(k) - known
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: {sorted(unknown)} not handled by this renderer")
    objs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = directory / res
        objs += render(path) if path.is_dir() else load_all(path.read_text())
    for patch in k.get("patches", []):
        target = patch["target"]
        hits = [o for o in objs if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        if not hits:
            raise ValueError(f"{directory}: patch target {target} matches nothing")
        for o in hits:
            for op in yaml.load(patch["patch"], Loader=_Loader):
                _apply(o, op)
    for o in objs:
        if "namespace" in k and o["kind"] not in CLUSTER_SCOPED:
            o["metadata"]["namespace"] = k["namespace"]
        for spec in k.get("labels", []):
            o["metadata"].setdefault("labels", {}).update(spec["pairs"])
        for image in k.get("images", []):
            _set_images(o, image)
    return objs


def _apply(obj: dict[str, Any], op: dict[str, Any]) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    node: Any = obj
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if isinstance(node, list):
        idx = len(node) if last == "-" else int(last)
        if op["op"] == "remove":
            del node[idx]
        elif op["op"] == "replace":
            node[idx] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            node.insert(idx, copy.deepcopy(op["value"]))
        else:
            raise ValueError(f"op {op['op']} not handled")
        return
    if op["op"] == "remove":
        del node[last]
    elif op["op"] in ("replace", "add"):
        if op["op"] == "replace" and last not in node:
            raise KeyError(f"replace: {op['path']} does not exist")
        node[last] = copy.deepcopy(op["value"])
    else:
        raise ValueError(f"op {op['op']} not handled")


def _set_images(node: Any, image: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name, _, tag = c.get("image", "").partition(":")
                    if name == image["name"]:
                        c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
            _set_images(value, image)
    elif isinstance(node, list):
        for v in node:
            _set_images(v, image)
