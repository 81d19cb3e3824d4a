"""Training augmentation for how real films arrive: framing, collimation, markers, encodings and exposure.

Every transform is one a film plausibly goes through between the detector and the upload: a different field of
view (zoom in or out by up to 20%, shifts, an aspect that is not quite square), a tilt of up to 10 degrees,
collimation borders and padding, burned-in text and markers, another window, gamma or contrast, a little blur or
noise, and JPEG re-encoding. There are no flips: the heart sits on the patient's left, and a mirrored film is not a
real input. ``strength`` in [0, 1] scales how far and how often each transform goes, so a hyper-parameter search
can choose it.

The transforms run per image in the ``tf.data`` pipeline, on the model's uint8 input, so the exported graph holds
no random layers and training still reads the images the shared preprocessing made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf

MAX_ROTATION_DEGREES = 10.0
MAX_ZOOM_IN = 0.2
"""At full strength the field of view shrinks to 80% of the film (a crop)."""
MAX_ZOOM_OUT = 0.2
"""At full strength the film fills 80% of the frame (padding)."""
MAX_SHIFT = 0.08
JPEG_QUALITIES = (40, 95)


@dataclass(frozen=True)
class AugmentationSettings:
    """How strong the acquisition augmentation is; 0 turns it off."""

    strength: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"augmentation strength must be in [0, 1], got {self.strength}")


def augment_film(image: tf.Tensor, settings: AugmentationSettings) -> tf.Tensor:
    """One random acquisition variant of a ``(size, size, 1)`` uint8 film, as uint8."""
    strength = settings.strength
    if strength == 0:
        return image
    pixels = tf.cast(image, tf.float32)
    pixels = _reframe(pixels, strength)
    pixels = _collimation_borders(pixels, strength)
    pixels = _burned_in_marks(pixels, strength)
    pixels = _exposure(pixels, strength)
    pixels = _blur_and_noise(pixels, strength)
    augmented = tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)
    return _jpeg_reencode(augmented, strength)


def _chance(probability: float) -> tf.Tensor:
    return tf.random.uniform(()) < probability


def _uniform(low: float, high: float) -> tf.Tensor:
    return tf.random.uniform((), low, high)


def _reframe(pixels: tf.Tensor, strength: float) -> tf.Tensor:
    """Zoom, aspect, shift and rotation in one projective transform; what falls outside is black, grey or white,
    as padding and detector edges are."""
    size = tf.cast(tf.shape(pixels)[0], tf.float32)
    angle = _uniform(-1.0, 1.0) * strength * MAX_ROTATION_DEGREES * math.pi / 180.0
    # A scale above 1 shows more than the film (zoom out, padding); below 1 a crop of it (zoom in).
    scale = tf.exp(_uniform(math.log(1.0 - MAX_ZOOM_IN * strength), math.log(1.0 + MAX_ZOOM_OUT * strength)))
    aspect = tf.exp(_uniform(-0.1, 0.1) * strength)
    scale_x, scale_y = scale * aspect, scale / aspect
    shift_x = _uniform(-1.0, 1.0) * MAX_SHIFT * strength * size
    shift_y = _uniform(-1.0, 1.0) * MAX_SHIFT * strength * size
    cos, sin = tf.cos(angle), tf.sin(angle)
    centre = (size - 1.0) / 2.0
    # The transform maps output coordinates to input coordinates: rotate and scale about the centre, then shift.
    a0, a1 = scale_x * cos, -scale_x * sin
    b0, b1 = scale_y * sin, scale_y * cos
    a2 = centre - a0 * centre - a1 * centre + shift_x
    b2 = centre - b0 * centre - b1 * centre + shift_y
    transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[tf.newaxis]
    fill = tf.where(_chance(0.5), 0.0, tf.where(_chance(0.5), _uniform(0.0, 255.0), 255.0))
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=pixels[tf.newaxis],
        transforms=transform,
        output_shape=tf.shape(pixels)[:2],
        fill_value=fill,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return moved[0]


def _band_mask(size: tf.Tensor, strength: float) -> tf.Tensor:
    """A mask of 1 to 4 bands along the film's edges, each up to 12% of its side."""
    rows = tf.range(size, dtype=tf.float32)[:, tf.newaxis]
    columns = tf.range(size, dtype=tf.float32)[tf.newaxis, :]
    side = tf.cast(size, tf.float32)
    widths = [tf.where(_chance(0.5), _uniform(0.0, 0.12 * strength) * side, 0.0) for _ in range(4)]
    top, bottom, left, right = widths
    mask = (rows < top) | (rows >= side - bottom) | (columns < left) | (columns >= side - right)
    return tf.cast(mask, tf.float32)[..., tf.newaxis]


