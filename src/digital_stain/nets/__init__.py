"""Network definitions (compact, CycleGAN-style).

All networks take and return ``(N, C, H, W)`` float tensors scaled to [-1, 1].
"""

from .discriminator import PatchDiscriminator
from .generator import ResnetGenerator
from .norm import Statistics, TileStableInstanceNorm, record_statistics
from .registration import RegistrationNet, warp
from .unet import ColorizationUNet

__all__ = [
    "ColorizationUNet",
    "PatchDiscriminator",
    "RegistrationNet",
    "Statistics",
    "ResnetGenerator",
    "TileStableInstanceNorm",
    "record_statistics",
    "warp",
]
