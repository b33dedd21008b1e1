"""DP warm-up releases before DP-SGD (DP-FETA, FETA-Pro): each stage releases a noised statistic of the
private data once (a ``Release`` the privacy plan composes with DP-SGD); what is built from the released
statistic afterwards (images, a generator, augmentations) is post-processing."""
from . import central_images, rff
from .release import Release

__all__ = ["Release", "central_images", "rff"]
