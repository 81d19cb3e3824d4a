"""functions/slim_package.py removes from a built function what serving never loads, and keeps what it does."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import slim_package  # A build script beside the function folders (functions/ is on pytest's path).

EXTENSION = "cpython-312-x86_64-linux-gnu.so"


def _write(folder: Path, relative: str, content: bytes = b"x") -> Path:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def built(tmp_path: Path) -> Path:
    """A miniature of a function's folder after pip: runtime packages, tests, stubs, vendored libraries."""
    folder = tmp_path / "function"
    for relative in (
        "botocore/__init__.py",
        "botocore-1.44.18.dist-info/METADATA",
        "six.py",
        "numpy/__init__.py",
        "numpy/__init__.pyi",
        "numpy/_core/tests/test_numeric.py",
        "numpy/_core/include/numpy/ndarraytypes.h",
        "numpy/f2py/__init__.py",
        "numpy-2.4.6.dist-info/METADATA",
        "numpy-2.4.6.dist-info/RECORD",
        "numpy-2.4.6.dist-info/licenses/LICENSE.txt",
        "pylibjpeg/utils.pyx",
        "pydicom/data/test_files/CT_small.dcm",
        "pydicom/data/palettes/hotiron.dcm",
        "ai_edge_litert/libLiteRtWebGpuAccelerator.so",
        "ai_edge_litert/vendors/qualcomm/compiler/plugin.so",
        f"PIL/_webp.{EXTENSION}",
        "pillow.libs/libwebp-51b0b3f7.so.7.2.0",
        "pillow.libs/libsharpyuv-0066295b.so.0.1.2",
        "core/preprocessing.py",
        "scoring/handler.py",
        "tests/not_a_vendored_folder.py",
    ):
        _write(folder, relative)
    # _imaging links libjpeg, which links libzstd; libtiff is linked by nothing kept.
    _write(folder, f"PIL/_imaging.{EXTENSION}", b"\x7fELF ... libjpeg-6dc8d115.so.62.4.0 ...")
    _write(folder, "pillow.libs/libjpeg-6dc8d115.so.62.4.0", b"\x7fELF ... libzstd-40ad5e7e.so.1.5.7 ...")
    _write(folder, "pillow.libs/libzstd-40ad5e7e.so.1.5.7")
    _write(folder, "pillow.libs/libtiff-20b7e810.so.6.3.0")
    return folder


def test_what_serving_never_loads_is_removed(built: Path) -> None:
    """Runtime-provided packages, tests, stubs, headers, Cython sources, pip records, GPU/NPU plugins, the WebP
    extension and vendored libraries nothing kept links to are gone."""
    assert slim_package.slim(built) > 0
    for relative in (
        "botocore",
        "botocore-1.44.18.dist-info",
        "six.py",
        "numpy/__init__.pyi",
        "numpy/_core/tests",
        "numpy/_core/include",
        "numpy/f2py",
        "numpy-2.4.6.dist-info/RECORD",
        "pylibjpeg/utils.pyx",
        "pydicom/data/test_files",
        "ai_edge_litert/libLiteRtWebGpuAccelerator.so",
        "ai_edge_litert/vendors",
        f"PIL/_webp.{EXTENSION}",
        "pillow.libs/libwebp-51b0b3f7.so.7.2.0",
        "pillow.libs/libsharpyuv-0066295b.so.0.1.2",
        "pillow.libs/libtiff-20b7e810.so.6.3.0",
    ):
        assert not (built / relative).exists(), relative


def test_what_serving_loads_is_kept(built: Path) -> None:
    """The function's own packages, the modules and data serving reads, licences and METADATA, and each vendored
    library a kept extension links to, directly or through another, stay."""
    slim_package.slim(built)
    for relative in (
        "core/preprocessing.py",
        "scoring/handler.py",
        "tests/not_a_vendored_folder.py",
        "numpy/__init__.py",
        "numpy-2.4.6.dist-info/METADATA",
        "numpy-2.4.6.dist-info/licenses/LICENSE.txt",
        "pydicom/data/palettes/hotiron.dcm",
        f"PIL/_imaging.{EXTENSION}",
        "pillow.libs/libjpeg-6dc8d115.so.62.4.0",
        "pillow.libs/libzstd-40ad5e7e.so.1.5.7",
    ):
        assert (built / relative).exists(), relative


