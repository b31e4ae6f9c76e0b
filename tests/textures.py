"""Frames that stress a resize (shared by the resize and pipeline tests)."""

from __future__ import annotations

import numpy as np


def textures(width: int, height: int) -> dict[str, np.ndarray]:
    """Frames that stress a resize: noise, fine stripes, a checkerboard, hard-edged shapes, a gradient."""
    rng = np.random.default_rng(width + height)
    y, x = np.ogrid[0:height, 0:width]
    stripes = ((x // 1 + y // 3) % 2 * 255).astype(np.uint8)
    checker = (((x // 7) + (y // 5)) % 2 * 255).astype(np.uint8)
    shapes = np.full((height, width, 3), 30, np.uint8)
    shapes[height // 5:height // 2, width // 7:width // 3] = (250, 10, 120)
    shapes[(x - width * 0.7) ** 2 + (y - height * 0.6) ** 2 < (height * 0.2) ** 2] = (0, 255, 255)
    gradient = np.stack(np.broadcast_arrays(x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                                            (x + y) % 256), axis=-1).astype(np.uint8)
    return {"noise": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            "stripes": np.repeat(stripes[..., None], 3, axis=2), "checker": np.repeat(checker[..., None], 3, axis=2),
            "shapes": shapes, "gradient": gradient}
