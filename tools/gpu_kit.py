#!/usr/bin/env python
"""The Python wheels a GPU machine without a package registry needs to run tools/gpu_report.sh.

    python tools/gpu_kit.py lock        # here (PyPI): resolve the closure again, into tools/gpu_kit.lock
    python tools/gpu_kit.py wheels      # here: the locked wheels for CPython 3.12 on x86_64, into .whl/
    python tools/gpu_kit.py check       # here: install .whl/ with --no-index into a fresh Python 3.12 venv
    python3 tools/gpu_kit.py install    # there: pip install --no-index --find-links .whl, into its python

The lent GPU machine runs Python 3.12 with its own CUDA torch and a stack of common packages
(the device tool's KINDS.md lists them), and reaches no registry. The kit is the dependency
closure of ``requirements()``, resolved by pip itself against what the machine is known to hold:
torch (a metadata-only stub wheel stands for it, so none of torch's CUDA wheels come along), the
packages whose versions a session read there (IMAGE_VERSIONS, pinned while resolving) and large
ones whose versions nobody has read (IMAGE_PROVIDED: the closure with them is 135 MB, over the
64 MiB one call may carry). Those are left out; the rest is pinned in tools/gpu_kit.lock, so the
kit CI checks is the kit a session carries. ``check`` installs it the way the machine will: a
fresh venv holding only the stub torch, IMAGE_VERSIONS and IMAGE_PROVIDED (the newest from PyPI:
their versions there are not known, so an older one there can still refuse the kit: `install`
then names it, and gpu_report.sh logs the machine's versions first).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / ".whl"
PYTHON_VERSION = "3.12"
TORCH_ON_THE_MACHINE = "2.11.0"
CARRY_LIMIT_MB = 56  # of a call's 64 MiB, leaving room for the working tree itself
LOCK = REPO / "tools" / "gpu_kit.lock"
# On the machine's image, at the versions a session's pip list there showed (device tool, KINDS.md).
IMAGE_VERSIONS = {"numpy": "2.5.2", "transformers": "5.17.0", "huggingface-hub": "1.33.0", "tokenizers": "0.23.2",
                  "safetensors": "0.8.0", "accelerate": "1.15.0"}
# On the machine's image too (KINDS.md, 'Python packages already there'), versions unread, and large.
IMAGE_PROVIDED = ("pyarrow", "pandas", "pillow", "grpcio", "tensorboard", "tensorboard-data-server")
# Source-only on PyPI (hydra-core's parser runtime): built into a wheel here.
SOURCE_ONLY = ["antlr4-python3-runtime==4.9.3"]
EXTRA_FOR_THE_RUN = ["pytest>=8", "trl>=1.0"]  # the smoke phase's tests, the benchmark's --vs-trl


def requirements() -> list[str]:
    """What the GPU run imports: pyproject's dependencies less torch, plus pytest and TRL."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dependencies = [d.split("#")[0].strip() for d in project["dependencies"]]
    return [d for d in dependencies if not d.startswith("torch")] + EXTRA_FOR_THE_RUN


