"""One LiteRT model with a single uint8 image input and a single output, run on batches of any size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter


class BatchedInterpreter:
    """A LiteRT interpreter whose input is resized only when the batch size changes."""

    def __init__(self, model_path: Path, num_threads: int = 1) -> None:
        self._interpreter = Interpreter(model_path=str(model_path), num_threads=num_threads)
        input_details = self._interpreter.get_input_details()[0]
        output_details = self._interpreter.get_output_details()[0]
        self._input_index = input_details["index"]
        self._output_index = output_details["index"]
        self.input_size = int(input_details["shape"][1])
        self.output_shape = tuple(int(side) for side in output_details["shape"][1:])
        """The shape of one image's output, without the batch axis."""
        self._batch_size = 0

    def run(self, pixels: np.ndarray, expected_size: int | None = None) -> np.ndarray:
        """The output of a ``(n, size, size, 1)`` uint8 batch, as a float64 array of ``(n, *output_shape)``."""
        size = expected_size or self.input_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 1):
            raise ValueError(f"expected (n, {size}, {size}, 1) pixels, got {pixels.shape}")
        if len(pixels) != self._batch_size:
            self._interpreter.resize_tensor_input(self._input_index, list(pixels.shape))
            self._interpreter.allocate_tensors()
            self._batch_size = len(pixels)
        self._interpreter.set_tensor(self._input_index, np.ascontiguousarray(pixels, dtype=np.uint8))
        self._interpreter.invoke()
        output = np.array(self._interpreter.get_tensor(self._output_index), dtype=np.float64)
        return output.reshape(len(pixels), *self.output_shape)
