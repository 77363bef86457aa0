"""Network definitions (compact, CycleGAN-style).

All networks take and return ``(N, C, H, W)`` float tensors scaled to [-1, 1].
"""

from digital_stain.core.nets.discriminator import PatchDiscriminator
from digital_stain.core.nets.generator import ResnetGenerator
from digital_stain.core.nets.norm import Statistics, TileStableInstanceNorm, record_statistics
from digital_stain.core.nets.registration import RegistrationNet, warp
from digital_stain.core.nets.unet import ColorizationUNet

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
