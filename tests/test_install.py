"""The pinned install: scripts/constraints.txt pins what CI tested, inside the ranges setup.py gives users."""
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "scripts" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = Version(version)
    return pins


def _setup_requirements() -> list[Requirement]:
    text = (REPO / "setup.py").read_text()
    quoted = re.findall(r'"([A-Za-z0-9_.\-]+\s*(?:[<>!~]=?|==)[^"=:]*)"', text)
    return [Requirement(q) for q in quoted]


def test_constraints_pin_every_package_setup_names_within_its_range():
    pins = _pins()
    reqs = [r for r in _setup_requirements() if r.name not in ("torch", "flash-attn")]
    assert len(reqs) >= 10
    for req in reqs:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not pinned in scripts/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"


def test_install_script_uses_the_constraints_and_ci_runs_the_install_script():
    install = (REPO / "scripts" / "install.sh").read_text()
    assert "-c scripts/constraints.txt" in install and '"torch==2.13.0"' in install
    assert "bash scripts/install.sh" in (REPO / ".ci" / "run").read_text()
    assert "torch==" not in (REPO / "scripts" / "constraints.txt").read_text().split("\n", 4)[-1]
