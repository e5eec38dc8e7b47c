"""The container testbed's images, built with no image registry.

How it works. Two images, each cached by its tag:

- ``edgeagent-base:bookworm``: ``debootstrap --variant=minbase bookworm`` from a Debian mirror
  with python3, python3-venv, iproute2, nftables, ca-certificates and mosquitto (the optional
  "cloud" broker), stripped of docs, man pages, locales and apt caches, tarred and ``docker
  import``-ed. Made once: present -> skipped; the tarball is kept in the cache dir, so after
  ``down --images`` it is imported again without debootstrap.
- ``edgeagent-node:<version>``: ``testbed/containers/Dockerfile`` FROM that base; the build
  context holds wheels of edgeagent and all its dependencies built on the host (``pip wheel``),
  installed with ``pip install --no-index --find-links``, so the build needs no network. The
  image carries a label with a hash of the sources that go into the wheel (and of the
  Dockerfile and entrypoint); a tagged image whose label matches is reused, any change to the
  agent's code rebuilds it (and removes the image it replaces).

Cache dir: ``$EDGEAGENT_CONTAINERS_CACHE`` or ``/var/tmp/edgeagent-containers`` (rootfs,
tarball, wheels). Everything here runs docker and debootstrap as subprocesses; a failure is an
:class:`ImageError` with one line for a person.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BASE_TAG = "edgeagent-base:bookworm"
NODE_REPO = "edgeagent-node"
SOURCE_LABEL = "org.edgeagent.source"
STAGE_LABEL = "org.edgeagent.stage"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "iproute2", "nftables", "ca-certificates", "mosquitto")
CACHE_ENV = "EDGEAGENT_CONTAINERS_CACHE"
DEFAULT_CACHE = Path("/var/tmp/edgeagent-containers")
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
# What goes into the wheel (pyproject.toml's packages), hashed to know when to rebuild.
SOURCE_DIRS = ("edgeagent", "gossip", "overlay", "firmware_profiles")
SOURCE_SUFFIXES = (".py", ".toml", ".service", ".json")
# Stripped from the rootfs before import: nothing at run time reads them.
STRIP = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info",
         "var/cache/apt/archives", "var/lib/apt/lists")
TIMEOUT_S = 1800  # one debootstrap or docker build, generously


class ImageError(Exception):
    """Building or finding an image failed; the message is one line for a person."""


@dataclass(frozen=True, slots=True)
class BuildResult:
    """What :func:`ensure_images` did: the node tag, its size, and what was (re)built."""

    tag: str
    size_bytes: int
    built_base: bool
    built_node: bool


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def version(root: Path = REPO_ROOT) -> str:
    """edgeagent's version from pyproject.toml (the node image's tag)."""
    return str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"])


def node_tag(root: Path = REPO_ROOT) -> str:
    return f"{NODE_REPO}:{version(root)}"


def docker_available() -> str | None:
    """None when the docker daemon answers, else the reason it cannot be used."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if proc.returncode != 0:
        return f"docker daemon unavailable: {last_line(proc.stderr) or 'docker info failed'}"
    return None


def source_hash(root: Path = REPO_ROOT) -> str:
    """SHA-256 (first 16 hex digits) over the files that make the node image."""
    digest = hashlib.sha256()
    files = [root / "pyproject.toml", HERE / "Dockerfile", HERE / "entrypoint.sh"]
    for top in SOURCE_DIRS:
        files += sorted(p for p in (root / top).rglob("*")
                        if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(root) if path.is_relative_to(root) else path.name).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def image_id(tag: str) -> str | None:
    """The image's id, None if no image has this tag."""
    proc = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", tag],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_label(tag: str, label: str) -> str | None:
    proc = subprocess.run(
        ["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{label}"}}}}', tag],
        capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_size(tag: str) -> int:
    proc = _run(["docker", "image", "inspect", "--format", "{{.Size}}", tag], what="docker image inspect")
    return int(proc.strip())


def ensure_images(*, root: Path = REPO_ROOT, log: Callable[[str], None] = print,
                  force: bool = False) -> BuildResult:
    """Make sure the base and node images exist and the node image matches the sources."""
    reason = docker_available()
    if reason is not None:
        raise ImageError(reason)
    with _build_lock():
        return _ensure_images(root, log, force)


def _ensure_images(root: Path, log: Callable[[str], None], force: bool) -> BuildResult:
    built_base = ensure_base(log=log)
    tag = node_tag(root)
    wanted = source_hash(root)
    built_node = False
    if force or image_label(tag, SOURCE_LABEL) != wanted:
        build_node(tag, wanted, root=root, log=log)
        built_node = True
    else:
        log(f"{tag}: up to date (sources {wanted})")
    return BuildResult(tag, image_size(tag), built_base, built_node)


