"""medseg.networks: the U-Net of Ronneberger et al. (2015) and its shape arithmetic."""

from medseg.networks.unet import (
    UNet,
    unet_border,
    unet_input_size_for_output,
    unet_is_valid_input_size,
    unet_output_size,
    unet_size_divisor,
    unet_valid_input_size,
)

__all__ = [
    "UNet",
    "unet_border",
    "unet_input_size_for_output",
    "unet_is_valid_input_size",
    "unet_output_size",
    "unet_size_divisor",
    "unet_valid_input_size",
]