def _collimation_borders(pixels: tf.Tensor, strength: float) -> tf.Tensor:
    """Sometimes flat borders, as collimators and scanner padding leave them (dark or bright)."""
    mask = _band_mask(tf.shape(pixels)[0], strength)
    value = tf.where(_chance(0.6), _uniform(0.0, 40.0), _uniform(200.0, 255.0))
    bordered = pixels * (1.0 - mask) + value * mask
    return tf.where(_chance(0.35 * strength), bordered, pixels)


def _burned_in_marks(pixels: tf.Tensor, strength: float) -> tf.Tensor:
    """Sometimes bright burned-in marks: side markers, annotation boxes and lines of text, mostly near the edges."""
    size = tf.shape(pixels)[0]
    side = tf.cast(size, tf.float32)
    rows = tf.range(size, dtype=tf.float32)[:, tf.newaxis]
    columns = tf.range(size, dtype=tf.float32)[tf.newaxis, :]
    marks = tf.zeros_like(pixels[..., 0])
    for _ in range(3):
        height = _uniform(0.02, 0.1) * side
        width = _uniform(0.02, 0.3) * side
        # Marks sit in a band along the edges: the outer fifth of the film, where markers and text are placed.
        near_top = _chance(0.5)
        top = tf.where(near_top, _uniform(0.0, 0.2), _uniform(0.7, 1.0)) * side - height * tf.where(near_top, 0.0, 1.0)
        left = _uniform(0.0, 1.0) * (side - width)
        box = (rows >= top) & (rows < top + height) & (columns >= left) & (columns < left + width)
        # Text is made of strokes: a box is filled solid, drawn as an outline, or striped like a line of letters.
        outline = box & ~(
            (rows >= top + 2) & (rows < top + height - 2) & (columns >= left + 2) & (columns < left + width - 2)
        )
        striped = box & (tf.math.floormod(columns - left, 4.0) < 2.0)
        style = tf.random.uniform((), 0, 3, dtype=tf.int32)
        shape = tf.switch_case(style, [lambda b=box: b, lambda o=outline: o, lambda s=striped: s])
        marks = tf.where(_chance(0.6) & shape, 1.0, marks)
    value = _uniform(180.0, 255.0)
    marked = tf.where(marks[..., tf.newaxis] > 0, value, pixels)
    return tf.where(_chance(0.5 * strength), marked, pixels)


def _exposure(pixels: tf.Tensor, strength: float) -> tf.Tensor:
    """Another window (black and white points), gamma and brightness, as other machines and viewers show a film."""
    low = _uniform(0.0, 40.0 * strength)
    high = 255.0 - _uniform(0.0, 40.0 * strength)
    # A wider window than the film's own range lowers the contrast instead.
    widen = _uniform(0.0, 30.0 * strength)
    windowed = (pixels - low + widen) / (high - low + 2.0 * widen)
    gamma = tf.exp(_uniform(-0.4, 0.4) * strength)
    shown = 255.0 * tf.pow(tf.clip_by_value(windowed, 0.0, 1.0), gamma) + _uniform(-15.0, 15.0) * strength
    return tf.where(_chance(0.8 * strength + 0.1), shown, pixels)


def _blur_and_noise(pixels: tf.Tensor, strength: float) -> tf.Tensor:
    """Sometimes a mild Gaussian blur (sigma up to 1.2 px), sometimes sensor noise (up to 6 grey levels)."""
    sigma = _uniform(0.3, 0.3 + 0.9 * strength)
    offsets = tf.range(-3.0, 4.0)
    kernel = tf.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel /= tf.reduce_sum(kernel)
    padded = tf.pad(pixels[tf.newaxis], [[0, 0], [3, 3], [3, 3], [0, 0]], mode="SYMMETRIC")
    blurred = tf.nn.conv2d(padded, tf.reshape(kernel, (7, 1, 1, 1)), strides=1, padding="VALID")
    blurred = tf.nn.conv2d(blurred, tf.reshape(kernel, (1, 7, 1, 1)), strides=1, padding="VALID")[0]
    pixels = tf.where(_chance(0.3 * strength), blurred, pixels)
    noisy = pixels + tf.random.normal(tf.shape(pixels), stddev=_uniform(0.0, 6.0 * strength))
    return tf.where(_chance(0.3 * strength), noisy, pixels)


def _jpeg_reencode(image: tf.Tensor, strength: float) -> tf.Tensor:
    """Sometimes the film as a JPEG at a quality between 40 and 95 would decode."""
    quality = tf.random.uniform((), JPEG_QUALITIES[0], JPEG_QUALITIES[1] + 1, dtype=tf.int32)
    # A uint8 image comes back as uint8, through a real encode and decode.
    reencoded = tf.ensure_shape(tf.image.adjust_jpeg_quality(image, quality), image.shape)
    return tf.where(_chance(0.4 * strength), reencoded, image)
