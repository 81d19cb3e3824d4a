"""The LiteRT wrapper runs any batch through the interpreter a bounded slice at a time, with the same outputs."""

from __future__ import annotations

import numpy as np
import pytest

from core.model_card import MODEL_FILE
from scoring.litert import INFERENCE_BATCH, BatchedInterpreter
from tests.conftest import RELEASE_MODEL


def _films(count: int, size: int) -> np.ndarray:
    """``count`` different uint8 model inputs."""
    return np.random.default_rng(0).integers(0, 256, size=(count, size, size, 1), dtype=np.uint8)


def test_a_large_batch_never_grows_the_interpreter_input() -> None:
    """Scoring 3 slices' worth of images leaves the interpreter's input (and so its tensor arena) no larger than
    one slice."""
    model = BatchedInterpreter(RELEASE_MODEL / MODEL_FILE)
    films = _films(3 * INFERENCE_BATCH + 1, model.input_size)
    model.run_all(films)
    assert 0 < model.allocated_batch <= INFERENCE_BATCH


def test_sliced_outputs_equal_one_image_at_a_time() -> None:
    """Every output of a batch larger than a slice equals the image's own output when run alone, in order."""
    sliced = BatchedInterpreter(RELEASE_MODEL / MODEL_FILE, max_batch=3)
    alone = BatchedInterpreter(RELEASE_MODEL / MODEL_FILE, max_batch=1)
    films = _films(7, sliced.input_size)
    together = sliced.run_all(films)
    assert [output.shape[0] for output in together] == [7] * len(together)
    for position in range(len(films)):
        for output, single in zip(together, alone.run_all(films[position : position + 1]), strict=True):
            np.testing.assert_allclose(output[position], single[0], rtol=1e-5, atol=1e-5)


def test_a_slice_size_below_one_is_refused() -> None:
    """A slice of no images is a configuration error, not an endless loop."""
    with pytest.raises(ValueError, match="max_batch"):
        BatchedInterpreter(RELEASE_MODEL / MODEL_FILE, max_batch=0)
