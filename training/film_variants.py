"""Synthetic variants of real films: what the screening checks learn to refuse, and what they must keep.

Each variant is a function of a grayscale film (at its source resolution) and a random generator, returning
another grayscale image, as an uploader's software or a careless export would produce it:

- **conditions** the model cannot read: part of the film (a quarter or a half), the lungs covered by a uniform box,
  heavy blur (or a thumbnail blown up again), the grey levels inverted, the film turned by 90, 180 or 270 degrees;
- **benign variants** of a readable film, which must not be refused: a zoom-in crop of 5-15%, a padding or
  collimation border, a rotation of up to 10 degrees, burned-in annotations (side markers, text, a small box in a
  corner), JPEG re-encoding at quality 50-95, upscaling, and changes of contrast, brightness and gamma.

Fitting uses them on the fit films; the screening bench uses them on validation films. The test split never.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

Variant = Callable[[Image.Image, np.random.Generator], Image.Image]
"""A transformation of a grayscale film, drawing its parameters from the generator."""

REFERENCE_SIDE = 224
"""Blur radii and border widths are stated for a film of this side and scaled to the film's own size."""


def partial(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A quarter or a half of the film: one quadrant, or the top, bottom, left or right half, each side of the part
    40-60% of the film's; kept at its own resolution or blown up to the film's size."""
    width, height = image.size
    share_x, share_y = rng.uniform(0.4, 0.6, size=2)
    if rng.random() < 0.5:  # A half: one side whole.
        if rng.random() < 0.5:
            share_x = 1.0
        else:
            share_y = 1.0
    crop_width, crop_height = round(width * share_x), round(height * share_y)
    left = 0 if rng.random() < 0.5 else width - crop_width
    top = 0 if rng.random() < 0.5 else height - crop_height
    part = image.crop((left, top, left + crop_width, top + crop_height))
    return part.resize(image.size, Image.Resampling.BICUBIC) if rng.random() < 0.5 else part


LUNG_FIELDS = (0.12, 0.12, 0.88, 0.82)
"""Where the lungs of a frontal chest film lie, as shares of its width and height (left, top, right, bottom)."""


def occluded(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The lungs covered by a box of one grey level (a redaction, a label or a shield over the chest): both lung
    fields, one of them, or a box over 45-100% of their width and 50-100% of their height anywhere on them."""
    width, height = image.size
    left, top, right, bottom = (value + rng.uniform(-0.06, 0.06) for value in LUNG_FIELDS)
    shape = rng.integers(4)
    middle = (left + right) / 2
    if shape == 1:  # The lung on the film's left.
        right = middle + rng.uniform(-0.04, 0.04)
    elif shape == 2:  # The lung on the film's right.
        left = middle + rng.uniform(-0.04, 0.04)
    elif shape == 3:  # A part of both lung fields.
        box_width, box_height = (right - left) * rng.uniform(0.45, 1.0), (bottom - top) * rng.uniform(0.5, 1.0)
        left += rng.uniform(0, right - left - box_width)
        top += rng.uniform(0, bottom - top - box_height)
        right, bottom = left + box_width, top + box_height
    covered = image.copy()
    level = int(rng.integers(0, 256)) if rng.random() < 0.2 else int(rng.integers(40, 216))
    ImageDraw.Draw(covered).rectangle(
        (round(left * width), round(top * height), round(right * width), round(bottom * height)), fill=level
    )
    return covered


def blurred(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Heavy blur: a Gaussian of radius 2-12 px (at 224 px), or a 32-72 px thumbnail blown up to the film's size."""
    scale = min(image.size) / REFERENCE_SIDE
    if rng.random() < 0.7:
        return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(2.0, 12.0)) * scale))
    side = int(rng.integers(32, 73))
    thumbnail = image.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return thumbnail.resize(image.size, _random_resampling(rng))


