"""
The frameworks' sdists (their test suites), downloaded with pip and unpacked once.

pip prepares an sdist's metadata even for ``pip download``; ``--no-binary``
names only the package itself so its build requirements still come as wheels.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from importlib.metadata import version as installed_version
from pathlib import Path


def check_installed(name: str, version: str) -> None:
    """Refuse to run an sdist's tests against another installed version."""
    have = installed_version(name)
    if have != version:
        raise SystemExit(f"peer: the {name} suite is pinned to {version}, the venv has {have}:"
                         f" pip install '{name}=={version}'")


def unpacked(name: str, version: str, cache: Path) -> Path:
    """The directory of `name` `version`'s sdist under `cache`, fetched on first use."""
    stem = f"{name.lower()}-{version}"
    target = cache / stem
    done = target / ".peer-unpacked"
    if done.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"{stem}.tar.gz"
    if not archive.exists():
        print(f"peer: downloading the {name} {version} sdist", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", name, "--dest", str(cache), f"{name}=={version}"],
            check=True,
        )
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(cache, filter="data")
        else:  # pragma: no cover - Pythons before the extraction filters
            tar.extractall(cache)
    done.touch()
    return target