def test_modules_are_compiled_only_for_lambdas_python(built: Path) -> None:
    """``.pyc`` files are written by Lambda's Python (3.12) only: another version's would never be used."""
    lambda_python = sys.version_info[:2] == slim_package.LAMBDA_PYTHON
    assert slim_package.compile_modules(built) is lambda_python
    assert bool(list(built.rglob("*.pyc"))) is lambda_python


DECODE_CHILD = """
import hashlib, io, json, sys
function, repository = sys.argv[1:3]
sys.path.insert(0, function)
from pathlib import Path
from core.preprocessing import preprocess
from core.rejections import InvalidImageError
from scoring.classifier import Classifier
classifier = Classifier.from_directory(Path(repository) / "models" / "release")
verdicts = {}
for name in sys.argv[3:]:
    try:
        model_input = preprocess(Path(name).read_bytes(), classifier.input_size)
    except InvalidImageError as error:
        verdicts[name] = error.reason.value
        continue
    probability = classifier.predict(model_input.pixels[None])[0].pneumonia_probability
    verdicts[name] = [hashlib.sha256(model_input.pixels.tobytes()).hexdigest(), probability]
print(json.dumps(verdicts))
"""
"""Decodes and scores files with nothing but a built function's folder (and the standard library) on the path."""


@pytest.mark.slow
def test_the_slim_function_decodes_every_clinical_syntax_as_the_full_packages_do(tmp_path: Path) -> None:
    """The slimmed scoring function, run on Lambda's Python alone, decodes every committed DICOM syntax fixture and
    the sample JPEGs to the same pixels and probabilities as the test environment's full packages (the HTJ2K film,
    which no shipped decoder reads, is UNSUPPORTED_FORMAT in both)."""
    from core.preprocessing import preprocess  # noqa: PLC0415  # The test environment's own packages.
    from core.rejections import InvalidImageError  # noqa: PLC0415
    from scoring.classifier import Classifier  # noqa: PLC0415
    from tests.conftest import RELEASE_MODEL, REPOSITORY_ROOT, SAMPLES  # noqa: PLC0415
    from tests.dicom_fixtures import FIXTURES  # noqa: PLC0415

    python = slim_package.lambda_python()
    if python is None:
        pytest.skip("no Python 3.12 here to run the built function")
    function = tmp_path / "ScoringFunction"
    subprocess.run(
        ["make", "build-ScoringFunction", f"ARTIFACTS_DIR={function}", f"PYTHON={sys.executable}",
         f"LAMBDA_PYTHON={python}"],
        cwd=REPOSITORY_ROOT / "functions",
        check=True,
        capture_output=True,
    )  # fmt: skip
    assert not (function / "botocore").exists()
    files = sorted(FIXTURES.glob("*.dcm")) + sorted(SAMPLES.glob("*/*.jpeg"))
    assert len(files) >= 10
    built = subprocess.run(
        [python, "-I", "-B", "-c", DECODE_CHILD, str(function), str(REPOSITORY_ROOT), *map(str, files)],
        capture_output=True,
        text=True,
        check=True,
    )
    verdicts = json.loads(built.stdout.strip().splitlines()[-1])
    classifier = Classifier.from_directory(RELEASE_MODEL)
    for path in files:
        try:
            model_input = preprocess(path.read_bytes(), classifier.input_size)
        except InvalidImageError as error:
            assert verdicts[str(path)] == error.reason.value, path.name
            continue
        probability = classifier.predict(model_input.pixels[None])[0].pneumonia_probability
        expected = [hashlib.sha256(model_input.pixels.tobytes()).hexdigest(), probability]
        assert verdicts[str(path)] == expected, path.name
