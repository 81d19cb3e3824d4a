"""Where the model saw pneumonia: class activation maps computed with LiteRT, and a heatmap overlay PNG.

``explain.tflite`` maps the model's uint8 input to a ``(grid, grid)`` map of logit contributions: the served logit
is the card's explainer bias plus the map's mean. Its positive part is the evidence FOR pneumonia, which is what
Grad-CAM shows for this model's global-average-pooled linear head (see ``training/explain.py``). Only numpy, Pillow
and the LiteRT runtime are used, so the scoring package stays small.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from scoring.litert import BatchedInterpreter

OVERLAY_MAX_SIDE = 512
"""Longer side of the overlay PNG; a film is never enlarged."""

MAX_OPACITY = 0.6
"""Opacity of the colour where the heat is highest, so the film stays readable under the hottest region."""

HEAT_COLOURS = ((0, 0, 96), (255, 0, 0), (255, 255, 0))
"""Colour ramp from no heat through half heat to full heat: dark blue, red, yellow."""

PNG_COMPRESS_LEVEL = 1
"""zlib level of the overlay PNG: on a 512 px overlay, level 1 encodes in about a quarter of the time of the default
level 6 (26 ms against 94 ms on one core) for a file about a fifth larger (about 220 KB against 180 KB)."""


class Explainer:
    """``explain.tflite`` loaded into a LiteRT interpreter, computing contribution maps of preprocessed images."""

    def __init__(self, model_path: Path, num_threads: int = 1) -> None:
        self._model = BatchedInterpreter(model_path, num_threads=num_threads)
        self.grid = self._model.output_shape[0]

    def maps(self, pixels: np.ndarray) -> np.ndarray:
        """``(n, grid, grid)`` float32 logit contributions of a ``(n, size, size, 1)`` uint8 batch."""
        return self._model.run(pixels).astype(np.float32).reshape(len(pixels), self.grid, self.grid)


def render_overlay(image: Image.Image, contribution_map: np.ndarray, max_side: int = OVERLAY_MAX_SIDE) -> bytes:
    """PNG bytes of the film with the evidence for pneumonia laid over it as a heatmap.

    The film is shown in grayscale, scaled down so that its longer side is at most ``max_side``. The model read
    the whole film squashed to a square, so the map is stretched over the whole film, whatever its aspect ratio.
    Only the positive part of the map is drawn (the ReLU of Grad-CAM), normalised by its maximum and blended in
    proportion to the heat; a map without positive evidence gives the plain film."""
    if contribution_map.ndim != 2:
        raise ValueError(f"expected a 2-D contribution map, got shape {contribution_map.shape}")
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    film = _fit(image.convert("L"), max_side)
    picture = film.convert("RGB")
    heat = np.maximum(np.nan_to_num(contribution_map.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    peak = float(heat.max()) if heat.size else 0.0
    if peak > 0.0:
        # Bilinear upsampling of the coarse grid in float, so the gradient of the heat stays smooth.
        stretched = np.asarray(Image.fromarray(heat / peak).resize(film.size, Image.Resampling.BILINEAR))
        level = Image.fromarray(np.clip(np.rint(stretched * 255.0), 0, 255).astype(np.uint8))
        colours = ImageOps.colorize(level, black=HEAT_COLOURS[0], mid=HEAT_COLOURS[1], white=HEAT_COLOURS[2])
        opacity = Image.fromarray(np.rint(np.asarray(level, dtype=np.float32) * MAX_OPACITY).astype(np.uint8))
        picture = Image.composite(colours, picture, opacity)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _fit(film: Image.Image, max_side: int) -> Image.Image:
    """The film scaled down, aspect kept, so that its longer side is at most ``max_side``."""
    longer = max(film.size)
    if longer <= max_side:
        return film
    scale = max_side / longer
    size = (max(1, round(film.width * scale)), max(1, round(film.height * scale)))
    return film.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
