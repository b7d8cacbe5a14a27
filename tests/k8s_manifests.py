"""The k8s/ manifests as the tests read them: constants, rendered kustomizations (kustomize itself), lookups."""

from __future__ import annotations

import copy
import functools
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from mor_dist import k8s

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
CONFIGS = REPO / "configs"
TARGETS = ["base", *(f"overlays/{p.name}" for p in sorted((K8S / "overlays").iterdir()) if p.is_dir())]
BASE_FILES = sorted(p.name for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")

Doc = dict[str, Any]


@functools.cache
def _rendered(target: str) -> tuple[Doc, ...]:
    if not (shutil.which("kubectl") or shutil.which("kustomize")):
        pytest.skip("neither kubectl nor kustomize is installed: k8s/ cannot be rendered")
    return tuple(k8s.render(K8S / target))


def rendered(target: str) -> list[Doc]:
    """A private copy of a kustomization's rendered resources."""
    return copy.deepcopy(list(_rendered(target)))


SOURCES = [f"base/{name}" for name in BASE_FILES] + [f"rendered {t}" for t in TARGETS]


def load_source(source: str) -> list[Doc]:
    """A manifest file of the base ("base/<file>") or a rendered kustomization ("rendered <target>")."""
    if source.startswith("rendered "):
        return rendered(source.removeprefix("rendered "))
    return [d for d in yaml.safe_load_all((K8S / source).read_text()) if d is not None]


def one(docs: list[Doc], kind: str) -> Doc:
    """The only resource of a kind."""
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
