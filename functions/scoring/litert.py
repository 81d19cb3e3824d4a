"""One LiteRT model with a single uint8 image input and one or more outputs, run on batches of any size.

A batch runs through the interpreter ``INFERENCE_BATCH`` images at a time, so the interpreter's tensor arena (the
activations of every image in flight) never grows with the number of images scored together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

INFERENCE_BATCH = 4
"""The most images one interpreter invocation holds. Measured on the release model (one thread, 64 films): 4 at a
time is as fast as one 64-image invocation and its arena is 25 MB instead of 350 MB; XNNPACK gains nothing from
larger batches on this network."""


class BatchedInterpreter:
    """A LiteRT interpreter run on slices of at most ``max_batch`` images, whose input is resized only when the
    slice size changes."""

    def __init__(self, model_path: Path, num_threads: int = 1, max_batch: int = INFERENCE_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self._interpreter = Interpreter(model_path=str(model_path), num_threads=num_threads)
        input_details = self._interpreter.get_input_details()[0]
        output_details = self._interpreter.get_output_details()
        self._input_index = input_details["index"]
        self._output_indices = [details["index"] for details in output_details]
        self.input_size = int(input_details["shape"][1])
        self.output_shapes = tuple(tuple(int(side) for side in details["shape"][1:]) for details in output_details)
        """The shape of one image's output, without the batch axis, for each output in the model's order."""
        self._batch_size = 0

    @property
    def allocated_batch(self) -> int:
        """The number of images the interpreter's tensors are allocated for now (0 before the first run)."""
        return int(self._interpreter.get_input_details()[0]["shape"][0]) if self._batch_size else 0

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one image's output of a model with a single output."""
        if len(self.output_shapes) != 1:
            raise ValueError(f"the model has {len(self.output_shapes)} outputs, not one")
        return self.output_shapes[0]

    def run(self, pixels: np.ndarray, expected_size: int | None = None) -> np.ndarray:
        """The output of a single-output model for a ``(n, size, size, 1)`` uint8 batch, as float64
        ``(n, *output_shape)``."""
        shape = self.output_shape
        return self.run_all(pixels, expected_size)[0].reshape(len(pixels), *shape)

    def run_all(self, pixels: np.ndarray, expected_size: int | None = None) -> list[np.ndarray]:
        """Every output of a ``(n, size, size, 1)`` uint8 batch, as float64 ``(n, *shape)`` arrays in the order of
        ``output_shapes``."""
        size = expected_size or self.input_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 1):
            raise ValueError(f"expected (n, {size}, {size}, 1) pixels, got {pixels.shape}")
        outputs = [np.empty((len(pixels), *shape), dtype=np.float64) for shape in self.output_shapes]
        for start in range(0, len(pixels), self.max_batch):
            stop = min(start + self.max_batch, len(pixels))
            for output, part in zip(outputs, self._invoke(pixels[start:stop]), strict=True):
                output[start:stop] = part
        return outputs

    def _invoke(self, pixels: np.ndarray) -> list[np.ndarray]:
        """Every output of one slice of at most ``max_batch`` images, as float64."""
        if len(pixels) != self._batch_size:
            self._interpreter.resize_tensor_input(self._input_index, list(pixels.shape))
            self._interpreter.allocate_tensors()
            self._batch_size = len(pixels)
        self._interpreter.set_tensor(self._input_index, np.ascontiguousarray(pixels, dtype=np.uint8))
        self._interpreter.invoke()
        return [
            np.array(self._interpreter.get_tensor(index), dtype=np.float64).reshape(len(pixels), *shape)
            for index, shape in zip(self._output_indices, self.output_shapes, strict=True)
        ]


class ClassifierModel:
    """``model.tflite``: the PNEUMONIA logit output and, for a model with an input gate, its pooled features.

    LiteRT does not keep the Keras order of outputs, so they are told apart by shape: the logit has one value per
    image, the features many."""

    def __init__(self, model_path: Path, num_threads: int = 1) -> None:
        self._model = BatchedInterpreter(model_path, num_threads=num_threads)
        shapes = self._model.output_shapes
        logits = [position for position, shape in enumerate(shapes) if shape in {(1,), ()}]
        features = [position for position, shape in enumerate(shapes) if len(shape) == 1 and shape[0] > 1]
        if len(logits) != 1 or len(features) > 1 or len(shapes) != len(logits) + len(features):
            raise ValueError(f"expected a logit output and at most one feature output, got shapes {shapes}")
        self._logit_position = logits[0]
        self._features_position = features[0] if features else None
        self.input_size = self._model.input_size

    @property
    def feature_count(self) -> int | None:
        """The length of the pooled feature vector, or None for a model without the features output."""
        if self._features_position is None:
            return None
        return self._model.output_shapes[self._features_position][0]

    def run(self, pixels: np.ndarray, expected_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``(n,)`` logits and ``(n, features)`` pooled features (None without that output) of a uint8 batch."""
        outputs = self._model.run_all(pixels, expected_size)
        features = outputs[self._features_position] if self._features_position is not None else None
        return outputs[self._logit_position].reshape(-1), features

    def logits(self, pixels: np.ndarray, expected_size: int | None = None) -> np.ndarray:
        """``(n,)`` logits of a uint8 batch."""
        return self.run(pixels, expected_size)[0]

    def run_in_batches(self, pixels: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        """``run`` over a whole image set, ``batch_size`` images at a time (training and its checks)."""
        outputs = [self.run(pixels[start : start + batch_size]) for start in range(0, len(pixels), batch_size)]
        logits = np.concatenate([batch_logits for batch_logits, _ in outputs])
        if self._features_position is None:
            return logits, None
        return logits, np.concatenate([features for _, features in outputs if features is not None])
