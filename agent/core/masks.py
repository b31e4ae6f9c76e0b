"""Class masks out: palette colours, per-class areas, and how large a mask travels inline.

A model gives a small class-index mask (its own resolution). The response needs (a) the area of every
class at the *full* mask size, (b) an RGB888 mask, either in the caller's shared memory (always full size)
or inline in the response, where gRPC clients' default 4 MiB receive limit applies. MaskPolicy decides
the inline size (docs/model-package.md, "Masks"):

* ``fit`` (default): the full-size mask when the whole response fits under ``max_response_bytes``, else
  a nearest-neighbour downscaled mask (same aspect ratio) that does. Areas are still computed at full
  size. A client sees which one it got from ``anomaly_mask.width`` / ``height`` (the sample clients
  decode with exactly those).
* ``full``: always the full-size mask (clients must raise their receive limit above 4 MiB for frames
  larger than about 1180x1180).
* ``none``: never inline (areas and colours are still listed; shared-memory masks are still written).

Nearest-neighbour upscaling maps each source row (column) to a run of consecutive target rows
(columns), so a mask is coloured at model resolution, widened column run by column run and then each
run of rows is filled with one broadcast copy: ~10-50x cheaper than resizing a full-size image. The
index maps are taken from the resampler itself (Pillow's NEAREST for the project's own packages,
OpenCV's INTER_NEAREST for DDA / Lookout for Vision packages, as DDA resizes its masks with cv2), so the
result is pixel-identical to that library's resize and the areas are exact.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: DDA's DEFAULT_ANOMALY_MASK_PALETTE (awslabs/DefectDetectionApplication, Apache-2.0,
#: src/backend/lyra_anomalies_mask_utils/__init__.py), verbatim: RGB per class index, 0 = background
#: (white). Lookout for Vision's edge results use these colours.
DDA_PALETTE_RGB: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255), (35, 164, 54), (20, 163, 179), (247, 105, 2), (147, 128, 255), (189, 16, 224), (70, 124, 230),
    (160, 147, 8), (0, 148, 189), (204, 119, 0), (88, 86, 214), (214, 28, 176), (0, 122, 255), (138, 110, 0),
    (44, 160, 44), (49, 130, 189), (230, 85, 13), (130, 105, 255), (255, 46, 220), (37, 50, 234), (124, 159, 30),
    (84, 166, 17), (24, 165, 153), (246, 103, 60), (163, 88, 255), (255, 67, 103), (109, 128, 252), (152, 152, 27),
    (65, 117, 5), (0, 152, 194), (173, 73, 74), (108, 115, 255), (252, 59, 220), (67, 59, 247), (159, 150, 30),
    (44, 170, 44), (24, 160, 175), (230, 115, 0), (132, 116, 212), (222, 115, 122), (148, 103, 189), (99, 121, 57),
    (149, 149, 9), (44, 147, 165), (132, 60, 57), (50, 48, 197), (222, 94, 184), (82, 84, 163), (117, 136, 68),
    (49, 163, 84), (20, 149, 243), (231, 111, 113), (38, 36, 148), (234, 98, 157), (107, 110, 207), (123, 150, 49),
    (62, 156, 43), (71, 156, 205), (190, 78, 22), (93, 91, 215), (123, 65, 115), (136, 139, 215), (122, 141, 52),
    (70, 164, 72), (64, 154, 196), (172, 118, 79), (126, 64, 203), (165, 81, 148), (51, 150, 255), (140, 109, 49),
    (63, 149, 55), (31, 119, 180), (214, 39, 40), (251, 70, 206), (206, 109, 189), (117, 107, 177), (173, 145, 52),
    (76, 166, 58), (0, 160, 204), (235, 109, 0), (207, 99, 144), (207, 114, 193), (132, 127, 184), (180, 133, 24),
    (133, 155, 59), (0, 112, 143), (184, 132, 127), (255, 79, 77), (57, 59, 121), (182, 138, 43), (124, 126, 2),
    (0, 144, 184), (166, 87, 8), (90, 142, 214), (214, 97, 107), (142, 44, 157), (120, 120, 38), (84, 141, 22),
    (0, 109, 139), (235, 112, 5), (48, 150, 209), (140, 86, 75), (114, 24, 119), (133, 136, 2),
)
assert len(DDA_PALETTE_RGB) == 104

#: The same palette as "#RRGGBB" (DDA's hex_color_string: uppercase).
DEFAULT_PALETTE: tuple[str, ...] = tuple(f"#{r:02X}{g:02X}{b:02X}" for r, g, b in DDA_PALETTE_RGB)

INLINE_MODES = ("fit", "full", "none")
#: gRPC's default receive limit (4 MiB) less 64 KiB, for the whole DetectAnomalies response.
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024 - 64 * 1024
#: Resamplers whose nearest-neighbour index map a mask follows.
RESAMPLERS = ("pillow", "cv2")


def palette(colors: tuple[str, ...] | list[str], size: int = 256) -> list[str]:
    """`size` colours: the package's own first, then DDA's palette. DDA's palette stops at 104 entries
    (DDA itself fails beyond); past it the non-background colours repeat, so every class index has one."""
    out = [c.upper() for c in colors]
    n = len(DEFAULT_PALETTE)
    out += [DEFAULT_PALETTE[i] if i < n else DEFAULT_PALETTE[(i - 1) % (n - 1) + 1] for i in range(len(out), size)]
    return out[:size]


def palette_rgb(colors: list[str]) -> np.ndarray:
    return np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in colors], dtype=np.uint8)


@dataclass(frozen=True)
class MaskPolicy:
    """What goes inline in a DetectAnomalies response (shared-memory masks are always full size)."""

    inline: str = "fit"
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    #: Inline masks for normal results too (Lookout for Vision sent them; ~0.9 MB of white at 640x480).
    normal: bool = True

    def __post_init__(self) -> None:
        if self.inline not in INLINE_MODES:
            raise ValueError(f"inline mask mode {self.inline!r} is not one of {list(INLINE_MODES)}")

    def inline_size(self, width: int, height: int, anomalous: bool, names: list[str]) -> tuple[int, int] | None:
        """(width, height) of the inline mask for a full-size width x height mask, or None for no inline mask.

        `names`: the anomaly names listed in the response, to bound the rest of the message."""
        if self.inline == "none" or (not anomalous and not self.normal):
            return None
        if self.inline == "full":
            return width, height
        budget = self.max_response_bytes - response_overhead(names)
        if width * height * 3 <= budget:
            return width, height
        if budget < 3:
            return None
        # Largest same-aspect size under the budget; flooring both sides keeps w*h <= budget/3.
        s = math.sqrt(budget / (3.0 * width * height))
        return max(1, int(width * s)), max(1, int(height * s))


def response_overhead(names: list[str]) -> int:
    """An upper bound on a DetectAnomalies response's bytes besides the mask pixels: scalar fields,
    the Bitmap header and per anomaly its name, area and colour with their field headers."""
    return 256 + sum(len(n.encode()) + 32 for n in names)


@functools.lru_cache(maxsize=128)
def nearest_runs(src: int, dst: int, resampler: str = "pillow") -> tuple[int, ...]:
    """How many of `dst` target pixels each of `src` source pixels becomes under the resampler's
    nearest-neighbour resize (read from the library itself, so masks are pixel-identical to it)."""
    if resampler == "cv2":
        import cv2

        ramp = np.arange(src, dtype=np.int32).reshape(1, src)
        index = np.asarray(cv2.resize(ramp, (dst, 1), interpolation=cv2.INTER_NEAREST)).reshape(-1)
    else:
        img = Image.fromarray(np.arange(src, dtype=np.int32).reshape(1, src), "I")
        index = np.asarray(img.resize((dst, 1), Image.Resampling.NEAREST)).reshape(-1)
    if index.size != dst or np.any(np.diff(index) < 0):
        raise AssertionError("nearest-neighbour index map is not monotonic")
    return tuple(int(r) for r in np.bincount(index, minlength=src))


@functools.lru_cache(maxsize=128)
def nearest_index(src: int, dst: int, resampler: str = "pillow") -> np.ndarray:
    """The source index of each target pixel under the resampler's nearest-neighbour resize."""
    index = np.repeat(np.arange(src, dtype=np.intp), nearest_runs(src, dst, resampler))
    index.setflags(write=False)
    return index


