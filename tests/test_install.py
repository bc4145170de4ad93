"""The package stands alone (#34): `pip install` of a copy of the repository into a fresh venv, then, from
another folder, `satkit` imports and a Captioner captions a photo, with no root module on the path; and
pyproject.toml names the packages requirements.txt pins.

The venv sees this interpreter's site-packages through a .pth line (torch and the rest are not installed
again, and nothing is downloaded), and pip installs with --no-deps --no-build-isolation --no-index: the
test proves the build and the import, not the package index. A .pth line adds a folder without running
the .pth files in it, so the checkout's own editable install (`make` runs `pip install -e .`) stays out.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from test_caption import make_checkpoint, shapes_image

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.install

# What this folder's copy of the library is allowed to be found as, in the fresh venv: installed, nowhere else.
CAPTION_FROM_ELSEWHERE = """
import json, sys
from pathlib import Path

import satkit
from satkit import Captioner

checkpoint, photo = sys.argv[1:3]
captions = Captioner.from_checkpoint(checkpoint)(photo, beam_size=2, max_len=5)
roots = [name for name in ("train", "eval", "caption", "create_input_files", "hubconf", "models", "datasets",
                           "utils", "tools") if __import__("importlib").util.find_spec(name) is not None]
print(json.dumps({"satkit": satkit.__file__, "caption": captions[0].best.text, "roots": roots}))
"""


def repository_files() -> list[str]:
    """What a clone holds: tracked files and untracked ones git does not ignore (the working tree under test)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: the copy to install is the files git lists")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    return [name for name in listed if name and (ROOT / name).is_file()]


def fresh_venv(where: Path) -> Path:
    """A venv with no packages of its own that sees this interpreter's site-packages; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=60)
    python = where / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_pip_install_of_a_copy_captions_from_another_folder(tmp_path):
    """`pip install` of a copy, then from another folder: satkit imports from the venv, not from the checkout
    or the copy; no root module (train, models, hubconf, ...) can be imported; every non-.py file of satkit/
    (package data such as satkit/serve_page.html) is installed; a Captioner captions a photo."""
    copy = tmp_path / "clone"
    for name in repository_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    python = fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | {"OMP_NUM_THREADS": "1"}
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                "--no-index", str(copy)], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=120)
    assert installed.returncode == 0, installed.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checkpoint = make_checkpoint(elsewhere / "tiny.pt")
    shapes_image(seed=1).save(elsewhere / "photo.png")
    ran = subprocess.run([str(python), "-c", CAPTION_FROM_ELSEWHERE, "tiny.pt", "photo.png"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = __import__("json").loads(ran.stdout.strip().splitlines()[-1])
    package = Path(result["satkit"]).parent
    assert package.is_relative_to(tmp_path / "venv"), f"satkit imported from {package}, not the venv"
    assert result["roots"] == [], f"root modules importable from another folder: {result['roots']}"
    assert len(result["caption"].split()) == 5  # make_checkpoint bans <end>: max_len words

    data = {p.relative_to(copy / "satkit") for p in (copy / "satkit").rglob("*")
            if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts and "egg-info" not in str(p)}
    missing = sorted(str(p) for p in data if not (package / p).is_file())
    assert not missing, f"non-.py files of satkit/ not installed (pyproject.toml's package-data): {missing}"


def requirement_names(lines: list[str]) -> set[str]:
    """Normalised distribution names (PEP 503) of requirement lines, comments and markers dropped."""
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", line).group()).lower())
    return names


def test_pyproject_and_requirements_name_the_same_packages():
    """requirements.txt pins what `make` installs; pyproject.toml is what `pip install .` installs: the same
    packages, the test tools in the `test` extra, and the torch / torchvision pins within pyproject's bounds."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    declared = requirement_names(project["dependencies"]) | requirement_names(project["optional-dependencies"]["test"])
    assert requirement_names(requirements) == declared
    pins = dict(re.match(r"([a-z]+)==(\S+)", line).groups() for line in requirements if line.startswith("torch"))
    assert pins == {"torch": "2.14.1", "torchvision": "0.29.1"}
    for name, version in pins.items():
        assert f"{name}>={version}" in project["dependencies"]
