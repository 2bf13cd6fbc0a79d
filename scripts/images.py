#!/usr/bin/env python3
"""Build the project's container images with podman, without a container registry.

    scripts/images.py build     base, CPU runner and operator images (skipped when up to date)
    scripts/images.py cuda      the CUDA runner too (GBs of CUDA wheels; not part of make test)
    scripts/images.py list      the image references `build` gives, one a line
    scripts/images.py check     exit 0 if podman runs here and the images exist, else say why

No registry is reachable from the CI machines, so no base image can be pulled: the base is a
Debian root filesystem made with mmdebstrap (which reaches Debian's mirrors) and imported into
podman; runner/Dockerfile and operator/Dockerfile take it as their BASE build argument (users keep
the default, a public slim Python image).

Every image is tagged with a hash of what goes into it (its Dockerfile, build arguments, the
sources it copies, its base's hash); a tag that exists is not built again. The runner and operator
are also tagged with the names the chart uses by default (runner: `<appVersion>-cpu` for the CPU
build, which the end-to-end tests run; `<appVersion>` is the CUDA one the chart's GPU pods pull).

podman's own settings (runc, cgroupfs, no default ulimits: what works on these machines) and its
storage live under ~/.cache/consensusfit/podman, so nothing in /etc is touched; `podman_env()`
gives the environment that selects them, for the tests too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "consensusfit" / "podman"
REGISTRY = "ghcr.io/consensusfit"
RUNNER, OPERATOR, BASE = f"{REGISTRY}/consensusfit-runner", f"{REGISTRY}/consensusfit-operator", "localhost/consensusfit-base"
# Debian packages, each named as its command; runc because crun fails on these machines.
APT_PACKAGES = ("podman", "runc", "mmdebstrap")

# The base: Debian bookworm's Python (3.11, as the project's), its venv module and CA certificates.
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Documentation, man pages and translations: nothing in an image reads them.
BASE_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
# What the Dockerfiles copy (see their COPY lines and .dockerignore, which podman reads too).
SOURCES = ("pyproject.toml", "constraints.txt", "README.md", "runner", "operator")

CONTAINERS_CONF = """\
# Written by scripts/images.py: what podman needs on these machines (crun and the default
# RLIMIT_NOFILE fail here).
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def log(message: str) -> None:
    print(f"images.py: {message}", file=sys.stderr, flush=True)


def app_version() -> str:
    """The chart's appVersion: the default tag of both images."""
    text = (ROOT / "charts" / "consensusfit" / "Chart.yaml").read_text()
    return re.search(r'^appVersion:\s*"?([^"\s]+)"?', text, re.M).group(1)


def storage_conf(cache: Path) -> str:
    """Storage under the cache (root only: rootless podman keeps its own per-user storage)."""
    return f'[storage]\ndriver = "overlay"\ngraphroot = "{cache / "storage"}"\nrunroot = "/run/consensusfit-podman"\n'


def podman_env(cache: Path = CACHE) -> dict[str, str]:
    """The environment that points podman at the project's configuration (written if missing)."""
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    conf = cache / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    env["CONTAINERS_CONF"] = str(conf)
    if os.geteuid() == 0:
        storage = cache / "storage.conf"
        if not storage.exists() or storage.read_text() != storage_conf(cache):
            storage.write_text(storage_conf(cache))
        env["CONTAINERS_STORAGE_CONF"] = str(storage)
    return env


def podman(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    """podman with the project's configuration; a failure that was checked says podman's error."""
    result = subprocess.run(["podman", *args], env=podman_env(), text=True, capture_output=capture)
    if check and result.returncode != 0:
        raise SystemExit(f"images.py: podman {' '.join(args[:2])} failed ({result.returncode}): {result.stderr or ''}")
    return result


def missing_tools() -> list[str]:
    return [tool for tool in APT_PACKAGES if shutil.which(tool) is None]


def install_tools() -> str | None:
    """Install podman and mmdebstrap from Debian if missing; the reason if they cannot be."""
    missing = missing_tools()
    if not missing:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not installed, and installing needs root and apt-get"
    log(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env)
        if subprocess.run(install, env=env).returncode != 0:
            return f"apt-get could not install {' '.join(missing)}"
    return None


def source_files(paths: tuple[str, ...] = SOURCES) -> list[Path]:
    """The files under `paths` that a build copies: git's view (tracked or not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *paths],
                            cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    return sorted(ROOT / name for name in set(listed) if name and (ROOT / name).is_file())


def digest(parts: list[str | bytes]) -> str:
    """A short hash of a build's inputs, in order (the image's cache tag)."""
    sha = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        sha.update(len(data).to_bytes(8, "big") + data)
    return sha.hexdigest()[:16]


def base_hash() -> str:
    return digest(["base", SUITE, *BASE_PACKAGES, *BASE_EXCLUDES])


def image_hash(dockerfile: Path, build_args: dict[str, str], files: list[Path]) -> str:
    """What decides an image's content: Dockerfile, build arguments (the base's own hash among
    them), and each copied file's path and bytes."""
    parts: list[str | bytes] = [dockerfile.read_bytes(), *(f"{k}={v}" for k, v in sorted(build_args.items()))]
    for path in files:
        parts += [str(path.relative_to(ROOT)), path.read_bytes()]
    return digest(parts)


