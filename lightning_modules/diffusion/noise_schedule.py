"""DDPM noise schedules, the forward process q(x_t | x_0), and DDPM/DDIM samplers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NoiseSchedule(nn.Module):
    """``T`` noise levels; ``alphas_cumprod[t]`` is the signal fraction kept at step ``t``.

    Args:
        kind: ``linear`` (Ho et al. 2020, betas 1e-4 to 0.02) or ``cosine`` (Nichol & Dhariwal
            2021), which destroys information more slowly at small t.
        timesteps: number of steps T; valid timesteps are 0 .. T-1.
    """

    def __init__(self, kind: Literal["linear", "cosine"] = "linear", timesteps: int = 1000) -> None:
        super().__init__()
        if kind == "linear":
            scale = 1000 / timesteps
            betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
        elif kind == "cosine":
            steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
            f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"noise schedule must be 'linear' or 'cosine', got {kind!r}")
        self.kind = kind
        self.timesteps = timesteps
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def check(self, timesteps: torch.Tensor | list[int]) -> None:
        """Raise for timesteps outside [0, T)."""
        values = torch.as_tensor(timesteps)
        if values.numel() and (values.min() < 0 or values.max() >= self.timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.timesteps}), got {values.unique().tolist()}"
            )

    def _gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device)[t].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        abar = self._gather(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    @torch.no_grad()
    def ddpm_sample(
        self,
        model: Denoiser,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Ancestral sampling over all T steps (posterior variance beta-tilde)."""
        x = torch.randn(shape, generator=generator, device=device)
        for step in reversed(range(self.timesteps)):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            abar = self.alphas_cumprod[step]
            abar_prev = self.alphas_cumprod[step - 1] if step > 0 else torch.tensor(1.0)
            beta = self.betas[step]
            x0 = self._predict_x0(model, x, t, abar)
            mean = (abar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_prev) * x) / (
                1 - abar
            )
            if step > 0:
                variance = beta * (1 - abar_prev) / (1 - abar)
                noise = torch.randn(shape, generator=generator, device=device)
                x = mean + variance.sqrt() * noise
            else:
                x = mean
        return x.clamp(-1, 1)

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Denoiser,
        shape: tuple[int, ...],
        steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """DDIM (Song et al. 2021) over ``steps`` evenly spaced timesteps; eta 0 is deterministic
        given the starting noise."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"DDIM steps must be in [1, {self.timesteps}], got {steps}")
        x = torch.randn(shape, generator=generator, device=device)
        sequence = torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()
        for i, step in enumerate(sequence):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            abar = self.alphas_cumprod[step]
            abar_prev = self.alphas_cumprod[sequence[i + 1]] if i + 1 < steps else torch.tensor(1.0)
            x0 = self._predict_x0(model, x, t, abar)
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and i + 1 < steps:
                x = x + sigma * torch.randn(shape, generator=generator, device=device)
        return x.clamp(-1, 1)

    def _predict_x0(
        self, model: Denoiser, x: torch.Tensor, t: torch.Tensor, abar: torch.Tensor
    ) -> torch.Tensor:
        eps = model(x, t).float()
        return ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
