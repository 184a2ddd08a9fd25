"""What users install: the wheel, in fresh virtual environments that cannot see the source tree.

Every other test imports the checkout (``tests/conftest.py`` puts it on ``sys.path``, ``make`` installs it editable),
so a module the wheel leaves out would pass them all and fail every user with a non-editable install. Here:
1. the wheel is built from a copy of only what the build reads (``pyproject.toml``, ``README.md``, the three
   packages): no stale ``build/`` directory of the checkout can add or hide a module;
2. its listing must equal the source tree's modules (``*.py`` of prep/, shards/, train/), plus each ``py.typed``;
3. a fresh venv gets ``wheel[prep]`` (docs/cluster.md's prep-node command): torch absent, ``prep --help``,
   ``prep imagenet`` on the sample photos, ``prep stats``, ``prep verify``;
4. the same venv then gets ``wheel[train]`` (the GPU-node command): ``python -m train --help``, three tiny CPU steps
   on those shards, ``train.eval --help``, ``train.export --help``.
One venv for both halves keeps the test to about 1.5 minutes (torch is 5.5 GB to unpack); the [prep] half runs
first, before torch is there. Every command runs from a directory outside the checkout with no PYTHONPATH, and
checks that the packages it imports are the venv's.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("prep", "shards", "train")

pytestmark = pytest.mark.slow


def source_modules() -> set[str]:
    """Every module file of the three packages in the checkout, as wheel paths (``shards/storage/s3.py``)."""
    found = set()
    for pkg in PACKAGES:
        for path in glob.glob(os.path.join(ROOT, pkg, "**", "*.py"), recursive=True):
            found.add(os.path.relpath(path, ROOT).replace(os.sep, "/"))
    return found


def build_wheel(tmp: str) -> str:
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(ROOT, pkg), os.path.join(src, pkg), ignore=shutil.ignore_patterns("__pycache__"))
    out = os.path.join(tmp, "dist")
    # no build isolation: the test venv's setuptools builds it, nothing is fetched for the build itself
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp)
    (wheel,) = glob.glob(os.path.join(out, "*.whl"))
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    return build_wheel(str(tmp_path_factory.mktemp("wheel")))


def test_wheel_holds_every_module(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if n.split("/")[0] in PACKAGES}
    modules = {n for n in names if n.endswith(".py")}
    expected = source_modules()
    assert "shards/storage/s3.py" in expected  # the subpackage a hand-kept list once left out
    assert modules == expected, (
        f"missing from the wheel: {sorted(expected - modules)}; extra: {sorted(modules - expected)}"
    )
    assert {f"{p}/py.typed" for p in PACKAGES} <= names
    assert not {n for n in names if "__pycache__" in n or n.endswith(".pyc")}


class Venv:
    """A fresh virtual environment; commands run in ``cwd`` (outside the checkout) with no PYTHONPATH."""

    def __init__(self, path: str, cwd: str):
        self.path, self.cwd = path, cwd
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
        self.bin = os.path.join(path, "bin")
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        self.env["PATH"] = self.bin + os.pathsep + self.env.get("PATH", "")

    def run(self, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    def pip_install(self, requirement: str) -> None:
        self.run(os.path.join(self.bin, "pip"), "install", "-q", "--disable-pip-version-check", requirement)

    def python(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run(os.path.join(self.bin, "python"), *args, timeout=timeout)


def test_installed_wheel_runs_prep_then_train(wheel, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    photos = str(work / "imagenet")
    shutil.copytree(os.path.join(ROOT, "data", "sample", "imagenet"), photos)
    venv = Venv(str(tmp_path / "venv"), str(work))

    # --- a CPU prep node: pip install 'univip-shards[prep]'
    venv.pip_install(f"{wheel}[prep]")
    where = venv.python("-c", "import prep, shards.storage, shards; print(prep.__file__); print(shards.__file__)")
    for line in where.stdout.split():
        assert line.startswith(venv.path), f"imported from outside the venv: {line}"
    missing = subprocess.run(
        [os.path.join(venv.bin, "python"), "-c", "import torch"], cwd=venv.cwd, env=venv.env, capture_output=True
    )
    assert missing.returncode != 0, "the [prep] extra must not bring torch"
    assert "imagenet" in venv.run("prep", "--help").stdout
    out = str(work / "shards")
    venv.run("prep", "imagenet", photos, "--out", out, "--shard-size", "4", "--workers", "2", "--no-progress")
    accounting = json.loads(venv.run("prep", "stats", out, "--json").stdout)["accounting"]
    assert accounting["ok"] == 7 and accounting["failed"] == 0 and accounting["adds_up"], accounting
    venv.run("prep", "verify", out)

    # --- a GPU node: pip install 'univip-shards[train]' (here into the same venv, on top of [prep])
    venv.pip_install(f"{wheel}[train]")
    assert "--preset" in venv.python("-m", "train", "--help").stdout
    run = str(work / "run")
    venv.python("-m", "train", "--preset", "tiny", "--data", out, "--out", run, "--max-steps", "3", "--batch-size", "4")
    assert os.path.exists(os.path.join(run, "ckpt-00000003.pt")), os.listdir(run)
    with open(os.path.join(run, "log.jsonl")) as f:
        assert sum(1 for line in f if line.strip()) >= 3
    assert "--random-init" in venv.python("-m", "train.eval", "--help").stdout
    assert "--format" in venv.python("-m", "train.export", "--help").stdout