def class_counts(class_mask: np.ndarray, width: int, height: int, resampler: str) -> np.ndarray:
    """Pixels per class (256 bins) of class_mask resized (nearest) to width x height, without resizing it."""
    h, w = class_mask.shape
    rows = np.asarray(nearest_runs(h, height, resampler), dtype=np.float64)
    cols = np.asarray(nearest_runs(w, width, resampler), dtype=np.float64)
    return np.bincount(class_mask.reshape(-1), weights=np.outer(rows, cols).reshape(-1), minlength=256)


#: OpenCV's nearest-neighbour flag that picks the same source pixels as each resampler: INTER_NEAREST_EXACT
#: is documented to match Pillow's NEAREST, INTER_NEAREST is what DDA calls. Used only where
#: opencv_matches() has checked it against the resampler's own index map: OpenCV 4.5.1's
#: INTER_NEAREST_EXACT maps some sizes differently from Pillow (224 -> 1080 columns, for one).
_OPENCV_NEAREST = {"pillow": "INTER_NEAREST_EXACT", "cv2": "INTER_NEAREST"}


@functools.lru_cache(maxsize=128)
def opencv_matches(src: int, dst: int, resampler: str = "pillow") -> bool:
    """Whether OpenCV's nearest resize of `src` pixels to `dst` takes every target pixel from the same
    source pixel as the resampler itself (checked once per size pair on a ramp, so a library that
    changed its rounding falls back to the index-map path instead of sending a different mask)."""
    try:
        import cv2
    except ImportError:  # pragma: no cover - OpenCV is a core dependency; stay correct without it
        return False
    flag = getattr(cv2, _OPENCV_NEAREST[resampler], None)
    if flag is None:  # an OpenCV without INTER_NEAREST_EXACT (before 4.5)
        return False
    ramp = np.arange(src, dtype=np.int32).reshape(1, src)
    mapped = np.asarray(cv2.resize(ramp, (dst, 1), interpolation=flag))
    return bool(np.array_equal(mapped.reshape(-1), nearest_index(src, dst, resampler)))


