"""Ready to publish: the wheel and sdist hold what they must, the wheel works alone, every command has a docs page.

The artefacts are built once per session into a temporary folder (`python -m build`, which fetches hatchling), or
taken from $SURGERY_DIST when CI has built them already. The fresh-venv test installs the wheel's dependencies from
the package index, so it runs only where $CI is set (as in .ci/run); elsewhere it is skipped and says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

import surgery
from surgery.cli import VERSION_OF, main

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "weight-surgery"


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> Path:
    """A folder with the wheel and the sdist of this checkout."""
    if os.environ.get("SURGERY_DIST"):
        return Path(os.environ["SURGERY_DIST"])
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


def artefact(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {dist}, found {[p.name for p in found]}"
    return found[0]


def wheel_names(dist: Path) -> set[str]:
    with zipfile.ZipFile(artefact(dist, "*.whl")) as wheel:
        return set(wheel.namelist())


def sdist_names(dist: Path) -> set[str]:
    with tarfile.open(artefact(dist, "*.tar.gz")) as sdist:
        return {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}


def checkout_files(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob(pattern) if "__pycache__" not in p.parts}


def test_wheel_holds_the_package_its_rule_files_and_the_demo_model(dist):
    names = wheel_names(dist)
    assert checkout_files("surgery", "*.py") <= names
    assert {f"surgery/rules/{p.name}" for p in (ROOT / "rules").glob("*.yaml")} <= names
    assert {f"surgery/{p}" for p in ("demo_model/config.json", "demo_model/model.safetensors.index.json",
                                     "compat/configs/method/mixtral_moe_upscaling.yaml")} <= names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "rules/", "docs/"))]


def test_wheel_metadata_names_the_distribution_version_and_command(dist):
    with zipfile.ZipFile(artefact(dist, "*.whl")) as wheel:
        info = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        fields = Parser().parsestr(wheel.read(info).decode())
        entry_points = wheel.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert fields["Name"] == DISTRIBUTION and fields["Version"] == surgery.__version__
    core = [r for r in fields.get_all("Requires-Dist") if "extra ==" not in r]
    assert not [r for r in core if r.split()[0].lower().startswith(("torch", "transformers"))], core
    assert "surgery = surgery.cli:main" in entry_points


def test_sdist_holds_the_tests_rules_and_docs(dist):
    names = sdist_names(dist)
    wanted = {*checkout_files("tests", "*.py"), *checkout_files("rules", "*.yaml"), *checkout_files("docs", "*.md"),
              "benchmarks/synthetic.py", "pyproject.toml", "README.md", "CHANGELOG.md", "mkdocs.yml", ".ci/run"}
    assert not wanted - names, sorted(wanted - names)
    assert not [n for n in names if "__pycache__" in n or n.startswith("benchmarks/results/tmp")]


def test_version_shows_the_libraries_it_runs_on():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"surgery {surgery.__version__} (")
    for name in VERSION_OF:
        assert f"{name} {metadata.version(name)}" in result.stdout


@pytest.mark.skipif(not os.environ.get("CI"), reason="installs the wheel's dependencies from the package index "
                                                     "into a fresh venv; runs in CI (set CI=1 to run it here)")
def test_wheel_alone_in_a_fresh_venv(dist, tmp_path):
    """No checkout on the path: the installed wheel finds its rule files and demo model, and needs no torch."""
    venv, work = tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          str(artefact(dist, "*.whl"))], capture_output=True, text=True, env=env, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]

    def surgery_cli(*args: str) -> str:
        done = subprocess.run([str(venv / "bin" / "surgery"), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert surgery_cli("--version").startswith(f"surgery {surgery.__version__} (numpy ")
    assert [row.split()[0] for row in surgery_cli("rules").splitlines()] == sorted(
        p.stem for p in (ROOT / "rules").glob("*.yaml"))
    for _ in range(2):  # the quickstart runs twice
        assert "verified: 41 tensors" in surgery_cli("demo")
    probe = ("import importlib.util, surgery, surgery.rules; "
             "print(surgery.__file__); print(surgery.rules.find_rules('mistral-to-mixtral')); "
             "print(importlib.util.find_spec('torch'))")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=work, env=env, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where[:2]), where
    assert where[2] == "None", "the core install must not pull torch"


def test_shell_completion_as_the_readme_shows_it():
    assert 'eval "$(_SURGERY_COMPLETE=bash_source surgery)"' in (ROOT / "README.md").read_text()
    env = {**os.environ, "_SURGERY_COMPLETE": "bash_complete", "COMP_WORDS": "surgery plan --js", "COMP_CWORD": "2"}
    done = subprocess.run([sys.executable, "-c", "from surgery.cli import main; main(prog_name='surgery')"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "plain,--json" in done.stdout.splitlines(), done.stdout + done.stderr


def test_every_command_has_a_docs_page_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for name in main.commands:
        page = f"commands/{name}.md"
        assert (ROOT / "docs" / page).is_file(), f"docs/{page} is missing"
        assert page in nav, f"mkdocs.yml's nav does not list {page}"