def thumbnail(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A 64 px thumbnail (its longer side), as a viewer's preview export."""
    copy = image.copy()
    copy.thumbnail((64, 64), Image.Resampling.LANCZOS)
    return copy


def inverted(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The grey levels inverted: bone dark, air bright."""
    return ImageOps.invert(image)


def rotated_90(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Turned a quarter counter-clockwise."""
    return image.transpose(Image.Transpose.ROTATE_90)


def rotated_180(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Upside down."""
    return image.transpose(Image.Transpose.ROTATE_180)


def rotated_270(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Turned a quarter clockwise."""
    return image.transpose(Image.Transpose.ROTATE_270)


def zoom_in(image: Image.Image, rng: np.random.Generator, least: float = 0.05, most: float = 0.3) -> Image.Image:
    """``least`` to ``most`` of the width and of the height cut away (shared at random between the sides), blown up
    to the film's size again or kept at the crop's size. Fitting cuts up to 30%, as tightly collimated films show the
    lungs edge to edge; the bench measures the 10-15% of an ordinary zoom."""
    width, height = image.size
    cut_x, cut_y = rng.uniform(least, most, size=2)
    left = width * cut_x * rng.uniform(0.2, 0.8)
    top = height * cut_y * rng.uniform(0.2, 0.8)
    box = (round(left), round(top), round(left + width * (1 - cut_x)), round(top + height * (1 - cut_y)))
    crop = image.crop(box)
    return crop.resize(image.size, _random_resampling(rng)) if rng.random() < 0.7 else crop


def bordered(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A padding or collimation border of 2-20% of the side on some or all sides, black, white or grey."""
    width, height = image.size
    widths = (rng.uniform(0.02, 0.2, size=4) * np.array([width, height, width, height])).round().astype(int)
    if rng.random() < 0.5:  # Only some sides: a letterbox or a collimator's edge.
        widths = widths * rng.integers(0, 2, size=4)
    level = int(rng.choice([0, 0, 255, int(rng.integers(20, 236))]))
    return ImageOps.expand(image, border=tuple(int(value) for value in widths), fill=level)


def tilted(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotated by up to 10 degrees either way, the uncovered corners black or the film's mean grey."""
    fill = 0 if rng.random() < 0.7 else int(np.asarray(image).mean())
    return image.rotate(
        float(rng.uniform(-10.0, 10.0)), resample=Image.Resampling.BILINEAR, expand=rng.random() < 0.5, fillcolor=fill
    )


_ANNOTATIONS = ("R", "L", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "2024-01-15", "12:30", "CR", "DX", "1:1")


def annotated(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Burned-in annotations near the edges: side markers and text in white or black, now and then on a small box."""
    width, height = image.size
    marked = image.copy()
    draw = ImageDraw.Draw(marked)
    for _ in range(int(rng.integers(1, 4))):
        text = str(rng.choice(_ANNOTATIONS))
        font = ImageFont.load_default(size=max(6, round(min(width, height) * rng.uniform(0.04, 0.09))))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_width, text_height = right - left, bottom - top
        x = int(rng.uniform(0.01, 0.12) * width) if rng.random() < 0.5 else width - text_width - int(0.05 * width)
        y = int(rng.uniform(0.01, 0.1) * height) if rng.random() < 0.5 else height - text_height - int(0.05 * height)
        ink = 255 if rng.random() < 0.8 else 0
        if rng.random() < 0.35:
            pad = max(2, text_height // 3)
            box = (x - pad, y - pad, x + text_width + pad, y + text_height + pad)
            draw.rectangle(box, fill=255 - ink, outline=ink)
        draw.text((x - left, y - top), text, fill=ink, font=font)
    return marked


def jpeg_reencoded(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Encoded again as a JPEG of quality 50-95."""
    return Image.open(io.BytesIO(jpeg_bytes(image, int(rng.integers(50, 96))))).convert("L")


def upscaled(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blown up 1.3-4 times, as a viewer's export at screen size would."""
    factor = float(rng.uniform(1.3, 4.0))
    return image.resize((round(image.width * factor), round(image.height * factor)), _random_resampling(rng))


def contrast_changed(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Another window: gamma 0.7-1.4, contrast 0.75-1.25 around the mean and brightness -20 to +20 grey levels."""
    values = np.asarray(image, dtype=np.float64) / 255.0
    values = values ** rng.uniform(0.7, 1.4)
    values = (values - values.mean()) * rng.uniform(0.75, 1.25) + values.mean() + rng.uniform(-20, 20) / 255.0
    return Image.fromarray(np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8), mode="L")


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    """The image as a JPEG file of the given quality."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _random_resampling(rng: np.random.Generator) -> Image.Resampling:
    resamplings = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)
    return resamplings[int(rng.integers(len(resamplings)))]


@dataclass(frozen=True)
class Condition:
    """A class the screening head tells apart, and the variants that make films of it."""

    name: str
    variants: tuple[Variant, ...]


CLEAN = "clean"
BENIGN_VARIANTS: dict[str, Variant] = {
    "zoom_in": zoom_in,
    "border": bordered,
    "tilt": tilted,
    "annotation": annotated,
    "jpeg": jpeg_reencoded,
    "upscale": upscaled,
    "contrast": contrast_changed,
}
"""What a readable film may go through on its way to the scorer; the head learns these as clean."""

CONDITION_VARIANTS: dict[str, Variant] = {
    "partial": partial,
    "occluded": occluded,
    "blurred": blurred,
    "inverted": inverted,
    "rotated_90": rotated_90,
    "rotated_180": rotated_180,
    "rotated_270": rotated_270,
}
"""The conditions the head must recognise, by the name of the head's class."""

CLASSES: tuple[str, ...] = (CLEAN, *CONDITION_VARIANTS)
"""The head's classes, in the order of its outputs: clean first."""


def benign_variant(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One benign variant drawn at random (sometimes two in a row)."""
    names = list(BENIGN_VARIANTS)
    for _ in range(1 if rng.random() < 0.7 else 2):
        image = BENIGN_VARIANTS[names[int(rng.integers(len(names)))]](image, rng)
    return image