def _opencv_nearest(rgb: np.ndarray, width: int, height: int, resampler: str,
                    dst: np.ndarray | None = None) -> np.ndarray:
    """A coloured mask resized by OpenCV with the resampler's nearest flag (where opencv_matches() said so),
    into `dst` when given."""
    import cv2

    return np.asarray(cv2.resize(rgb, (width, height), dst=dst, interpolation=getattr(cv2, _OPENCV_NEAREST[resampler])))


def widen(class_mask: np.ndarray, width: int, colors_rgb: np.ndarray, resampler: str) -> np.ndarray:
    """The coloured rows of class_mask at model height and `width` columns: h x width x 3 uint8."""
    h, w = class_mask.shape
    if w == width:
        return np.take(colors_rgb, class_mask, axis=0)
    if opencv_matches(w, width, resampler):
        # Colour the small mask, then let OpenCV's SIMD nearest resize widen 3-byte pixels: ~0.6x the
        # time of widening the class ids and colouring the wide mask with two numpy gathers.
        return _opencv_nearest(np.take(colors_rgb, class_mask, axis=0), width, h, resampler)
    return np.take(colors_rgb, np.take(class_mask, nearest_index(w, width, resampler), axis=1), axis=0)


def render(class_mask: np.ndarray, width: int, height: int, colors_rgb: np.ndarray, resampler: str,
           out: memoryview | None = None) -> np.ndarray | None:
    """class_mask (h x w uint8) resized (nearest) to width x height and coloured, as RGB888.

    Written into `out` (a buffer of at least width*height*3 bytes) and None returned, or returned as a
    new C-contiguous height x width x 3 array."""
    h, w = class_mask.shape
    nbytes = width * height * 3
    if out is not None:
        full = np.frombuffer(out, dtype=np.uint8, count=nbytes).reshape(height, width, 3)
    else:
        full = np.empty((height, width, 3), dtype=np.uint8)
    if height != h and opencv_matches(w, width, resampler) and opencv_matches(h, height, resampler):
        # One SIMD pass from the coloured small mask straight into the target buffer.
        _opencv_nearest(np.take(colors_rgb, class_mask, axis=0), width, height, resampler, full)
    else:
        wide = widen(class_mask, width, colors_rgb, resampler)
        if height == h:
            full[:] = wide
        else:
            start = 0
            for r, run in enumerate(nearest_runs(h, height, resampler)):
                if run:
                    full[start:start + run] = wide[r]
                    start += run
    if out is not None:
        del full  # release the caller's buffer
        return None
    return full
