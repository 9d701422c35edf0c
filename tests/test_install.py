"""Installing scalegrow into an environment that already holds torch, megatron-core and DeepSpeed
keeps them (issue 24): pyproject asks for ranges, and pip's default upgrade strategy keeps an
installed release that satisfies one. Asked of the real pip and the real registry, in this venv, with
`--dry-run --report`, which resolves exactly as an install would and changes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
KEPT = ("torch", "megatron-core", "deepspeed")


def pip_report(tmp_path: Path, *args: str) -> dict:
    """pip's installation report for `pip install ARGS`, with no constraint or config file (a user's
    plain install)."""
    report = tmp_path / "report.json"
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_CONSTRAINT", None)
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                          "--report", str(report), *args],
                         capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0 and "Could not fetch" in run.stderr + run.stdout:
        pytest.skip(f"the package registry cannot be reached: {run.stderr.strip()[-200:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(report.read_text())


def newest_admitted(name: str) -> Version | None:
    """The newest release of NAME pyproject's range admits, as the registry lists them."""
    spec = next(Requirement(r).specifier for r in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                if Requirement(r).name == name)
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    listed = [line for line in out.stdout.splitlines() if line.startswith("Available versions:")]
    if not listed:
        return None
    versions = [Version(v.strip()) for v in listed[0].split(":", 1)[1].split(",")]
    return max((v for v in versions if v in spec), default=None)


@pytest.mark.slow
def test_installing_into_an_environment_keeps_its_torch_megatron_and_deepspeed(tmp_path):
    before = {name: metadata.version(name) for name in KEPT}
    report = pip_report(tmp_path, "--upgrade", f"{ROOT}[test]", "--upgrade-strategy", "only-if-needed")
    touched = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in report["install"]}
    assert "scalegrow" in touched
    assert not set(KEPT) & set(touched), f"pip would replace {set(KEPT) & set(touched)}: {touched}"
    assert {name: metadata.version(name) for name in KEPT} == before


@pytest.mark.slow
def test_the_kept_torch_is_not_the_newest_the_range_admits_on_the_oldest_stack():
    """So the test above is not trivial where it runs on the oldest stack: the registry offers a
    newer torch within the range, and pip still keeps the installed one."""
    installed = Version(metadata.version("torch")).release
    newest = newest_admitted("torch")
    if newest is None:
        pytest.skip("the package registry cannot be reached to list torch's releases")
    if sys.version_info >= (3, 12):
        assert newest.release >= installed
    else:
        assert newest.release > installed, (newest, installed)
