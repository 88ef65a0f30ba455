"""The Bento's recipe: every package the service imports, pinned as in requirements.lock; GPU only when asked."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
#: pydicom finds its JPEG codecs as plugins (never imported by name); onnx is what the ONNX export writes with.
PLUGINS = {"pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pyjpegls", "onnx"}


def _module_file(name: str) -> Path | None:
    p = SRC / Path(*name.split("."))
    for candidate in (p / "__init__.py", p.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def service_imports() -> set[str]:
    """Third-party top-level modules imported anywhere in the bonefrac modules the service reaches."""
    seen: set[str] = set()
    third: set[str] = set()
    stack = ["bonefrac.serving.service"]
    while stack:
        mod = stack.pop()
        if mod in seen or (path := _module_file(mod)) is None:
            continue
        seen.add(mod)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for n in names:
                if n.startswith("bonefrac"):
                    stack.append(n)
                else:
                    third.add(n.split(".")[0])
    return third - set(sys.stdlib_module_names)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines: list[str]) -> dict[str, str]:
    return {_norm(n): v for n, _, v in (line.strip().partition("==") for line in lines if "==" in line)}


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_every_runtime_import_is_a_pinned_bento_package() -> None:
    bento = _load("bentofile.yaml")["python"]
    packages = bento["packages"]
    assert bento["lock_packages"] is False  # offline builds (GUIDE.md)
    pins = _pins(packages)
    assert len(pins) == len(packages), f"unpinned: {[p for p in packages if '==' not in p]}"
    lock = _pins((ROOT / "requirements.lock").read_text().splitlines())
    assert {n: v for n, v in pins.items() if lock.get(n) != v} == {}, "pins differ from requirements.lock"
    dists = md.packages_distributions()
    needed = {_norm(d) for mod in service_imports() for d in dists.get(mod, [mod])} | PLUGINS
    needed.discard("bonefrac")
    assert "timm" in needed  # the default network (EfficientNet-Lite0) is built by timm
    assert sorted(needed - set(pins)) == []


def test_gpu_variant_differs_only_in_the_cuda_image_and_the_switch() -> None:
    from bonefrac.serving.service import model_resources

    cpu, gpu = _load("bentofile.yaml"), _load("bentofile.gpu.yaml")
    assert "cuda_version" not in cpu["docker"] and gpu["docker"].pop("cuda_version") == "12.8"
    switch = {"name": "BONEFRAC_GPU", "value": "off"}
    cpu["envs"].remove(switch)
    gpu["envs"].remove({**switch, "value": "on"})
    assert cpu == gpu
    assert model_resources("on", has_gpu=False) == {"gpu": 1, "cpu": "2"}
    assert model_resources("off", has_gpu=True) == {"cpu": "2"}
    assert model_resources("auto", has_gpu=False) == {"cpu": "2"}


def test_includes_are_anchored_to_the_project_root() -> None:
    """Unanchored patterns match inside .bentoml/ (a Bento holds params.yaml and src/...): each build grew."""
    from bentoml._internal.bento.build_config import BentoPathSpec

    cfg = _load("bentofile.yaml")
    spec = BentoPathSpec(cfg["include"], cfg["exclude"], str(ROOT))
    assert spec.includes("params.yaml") and spec.includes("src/bonefrac/serving/service.py")
    assert spec.includes("src/bonefrac/serving/static/index.html")
    for inside in (
        ".bentoml/bentos/bonefrac/abc/src/params.yaml",
        ".bentoml/bentos/bonefrac/abc/src/src/bonefrac/serving/service.py",
        "params/fracatlas.yaml",
        "data/raw/params.yaml",
        "tests/unit/test_config.py",
    ):
        assert not spec.includes(inside), inside
    for name in ("bentofile.yaml", "bentofile.gpu.yaml"):  # no pointer to a file the project does not have
        for ref in re.findall(r"[\w./-]+\.(?:md|py|yaml)\b", (ROOT / name).read_text()):
            assert ref.startswith(".") or (ROOT / ref.lstrip("/")).exists(), (name, ref)