# The CA bundle the host's pip trusts (an egress proxy's own CA on these machines), lent to the
# builds' pip; it is mounted, never copied, so the images do not keep it.
HOST_CA_VARIABLES = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
BUILD_CA = "/etc/ssl/certs/ca-certificates.crt"


def host_ca_mounts(cache: Path = CACHE) -> list[str]:
    """`podman build` volumes that make pip in the build trust what the host's pip trusts."""
    bundle = next((os.environ[name] for name in HOST_CA_VARIABLES if os.path.isfile(os.environ.get(name, ""))), None)
    if bundle is None:
        return []
    conf = cache / "pip.conf"
    conf.write_text(f"[global]\ncert = {BUILD_CA}\n")
    return ["-v", f"{bundle}:{BUILD_CA}:ro", "-v", f"{conf}:/etc/pip.conf:ro"]


def exists(reference: str) -> bool:
    return podman("image", "exists", reference, check=False).returncode == 0


def build_base() -> str:
    """The Debian root filesystem as an image, made once per hash."""
    reference = f"{BASE}:{base_hash()}"
    if exists(reference):
        return reference
    log(f"{reference}: mmdebstrap {SUITE} ({', '.join(BASE_PACKAGES)}), about two minutes")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="consensusfit-base-") as work:
        tarball = Path(work) / "rootfs.tar"
        subprocess.run(["mmdebstrap", "--variant=minbase", "--quiet", f"--include={','.join(BASE_PACKAGES)}",
                        *(f"--dpkgopt=path-exclude={pattern}" for pattern in BASE_EXCLUDES),
                        "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*",
                        SUITE, str(tarball)], check=True)
        podman("import", "--change", 'CMD ["/bin/bash"]', str(tarball), reference)
    log(f"{reference}: built in {time.monotonic() - started:.0f} s")
    return reference


def build(dockerfile: Path, name: str, tags: list[str], build_args: dict[str, str]) -> str:
    """podman build of one Dockerfile unless its hash tag exists; then the other tags."""
    reference = f"{name}:src-{image_hash(dockerfile, build_args, source_files())}"
    if exists(reference):
        log(f"{reference}: up to date")
    else:
        log(f"{reference}: building {dockerfile.relative_to(ROOT)}")
        started = time.monotonic()
        args = [arg for key, value in build_args.items() for arg in ("--build-arg", f"{key}={value}")]
        # Host network: pip reaches PyPI the way the host does (no CNI network needed).
        podman("build", "--network=host", "--pull=never", *host_ca_mounts(), "-f", str(dockerfile), *args,
               "-t", reference,
               str(ROOT), capture=False)
        log(f"{reference}: built in {time.monotonic() - started:.0f} s, {size_mb(reference):.0f} MB")
    for tag in tags:
        podman("tag", reference, f"{name}:{tag}")
    return reference


def size_mb(reference: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", reference).stdout.strip()) / 1e6


def cpu_tag() -> str:
    """The CPU runner's tag; the chart's default (`appVersion`) is the CUDA runner's."""
    return f"{app_version()}-cpu"


def runner_cpu_reference() -> str:
    return f"{RUNNER}:{cpu_tag()}"


def operator_reference() -> str:
    return f"{OPERATOR}:{app_version()}"


def references(cuda: bool = False) -> list[str]:
    """The names the chart and the tests use for what `build` (and `cuda`) make."""
    return [runner_cpu_reference(), operator_reference()] + ([f"{RUNNER}:{app_version()}"] if cuda else [])


def build_all(cuda: bool = False) -> None:
    version = app_version()
    base = build_base()
    base_arg = {"BASE": base}
    build(ROOT / "runner" / "Dockerfile", RUNNER, [cpu_tag()], {**base_arg, "JAX_EXTRA": "cpu"})
    build(ROOT / "operator" / "Dockerfile", OPERATOR, [version], base_arg)
    if cuda:
        build(ROOT / "runner" / "Dockerfile", RUNNER, [version], {**base_arg, "JAX_EXTRA": "cuda12"})


def unavailable() -> str | None:
    """Why the images cannot be used here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (make images installs it as root with apt-get)"
    if podman("info", check=False).returncode != 0:
        return "podman does not run here"
    absent = [reference for reference in references() if not exists(reference)]
    return f"images not built ({', '.join(absent)}): run make images" if absent else None


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "build"
    if command == "list":
        print("\n".join(references()))
        return 0
    if command == "check":
        why = unavailable()
        print(why or "images ready")
        return 1 if why else 0
    if command not in ("build", "cuda"):
        print(__doc__, file=sys.stderr)
        return 2
    why = install_tools()
    if why:
        log(f"images not built: {why}; the image tests will be skipped")
        return 0
    build_all(cuda=command == "cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
