"""DCAM: a CBAM block (channel then spatial attention) per student scale. Training only."""
from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    """Avg- and max-pooled descriptors -> shared MLP (reduction r) -> sigmoid weight per channel."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)  # [B,C,1,1]


class SpatialAttention(nn.Module):
    """7x7 conv over the channel-mean and channel-max maps -> sigmoid weight per position."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(desc))  # [B,1,H,W]


class CBAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 4, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel mask [B,C,1,1] and spatial mask [B,1,H,W] (spatial computed on the channel-refined map)."""
        mc = self.channel(x)
        ms = self.spatial(x * mc)
        return mc, ms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mc, ms = self.masks(x)
        return x * mc * ms