def platform_flags() -> list[str]:
    """pip's --platform flags for x86_64 Linux (every manylinux a recent glibc accepts)."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64", "any"]
    return [flag for tag in tags for flag in ("--platform", tag)]


def stub_torch_wheel(folder: Path, version: str = TORCH_ON_THE_MACHINE) -> Path:
    """A wheel named torch with metadata only: it satisfies ``torch>=...`` requirements without
    bringing torch or its CUDA dependencies."""
    dist = f"torch-{version}.dist-info"
    files = {f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_kit\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"torch-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            data = text.encode()
            wheel.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        wheel.writestr(f"{dist}/RECORD", "\n".join(record + [f"{dist}/RECORD,,"]) + "\n")
    return path


def pip(python: str, *args: str) -> None:
    """Run pip, failing loudly."""
    print("+ pip", " ".join(args), flush=True)
    subprocess.run([python, "-m", "pip", *args], check=True)


def _name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def _on_the_machine(name: str) -> bool:
    return name == "torch" or name in IMAGE_VERSIONS or name in IMAGE_PROVIDED


def lock(path: Path = LOCK) -> int:
    """Resolve requirements() for the machine (its known versions pinned) into ``path``."""
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch)
        stub = stub_torch_wheel(local)
        pip(sys.executable, "wheel", "-q", "--no-deps", "-w", str(local), *SOURCE_ONLY)
        constraints = local / "image.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in IMAGE_VERSIONS.items()))
        report = local / "report.json"
        pip(sys.executable, "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report),
            "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp", *platform_flags(),
            "--target", str(local / "target"), "--find-links", str(local), "-c", str(constraints),
            f"torch @ {stub.as_uri()}", *requirements())
        resolved = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                    for item in json.loads(report.read_text())["install"]}
    pinned = sorted(f"{name}=={version}" for name, version in resolved.items() if not _on_the_machine(name))
    path.write_text("# tools/gpu_kit.py lock: the GPU kit's wheels (the closure less what the machine holds)\n"
                    + "\n".join(pinned) + "\n")
    print(f"{len(pinned)} packages locked in {path}")
    return 0


def build_wheels(kit: Path = KIT, path: Path = LOCK) -> int:
    """Fill ``kit`` with the wheels of the lock file for CPython 3.12 on x86_64."""
    if kit.exists():
        shutil.rmtree(kit)
    kit.mkdir()
    pinned = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    source_only = {s.split("==")[0] for s in SOURCE_ONLY}
    binary = [p for p in pinned if p.split("==")[0] not in source_only]
    pip(sys.executable, "wheel", "-q", "--no-deps", "-w", str(kit), *[p for p in pinned if p not in binary])
    pip(sys.executable, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
        "--implementation", "cp", *platform_flags(), "-d", str(kit), *binary)
    size = sum(w.stat().st_size for w in kit.glob("*.whl")) / 2**20
    print(f"{len(list(kit.glob('*.whl')))} wheels, {size:.1f} MiB in {kit} (left to the machine: torch, "
          f"{', '.join(sorted(IMAGE_VERSIONS) + list(IMAGE_PROVIDED))})")
    if size > CARRY_LIMIT_MB:
        print(f"error: the kit is {size:.1f} MiB, over the {CARRY_LIMIT_MB} MiB one call may carry", file=sys.stderr)
        return 1
    return 0


def find_python(version: str = PYTHON_VERSION) -> str | None:
    """An interpreter of ``version`` that runs: pyenv's, else one on PATH."""
    candidates = sorted(str(p) for p in (Path.home() / ".pyenv" / "versions").glob(f"{version}.*/bin/python"))
    candidates.append(shutil.which(f"python{version}") or "")
    for candidate in filter(None, candidates):
        done = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
        )
        if done.returncode == 0 and done.stdout.strip() == str(tuple(int(x) for x in version.split("."))):
            return candidate
    return None


def check(kit: Path = KIT, python: str | None = None) -> int:
    """Install the kit with --no-index into a fresh venv holding only what the machine brings."""
    python = python or find_python()
    if python is None:
        print(f"error: no Python {PYTHON_VERSION} found (pyenv or PATH); pass --python", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        venv = Path(scratch) / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        inner = str(venv / "bin" / "python")
        image = [f"{name}=={version}" for name, version in IMAGE_VERSIONS.items()] + list(IMAGE_PROVIDED)
        pip(inner, "install", "-q", str(stub_torch_wheel(Path(scratch))), *image)
        pip(inner, "install", "-q", "--no-index", "--find-links", str(kit), *requirements())
        pip(inner, "check")
    print(f"the kit in {kit} is complete: every requirement installed with --no-index")
    return 0


def install(kit: Path = KIT) -> int:
    """On the machine: what its python lacks of requirements(), from the kit, with --no-index. A
    requirement neither there nor in the kit fails here, named by pip."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-cache-dir", "--find-links",
                    str(kit), *requirements()], check=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["lock", "wheels", "check", "install", "requirements"])
    p.add_argument("--kit", type=Path, default=KIT, help="the wheel folder (default .whl/)")
    p.add_argument("--python", help=f"the Python {PYTHON_VERSION} for `check` (default: pyenv's or PATH's)")
    args = p.parse_args(argv)
    if args.command == "requirements":
        print("\n".join(requirements()))
        return 0
    if args.command == "lock":
        return lock()
    if args.command == "wheels":
        return build_wheels(args.kit)
    if args.command == "check":
        return check(args.kit, args.python)
    return install(args.kit)


if __name__ == "__main__":
    sys.exit(main())
