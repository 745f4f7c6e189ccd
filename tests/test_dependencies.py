"""pyproject.toml declares version ranges (so `pip install sslpipe` keeps a cluster's torch) and constraints.txt the
exact versions CI tests: the installed versions and the pins lie inside the ranges, and every third-party module the
code imports is declared."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata

from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CI_EXTRAS = ("cpu", "gpu", "test", "onnx")  # what constraints.txt pins; the other extras are optional add-ons
# Modules of optional extras CI does not install (so no installed distribution names them): their distribution.
NOT_INSTALLED = {"tensorboard": "tensorboard", "umap": "umap-learn"}


def _requirements(extras: tuple[str, ...] | None = None) -> list[Requirement]:
    """The dependencies and the optional ones of `extras` (all extras when None)."""
    optional = PROJECT["optional-dependencies"]
    names = optional if extras is None else extras
    return [Requirement(r) for r in PROJECT["dependencies"] + [r for e in names for r in optional[e]]]


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = [line.split("#")[0].strip() for line in lines]
    return {canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in pins if p}


def test_declared_ranges_hold_the_installed_versions():
    """What the tests run on (`.[cpu,test,onnx]`) is inside the declared ranges; nothing is pinned exactly."""
    for req in _requirements(("cpu", "test", "onnx")):
        version = metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} is outside {req}"
    exact = [str(r) for r in _requirements() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not exact, f"exact pins belong in constraints.txt, not pyproject.toml: {exact}"


def test_constraints_pin_every_declared_package_inside_its_range():
    pins = _pins()
    for req in _requirements(CI_EXTRAS):
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt pins no version of {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"pin {name}=={pins[name]} is outside {req}"
    assert (pins["torch"], pins["torchvision"]) == ("2.14.1", "0.29.1")  # what CI installs
    for name, version in pins.items():  # the pins are what this environment runs, where it has the package
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        assert installed == version, f"constraints.txt pins {name}=={version}, installed {installed}"


def test_ci_installs_what_the_readme_installs():
    """`.ci/run` and the README's first command install the same extras, all of them pinned here."""
    install = r'pip install (?:-q )?-c constraints.txt -e "\.\[([a-z,]+)\]"'
    ci = re.findall(install, (REPO / ".ci" / "run").read_text())
    readme = re.findall(install, (REPO / "README.md").read_text())
    assert len(ci) == 1 and readme[:1] == ci, (ci, readme)
    assert set(ci[0].split(",")) <= set(CI_EXTRAS)


def _imported_modules() -> dict[str, str]:
    """Top-level module -> a file importing it, over sslpipe/ and tests/ (imports inside functions too)."""
    found: dict[str, str] = {}
    for path in sorted([*(REPO / "sslpipe").rglob("*.py"), *(REPO / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def test_every_imported_third_party_module_is_declared():
    local = {"sslpipe", "tests"} | {p.stem for p in (REPO / "tests").rglob("*.py")}
    declared = {canonicalize_name(r.name) for r in _requirements()}
    providers = {**{m: [d] for m, d in NOT_INSTALLED.items()}, **metadata.packages_distributions()}
    third_party = {m: f for m, f in _imported_modules().items() if m not in sys.stdlib_module_names | local}
    assert {"torch", "timm", "safetensors", "cv2", "PIL", "pytest"} <= set(third_party)
    undeclared = {m: f for m, f in third_party.items()
                  if not {canonicalize_name(d) for d in providers.get(m, [])} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml (module: a file importing it): {undeclared}"
