"""Tensor transforms shared by training and scoring.

Pixels travel between stages as uint8 grayscale (N, H, W). ``to_model_input`` is the
one place that turns them into the normalised 3-channel float tensor a model sees, so
training and scoring cannot drift apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) or float [0, 1] (N, 1, H, W) -> normalised (N, 3, H, W), channels_last."""
    x = images.unsqueeze(1).float().div_(255) if images.dtype == torch.uint8 else images
    x = x.expand(-1, 3, -1, -1)
    return ((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).contiguous(
        memory_format=torch.channels_last
    )


class TrainAugment:
    """Per-image random rotation, zoom-crop, shift and intensity jitter, batched on device.

    Ranges stay small: a chest film is never upside down, and a finding must not be
    cropped out of the lung field it sits in.
    """

    def __init__(
        self,
        *,
        max_rotation_deg: float = 7.0,
        scale: tuple[float, float] = (0.88, 1.0),
        max_shift: float = 0.05,
        brightness: float = 0.08,
        contrast: float = 0.15,
        gamma: float = 0.15,
    ):
        self.max_rotation = math.radians(max_rotation_deg)
        self.scale = scale
        self.max_shift = max_shift
        self.brightness = brightness
        self.contrast = contrast
        self.gamma = gamma

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """uint8 (N, H, W) -> augmented float (N, 1, H, W) in [0, 1]."""
        x = images.unsqueeze(1).float().div_(255)
        n, device = x.shape[0], x.device

        def uniform(lo, hi):
            return torch.rand(n, generator=generator).to(device) * (hi - lo) + lo

        angle = uniform(-self.max_rotation, self.max_rotation)
        zoom = uniform(*self.scale)  # < 1 samples a smaller window: a random crop, resized
        shift_x = uniform(-self.max_shift, self.max_shift)
        shift_y = uniform(-self.max_shift, self.max_shift)
        theta = torch.stack(
            [
                torch.stack([zoom * angle.cos(), -zoom * angle.sin(), shift_x], dim=1),
                torch.stack([zoom * angle.sin(), zoom * angle.cos(), shift_y], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

        gamma = uniform(1 - self.gamma, 1 + self.gamma).view(n, 1, 1, 1)
        contrast = uniform(1 - self.contrast, 1 + self.contrast).view(n, 1, 1, 1)
        brightness = uniform(-self.brightness, self.brightness).view(n, 1, 1, 1)
        x = x.clamp(0, 1).pow(gamma)
        mean = x.mean(dim=(2, 3), keepdim=True)
        return ((x - mean) * contrast + mean + brightness).clamp(0, 1)
