"""Scenes of coloured shapes for the synthetic benchmark: what is in a picture, and how it is drawn.

A scene is one to four objects, each a shape with a colour and a size, in distinct cells of a 3x3 grid (so that
"in the top left corner" is never ambiguous), on a grey background with a texture and mild noise. Everything is a
pure function of the random generator it is given, so a benchmark is reproducible from its seed.
"""

from __future__ import annotations

import functools
import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (210, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "purple": (130, 50, 175),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Radius (half the extent) as a fraction of the image side. A grid cell is 1/3 of the side, so even a large
# object fits inside its cell with room to move.
SIZES = {"small": 0.09, "large": 0.145}
TEXTURES = ("plain", "grainy", "striped", "checkered")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "middle", "right")

MAX_OBJECTS = 4
_SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down, for smooth edges at 32-64 px
_COLOR_JITTER = 12  # per channel, so that colour is a category, not one exact value


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is, and where (grid cell and centre, as fractions of the image side)."""

    shape: str
    color: str
    size: str
    row: int
    column: int
    x: float
    y: float

    @property
    def kind(self) -> tuple[str, str]:
        """(color, shape): what a terse caption names."""
        return self.color, self.shape


@dataclass(frozen=True)
class Scene:
    """What a picture shows: its objects and its background."""

    objects: tuple[SceneObject, ...]
    texture: str
    background: tuple[int, int, int]

    def count(self, color: str | None = None, shape: str | None = None, size: str | None = None) -> int:
        """How many objects match every attribute given."""
        return sum(
            (color is None or obj.color == color)
            and (shape is None or obj.shape == shape)
            and (size is None or obj.size == size)
            for obj in self.objects
        )

    def kinds(self) -> set[tuple[str, str]]:
        return {obj.kind for obj in self.objects}


def _sample_object(cell: int, rng: random.Random) -> SceneObject:
    row, column = divmod(cell, 3)
    size = rng.choice(tuple(SIZES))
    # Jitter the centre inside the cell without letting the shape leave it.
    slack = (1 / 6 - SIZES[size]) * 0.8
    x = (column + 0.5) / 3 + rng.uniform(-slack, slack)
    y = (row + 0.5) / 3 + rng.uniform(-slack, slack)
    return SceneObject(rng.choice(SHAPES), rng.choice(tuple(COLORS)), size, row, column, x, y)


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = MAX_OBJECTS) -> Scene:
    """Draw a scene: 1-4 objects in distinct grid cells, a texture and a grey background tone."""
    num_objects = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(range(9), num_objects))  # reading order, top left first
    objects = tuple(_sample_object(cell, rng) for cell in cells)
    grey = rng.randint(105, 150)
    background = tuple(grey + rng.randint(-8, 8) for _ in range(3))
    return Scene(objects, rng.choice(TEXTURES), background)


@functools.lru_cache(maxsize=32)
def _texture_pattern(texture: str, size: int) -> np.ndarray:
    """The fixed part of a background texture: (H, W, 1) brightness offsets, computed once per texture and size."""
    unit = size / 64  # textures are designed at 64 px and scale with the image
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    pattern = np.zeros((size, size), dtype=np.float32)
    if texture == "striped":
        pattern = 14.0 * np.sign(np.sin(2 * np.pi * (xs + ys) / (10 * unit)))
    elif texture == "checkered":
        period = 8 * unit
        pattern = 12.0 * (((xs // period + ys // period) % 2) * 2 - 1)
    return pattern.round().astype(np.int16)[..., None]


def _background(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """The background as an (H, W, 3) uint8 array: tone, texture, and per-pixel noise (strong when "grainy")."""
    # Uniform integer noise: as good as Gaussian to the eye and to a model, and several times cheaper to draw.
    amplitude = 28 if scene.texture == "grainy" else 7
    noise = rng.integers(-amplitude, amplitude + 1, size=(size, size, 3), dtype=np.int16)
    pixels = np.asarray(scene.background, dtype=np.int16) + _texture_pattern(scene.texture, size) + noise
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _shape_outline(obj: SceneObject, canvas: int) -> tuple[str, list[tuple[float, float]]]:
    """("ellipse" | "rectangle" | "polygon", points) for an object on a square canvas of side `canvas`."""
    cx, cy, r = obj.x * canvas, obj.y * canvas, SIZES[obj.size] * canvas
    if obj.shape == "circle":
        return "ellipse", [(cx - r, cy - r), (cx + r, cy + r)]
    if obj.shape == "square":
        half = r * 0.85  # about the area of the circle, so size words mean the same for every shape
        return "rectangle", [(cx - half, cy - half), (cx + half, cy + half)]
    if obj.shape == "triangle":
        return "polygon", [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if obj.shape == "diamond":
        return "polygon", [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    arm = r * 0.35  # cross: a plus sign of two bars
    return "polygon", [
        (cx - arm, cy - r), (cx + arm, cy - r), (cx + arm, cy - arm), (cx + r, cy - arm),
        (cx + r, cy + arm), (cx + arm, cy + arm), (cx + arm, cy + r), (cx - arm, cy + r),
        (cx - arm, cy + arm), (cx - r, cy + arm), (cx - r, cy - arm), (cx - arm, cy - arm),
    ]  # fmt: skip


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, canvas: int, fill) -> None:
    kind, points = _shape_outline(obj, canvas)
    if kind == "ellipse":
        draw.ellipse(points, fill=fill)
    elif kind == "rectangle":
        draw.rectangle(points, fill=fill)
    else:
        draw.polygon(points, fill=fill)


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene as an RGB image of side `image_size`; `rng` drives the noise and colour jitter."""
    canvas = image_size * _SUPERSAMPLE
    colors = Image.new("RGB", (canvas, canvas))
    coverage = Image.new("L", (canvas, canvas), 0)
    color_draw, coverage_draw = ImageDraw.Draw(colors), ImageDraw.Draw(coverage)
    for obj in scene.objects:
        jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
        fill = tuple(int(c) for c in np.clip(np.asarray(COLORS[obj.color]) + jitter, 0, 255))
        _draw(color_draw, obj, canvas, fill)
        _draw(coverage_draw, obj, canvas, 255)
    background = Image.fromarray(_background(scene, image_size, rng))
    # Averaging the 4x drawing down gives anti-aliased edges; the coverage mask blends them onto the background.
    return Image.composite(colors.reduce(_SUPERSAMPLE), background, coverage.reduce(_SUPERSAMPLE))


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes (lossless, so exported copies decode to the very same pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
