"""Remove from a function's built folder what serving never loads, then compile what it keeps.

``functions/Makefile`` runs it on every function's folder after pip has installed its wheels: ``python
slim_package.py FOLDER``. What goes, and why (the bench, bench/bench_package.py, prints each package's size and the
cold start before and after):

- the packages the Lambda runtime already has (boto3's botocore and its dependencies), which pip installs again
  for Powertools' tracer: the runtime's boto3 must run on the runtime's botocore, not a second copy;
- test folders, type stubs, C headers and Cython sources, console scripts and pip's install records;
- LiteRT's accelerators and compilers for GPUs and NPUs, and its command-line tools (Lambda has neither);
- Pillow's AVIF, WebP, font and Tk extensions (uploads are JPEG, PNG or DICOM; overlays draw no text), and every
  vendored library no kept extension links to;
- pydicom's test files (its data manager's examples); its decoders stay, with pylibjpeg-libjpeg: the clinical
  DICOM syntaxes (tests/test_dicom_syntaxes.py) need both;
- debug information in shared libraries that ship with it (only with ``strip``; their symbols stay).

What stays is compiled to ``.pyc`` files beside nothing else: Lambda's code folder is read-only, so without them
every cold start compiles every module it imports.
"""

from __future__ import annotations

import compileall
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

RUNTIME_PROVIDED = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six")
"""Import names of what the python3.12 runtime ships with boto3; their dist-info folders go with them."""
RUNTIME_DISTRIBUTIONS = ("boto3", "botocore", "s3transfer", "jmespath", "python_dateutil", "urllib3", "six")
UNUSED_FOLDERS = (
    "bin",
    "wrapt-stubs",
    "numpy/f2py",
    "numpy/_pyinstaller",
    "numpy/_core/include",
    "numpy/random/_examples",
    "numpy/doc",
    "ai_edge_litert/tools",
    "ai_edge_litert/vendors",
    "ai_edge_litert/aot",
    "pydicom/data/test_files",
)
"""Folders serving never imports, relative to the function's folder."""
UNUSED_FILES = (
    "ai_edge_litert/libLiteRtWebGpuAccelerator.so",
    "PIL/_avif.*.so",
    "PIL/_webp.*.so",
    "PIL/_imagingft.*.so",
    "PIL/_imagingtk.*.so",
    "numpy/conftest.py",
)
"""Globs of files serving never loads: Pillow's plugins for these formats import their extension in a ``try``."""
DEVELOPMENT_SUFFIXES = (".pyi", ".pyx", ".pxd", ".pxi", ".h", ".c", ".cpp", ".hpp")
LAMBDA_PYTHON = (3, 12)
"""The runtime's Python (template.yaml's python3.12): ``.pyc`` files are only valid for their own minor version."""
INSTALL_RECORDS = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")
"""dist-info files only pip reads; METADATA (importlib.metadata's versions) and the licences stay."""


def slim(folder: Path) -> int:
    """Remove what serving never loads from ``folder``; returns the bytes removed."""
    before = _size(folder)
    for name in RUNTIME_PROVIDED:
        _remove(folder / name)
        _remove(folder / f"{name}.py")
    for distribution in RUNTIME_DISTRIBUTIONS:
        for info in folder.glob(f"{distribution}-*.dist-info"):
            _remove(info)
    for relative in UNUSED_FOLDERS:
        _remove(folder / relative)
    for pattern in UNUSED_FILES:
        for path in folder.glob(pattern):
            _remove(path)
    for path in list(folder.rglob("*")):
        if path.is_dir() and path.name == "tests" and path.parent != folder:
            _remove(path)
        elif path.is_file() and _is_development_file(path):
            path.unlink()
    _remove_unlinked_libraries(folder)
    _strip_debug_information(folder)
    return before - _size(folder)


def _is_development_file(path: Path) -> bool:
    """A stub, header, Cython source, type marker or pip install record: nothing a running function reads."""
    if path.parent.name.endswith(".dist-info"):
        return path.name in INSTALL_RECORDS
    return path.suffix in DEVELOPMENT_SUFFIXES or path.name == "py.typed"


def compile_modules(folder: Path) -> bool:
    """Compile every module to ``__pycache__`` when this is Lambda's Python (3.12); returns whether it did. The
    ``.pyc`` files are unchecked-hash ones, used without comparing modification times, which a zip may not keep."""
    if sys.version_info[:2] != LAMBDA_PYTHON:
        print(
            f"slim_package: Python {sys.version_info[0]}.{sys.version_info[1]} is not Lambda's "
            f"{LAMBDA_PYTHON[0]}.{LAMBDA_PYTHON[1]}; no .pyc files (set LAMBDA_PYTHON for functions/Makefile)",
            file=sys.stderr,
        )
        return False
    return compileall.compile_dir(
        folder,
        quiet=2,
        workers=1,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )


def lambda_python() -> str | None:
    """A Python of Lambda's version: ``LAMBDA_PYTHON``, ``python3.12`` on the path, or a pyenv one; None if none
    runs."""
    candidates = [os.environ.get("LAMBDA_PYTHON"), shutil.which(f"python{LAMBDA_PYTHON[0]}.{LAMBDA_PYTHON[1]}")]
    versions = Path.home() / ".pyenv" / "versions"
    pattern = f"{LAMBDA_PYTHON[0]}.{LAMBDA_PYTHON[1]}*/bin/python{LAMBDA_PYTHON[0]}.{LAMBDA_PYTHON[1]}"
    candidates += sorted(str(path) for path in versions.glob(pattern))
    for candidate in candidates:
        if candidate is None:
            continue
        probe = subprocess.run(
            [candidate, "-c", f"import sys; print(sys.version_info[:2] == {LAMBDA_PYTHON})"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


def _remove_unlinked_libraries(folder: Path) -> None:
    """Delete auditwheel's vendored libraries (``*.libs`` folders) that no remaining shared object names as a
    dependency, directly or through another kept library."""
    vendored = {path.name: path for libs in folder.glob("*.libs") for path in libs.iterdir() if path.is_file()}
    needed: set[str] = set()
    pending = [path for path in folder.rglob("*.so*") if path.is_file() and path.name not in vendored]
    while pending:
        data = pending.pop().read_bytes()
        for name, path in vendored.items():
            if name not in needed and name.encode() in data:
                needed.add(name)
                pending.append(path)
    for name, path in vendored.items():
        if name not in needed:
            path.unlink()


def _strip_debug_information(folder: Path) -> None:
    """Remove DWARF sections from Python extension modules that ship them (symbols stay); nothing without
    ``strip``. Auditwheel's vendored libraries are left alone: strip breaks the ones patchelf rewrote (numpy's
    libgfortran no longer loads)."""
    strip = shutil.which("strip")
    if strip is None:
        print("slim_package: no strip on PATH; debug information kept", file=sys.stderr)
        return
    for path in folder.rglob("*.cpython-*.so"):
        if not path.parent.name.endswith(".libs") and b".debug_info" in path.read_bytes():
            subprocess.run([strip, "--strip-debug", str(path)], check=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(arguments: list[str]) -> int:
    if len(arguments) != 1 or not Path(arguments[0]).is_dir():
        print("usage: python slim_package.py FUNCTION_FOLDER", file=sys.stderr)
        return 2
    folder = Path(arguments[0])
    removed = slim(folder)
    compile_modules(folder)
    print(f"slim_package: {removed / 2**20:.1f} MB removed from {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
