#!/usr/bin/env python
"""The Python wheels a GPU machine without a package registry needs to run tools/gpu_report.sh.

    python tools/gpu_kit.py wheels      # here (PyPI): the closure of what the GPU run imports, into .whl/
    python tools/gpu_kit.py check       # here: install .whl/ with --no-index into a fresh Python 3.12 venv
    python3 tools/gpu_kit.py install    # there: pip install --no-index --find-links .whl, into its python

The lent GPU machine (see ../shared and DEVELOPERS.md) runs Python 3.12 with its own CUDA torch and
a stack of common packages, and reaches no registry. The kit is the full dependency closure of
``requirements()`` for CPython 3.12 on x86_64 Linux, resolved by pip itself, less torch (a stub
wheel stands for the machine's own while resolving, so none of torch's CUDA wheels come along) and
less IMAGE_PROVIDED: large packages the machine's image has, which would take the kit past what
one call may carry (64 MiB; the full closure is about 135 MB, pyarrow alone 54). ``check`` proves
the kit complete the way the machine will use it: a fresh venv holding only the stub torch and
IMAGE_PROVIDED (from PyPI, at the image's versions where they are known) installs every
requirement with --no-index and passes ``pip check``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
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
# On the machine's image (device tool, KINDS.md: 'Python packages already there'), and large.
# A version where the machine's pip list gave one, so that `check` installs what is there.
IMAGE_PROVIDED = {"pyarrow": None, "numpy": "2.5.2", "pandas": None, "pillow": None, "grpcio": None,
                  "tensorboard": None, "tensorboard-data-server": None}
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


def build_wheels(kit: Path = KIT) -> int:
    """Fill ``kit`` with the closure of requirements() for the machine, less torch and IMAGE_PROVIDED."""
    if kit.exists():
        shutil.rmtree(kit)
    kit.mkdir()
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch)
        stub = stub_torch_wheel(local)
        pip(sys.executable, "wheel", "-q", "--no-deps", "-w", str(local), *SOURCE_ONLY)
        pip(sys.executable, "download", "-q", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
            "--implementation", "cp", *platform_flags(), "--find-links", str(local), "-d", str(kit),
            f"torch @ {stub.as_uri()}", *requirements())
    dropped = [w for w in kit.glob("*.whl") if _name(w) == "torch" or _name(w) in IMAGE_PROVIDED]
    for wheel in dropped:
        wheel.unlink()
    size = sum(w.stat().st_size for w in kit.glob("*.whl")) / 2**20
    print(f"{len(list(kit.glob('*.whl')))} wheels, {size:.1f} MiB in {kit} (left to the machine: torch, "
          f"{', '.join(sorted(IMAGE_PROVIDED))})")
    if size > CARRY_LIMIT_MB:
        print(f"error: the kit is {size:.1f} MiB, over the {CARRY_LIMIT_MB} MiB one call may carry", file=sys.stderr)
        return 1
    return 0


def find_python(version: str = PYTHON_VERSION) -> str | None:
    """An interpreter of ``version`` that runs: pyenv's, else one on PATH."""
    candidates = sorted(str(p) for p in (Path.home() / ".pyenv" / "versions").glob(f"{version}.*/bin/python"))
    candidates.append(shutil.which(f"python{version}") or "")
    for candidate in filter(None, candidates):
        done = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
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
        image = [f"{name}=={version}" if version else name for name, version in IMAGE_PROVIDED.items()]
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
    p.add_argument("command", choices=["wheels", "check", "install", "requirements"])
    p.add_argument("--kit", type=Path, default=KIT, help="the wheel folder (default .whl/)")
    p.add_argument("--python", help=f"the Python {PYTHON_VERSION} for `check` (default: pyenv's or PATH's)")
    args = p.parse_args(argv)
    if args.command == "requirements":
        print("\n".join(requirements()))
        return 0
    if args.command == "wheels":
        return build_wheels(args.kit)
    if args.command == "check":
        return check(args.kit, args.python)
    return install(args.kit)


if __name__ == "__main__":
    sys.exit(main())
