"""Procedural "product surface" textures with and without defects (pure numpy).

Used to train and exercise the PaDiM demo detector without any dataset.
Each call draws its random variation (phase, period, tint, noise,
illumination, defect placement) from the ``np.random.Generator`` passed in,
so results are reproducible and there is no global random state.

Kinds:

* ``"textile"`` (default): a woven fabric -- two orthogonal thread
  sinusoids (period 6.5-7.5 px, slight rotation) with per-thread brightness
  jitter, fine noise and smooth illumination, in a beige/brown tint;
* ``"wood"``: warped growth rings along one axis, brown tint;
* ``"metal"``: brushed metal -- horizontally streaked noise, grey tint.

Defects (:func:`defective_texture`): a *scratch* (a 2-4 px wide line,
40-70 % of the image across, much darker or brighter than the surface) or a
*blob* (an elliptical stain of radius 6-12 px that darkens and recolours the
surface).  The returned mask marks exactly the pixels that were altered.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["TextureKind", "DefectKind", "normal_texture", "defective_texture"]

TextureKind = Literal["textile", "wood", "metal"]
DefectKind = Literal["scratch", "blob", "any"]


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation matrix (align-corners style)."""
    pos = np.linspace(0, n_in - 1, n_out)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = pos - i0
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] += 1 - frac
    m[np.arange(n_out), i1] += frac
    return m


def _smooth_field(rng: np.random.Generator, size: tuple[int, int], cells: int = 5) -> np.ndarray:
    """Low-frequency random field in roughly -1..1 (bilinear upsampled noise)."""
    h, w = size
    small = rng.uniform(-1, 1, (cells, cells))
    return _interp_matrix(h, cells) @ small @ _interp_matrix(w, cells).T


def _luminance(rng: np.random.Generator, size: tuple[int, int], kind: TextureKind) -> np.ndarray:
    """Grey-level surface pattern, roughly 0..1, for one texture ``kind``."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if kind == "textile":
        period = rng.uniform(6.5, 7.5)
        theta = rng.uniform(-0.05, 0.05)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        ph = rng.uniform(0, 2 * np.pi, 2)
        warp = np.sin(2 * np.pi * u / period + ph[0])
        weft = np.sin(2 * np.pi * v / period + ph[1])
        # Alternating over/under crossing so it reads as a weave, not a grid.
        weave = np.where(warp * weft > 0, warp, weft)
        # Per-thread brightness jitter: threads are not perfectly uniform.
        n_threads = int(max(h, w) / period) + 4
        jit = rng.normal(0, 0.04, n_threads)
        thread = jit[np.clip((v / period).astype(int) + 2, 0, n_threads - 1)]
        lum = 0.55 + 0.22 * weave + thread
    elif kind == "wood":
        period = rng.uniform(7.0, 11.0)
        warp = 6.0 * _smooth_field(rng, size, 4) + 3.0 * _smooth_field(rng, size, 8)
        rings = np.sin(2 * np.pi * (yy + warp) / period + rng.uniform(0, 2 * np.pi))
        lum = 0.5 + 0.18 * rings + 0.05 * _smooth_field(rng, size, 12)
    elif kind == "metal":
        # Brushed: noise smoothed strongly along x only.
        noise = rng.normal(0, 1, (h, w + 32))
        k = np.ones(32) / 32
        streaks = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, noise)[:, :w]
        lum = 0.6 + 0.5 * streaks
    else:
        raise ValueError(f"unknown texture kind {kind!r}")
    # Fine sensor noise and slow illumination variation.
    lum = lum + rng.normal(0, 0.03, size) + 0.05 * _smooth_field(rng, size, 3)
    return lum


_TINTS: dict[str, tuple[float, float, float]] = {
    "textile": (1.0, 0.88, 0.70),
    "wood": (0.95, 0.68, 0.42),
    "metal": (0.85, 0.87, 0.9),
}


def _render(rng: np.random.Generator, size: tuple[int, int], kind: TextureKind) -> np.ndarray:
    lum = _luminance(rng, size, kind)
    tint = np.asarray(_TINTS[kind]) * (1 + rng.normal(0, 0.01, 3))
    return lum[..., None] * tint  # float HxWx3, ~0..1


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def normal_texture(
    rng: np.random.Generator,
    size: tuple[int, int] = (128, 128),
    *,
    kind: TextureKind = "textile",
) -> np.ndarray:
    """A defect-free procedural texture: uint8 RGB array of shape (H, W, 3)."""
    return _to_uint8(_render(rng, (int(size[0]), int(size[1])), kind))


def defective_texture(
    rng: np.random.Generator,
    size: tuple[int, int] = (128, 128),
    *,
    kind: TextureKind = "textile",
    defect: DefectKind = "any",
) -> tuple[np.ndarray, np.ndarray]:
    """A texture of the same family with one defect.

    Returns ``(image, mask)``: image uint8 (H, W, 3) RGB, mask bool (H, W),
    True on the defect's pixels.  ``defect="any"`` picks scratch or blob at
    random.  The defect is kept at least 8 px from the border.
    """
    h, w = int(size[0]), int(size[1])
    img = _render(rng, (h, w), kind)
    if defect == "any":
        defect = "scratch" if rng.random() < 0.5 else "blob"
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if defect == "scratch":
        length = rng.uniform(0.4, 0.7) * min(h, w)
        angle = rng.uniform(0, np.pi)
        dy, dx = np.sin(angle), np.cos(angle)
        # Centre chosen so both ends stay >= 8 px inside the image.
        my = max(8 + abs(dy) * length / 2, 1)
        mx = max(8 + abs(dx) * length / 2, 1)
        cy = rng.uniform(min(my, h / 2), max(h - my, h / 2))
        cx = rng.uniform(min(mx, w / 2), max(w - mx, w / 2))
        half_width = rng.uniform(1.0, 2.0)
        # Distance of each pixel to the segment.
        t = np.clip((yy - cy) * dy + (xx - cx) * dx, -length / 2, length / 2)
        dist = np.hypot(yy - (cy + t * dy), xx - (cx + t * dx))
        mask = dist <= half_width
        if rng.random() < 0.5:
            img[mask] = img[mask] * 0.25  # dark gouge
        else:
            img[mask] = np.minimum(img[mask] + 0.45, 1.0)  # bright scratch exposing substrate
    elif defect == "blob":
        ry, rx = rng.uniform(6, 12, 2)
        cy = rng.uniform(8 + ry, h - 8 - ry)
        cx = rng.uniform(8 + rx, w - 8 - rx)
        rot = rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(rot) + (xx - cx) * np.sin(rot)
        v = -(yy - cy) * np.sin(rot) + (xx - cx) * np.cos(rot)
        mask = (u / ry) ** 2 + (v / rx) ** 2 <= 1.0
        stain = np.asarray([0.35, 0.25, 0.15]) * (1 + rng.normal(0, 0.1, 3))
        img[mask] = img[mask] * 0.35 + stain * 0.3  # darker, browner stain
    else:
        raise ValueError(f"unknown defect kind {defect!r}")
    return _to_uint8(img), mask
