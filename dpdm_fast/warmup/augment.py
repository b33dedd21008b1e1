"""Strong random augmentation of the released images for the warm-up (post-processing: no privacy cost).

kornia's RandAugment (n ops of a policy, magnitude m of 30) on images in [0, 1]. The policy is
torchvision's RandAugment set, which DP-FETA uses, as kornia names it (geometry: rotate, shear,
translate; tone: auto-contrast, equalize, posterize, contrast, brightness, sharpness, colour),
without kornia's extra ``invert`` and the two solarize ops: an inverted digit (white ground) is not
an image of the data, and a model warmed up on them would draw some. Colour (saturation) needs RGB
and is left out for grayscale images.
"""
from __future__ import annotations

import torch

POLICY = [
    [("auto_contrast", 0, 1)], [("equalize", 0, 1)], [("rotate", -30.0, 30.0)], [("posterize", 4.0, 8.0)],
    [("color", 0.1, 1.9)], [("contrast", 0.1, 1.9)], [("brightness", 0.1, 1.9)], [("sharpness", 0.1, 1.9)],
    [("shear_x", -0.3, 0.3)], [("shear_y", -0.3, 0.3)], [("translate_x", -0.1, 0.1)], [("translate_y", -0.1, 0.1)],
]


class Augment:
    """``Augment(n_ops, magnitude)(images)``: each image of a batch ([0, 1], (N, C, H, W)) gets ``n_ops``
    random operations; ``n_ops=0`` returns the images unchanged. Draws from torch's global generator
    (seed it for a repeatable warm-up)."""

    def __init__(self, n_ops: int, magnitude: float, channels: int = 1):
        policy = POLICY if channels == 3 else [p for p in POLICY if p[0][0] != "color"]
        if n_ops < 0 or n_ops > len(policy):
            raise ValueError(f"warmup.train.augment_ops must be in 0..{len(policy)}, got {n_ops}")
        if n_ops and not 0 < magnitude < 30:
            raise ValueError(f"warmup.train.augment_magnitude must be in (0, 30) (kornia's RandAugment), got {magnitude}")
        self.n_ops = n_ops
        self._op = None
        if n_ops:
            from kornia.augmentation.auto import RandAugment
            self._op = RandAugment(n=n_ops, m=magnitude, policy=policy)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self._op is None:
            return images
        return self._op(images).clamp(0, 1)