def ensure_base(*, log: Callable[[str], None] = print) -> bool:
    """Import the base image unless its tag exists; True if it was imported now."""
    if image_id(BASE_TAG) is not None:
        log(f"{BASE_TAG}: cached")
        return False
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"base-{SUITE}.tar"
    if not tarball.is_file():
        rootfs = cache / "rootfs"
        if not (rootfs / "usr" / "bin" / "python3").exists():
            _debootstrap(cache, log)
        _strip(rootfs)
        log(f"packing {rootfs} into {tarball}")
        partial = tarball.with_suffix(".tar.partial")
        _run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], what="tar")
        partial.replace(tarball)
        shutil.rmtree(rootfs)
    log(f"docker import {tarball} {BASE_TAG}")
    _run(["docker", "import", "--change", 'CMD ["/bin/bash"]',
          "--message", f"debootstrap --variant=minbase {SUITE} + {','.join(BASE_PACKAGES)}",
          str(tarball), BASE_TAG], what="docker import")
    return True


def build_node(tag: str, source: str, *, root: Path = REPO_ROOT,
               log: Callable[[str], None] = print) -> None:
    """Build wheels on the host, then the node image from them (no network in the build)."""
    cache = cache_dir()
    wheels = cache / "wheels"
    context = cache / "context"
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("edgeagent-*.whl"):
        old.unlink()  # always this checkout's edgeagent, never a stale one
    log(f"pip wheel {root} -w {wheels}")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--find-links", str(wheels),
          "-w", str(wheels), str(root)], what="pip wheel")
    if context.exists():
        shutil.rmtree(context)
    context.mkdir()
    shutil.copytree(wheels, context / "wheels")
    shutil.copy2(HERE / "Dockerfile", context / "Dockerfile")
    shutil.copy2(HERE / "entrypoint.sh", context / "entrypoint.sh")
    previous = image_id(tag)
    log(f"docker build -t {tag} (sources {source})")
    _run(["docker", "build", "--quiet", "--build-arg", f"BASE={BASE_TAG}",
          "--build-arg", f"SOURCE_HASH={source}", "-t", tag, str(context)], what="docker build")
    shutil.rmtree(context)
    current = image_id(tag)
    if previous is not None and previous != current:
        # The image this build replaced is untagged now; remove it (fails harmlessly if in use).
        subprocess.run(["docker", "image", "rm", previous], capture_output=True)
    # The first stage's image (the wheels and a venv) is build cache nothing reuses.
    subprocess.run(["docker", "image", "prune", "-f", "--filter", f"label={STAGE_LABEL}"],
                   capture_output=True)


def remove_images(root: Path = REPO_ROOT) -> list[str]:
    """Remove the node and base images (the cached tarball stays); the tags removed."""
    removed = []
    for tag in (node_tag(root), BASE_TAG):
        if image_id(tag) is not None:
            _run(["docker", "image", "rm", tag], what="docker image rm")
            removed.append(tag)
    return removed


def has_mosquitto(tag: str) -> bool:
    """Whether the image can run the mosquitto broker."""
    proc = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "/bin/sh",
                           tag, "-c", "command -v mosquitto"], capture_output=True, text=True)
    return proc.returncode == 0


@contextmanager
def _build_lock() -> Iterator[None]:
    """One build at a time (tests and a scenario run may ask at once; they share the cache)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _debootstrap(cache: Path, log: Callable[[str], None]) -> None:
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap not found: apt-get install -y debootstrap")
    if os.geteuid() != 0:
        raise ImageError("debootstrap needs root")
    partial = cache / "rootfs.partial"
    if partial.exists():
        shutil.rmtree(partial)
    log(f"debootstrap --variant=minbase {SUITE} into {partial} (a few minutes, once)")
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
          SUITE, str(partial), MIRROR], what="debootstrap")
    partial.replace(cache / "rootfs")


def _strip(rootfs: Path) -> None:
    for rel in STRIP:
        target = rootfs / rel
        if not target.is_dir():
            continue
        for child in target.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            elif child.name != "lock":
                child.unlink()


def _run(argv: Sequence[str], *, what: str) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        raise ImageError(f"{what}: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what}: timed out after {TIMEOUT_S} s") from None
    if proc.returncode != 0:
        raise ImageError(f"{what} failed: {last_line(proc.stderr) or last_line(proc.stdout)}")
    return proc.stdout


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
