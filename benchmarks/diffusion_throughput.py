"""Training images per second of our U-Net (``lightning_modules/unet.py``, built by
``DiffusionModule`` from ``configs/diffusion.yaml``, or at the paper's size) against diffusers'
``UNet2DModel`` with its ``DDPMScheduler``, configured to the same architecture and parameter count,
at the same batch, precision and device, in one run.

A timed step is a whole DDPM training step: timestep and noise sampling, noising (our
``NoiseSchedule.q_sample`` / diffusers' ``scheduler.add_noise``), forward, MSE loss, backward and an
AdamW step, on a fixed batch of random images (data loading is not the models' cost). Warm-up steps
are not timed; the models then take turns in rounds, the order alternating, and each model's figure
is the median of its rounds, so background load on a shared machine does not favour either.

Figures: images per second of each, ours over diffusers' (above 1: ours is faster), and our MFU:
FLOPs per image (one training step counted by FlopCounterMode, forward and backward, divided by
the batch) times images per second over the GPU's peak; empty off the peak table (every CPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from harness import (
    CONFIGS,
    SIZES,
    argument_parser,
    mfu,
    peak_flops,
    print_figures,
    size_overrides,
)
from torch import nn

from lightning_modules import DiffusionModule
from lightning_modules.common.flops import flop_counter_mode
from workflows.lightning_cli import DATA_TO_MODEL, model_settings_from_config

PRECISIONS = ("32-true", "bf16-mixed")
# Equal parameter counts within this fraction, or the comparison says nothing.
PARAMETER_TOLERANCE = 0.10


@dataclass
class Contender:
    """One model's training step and the images per second of each timed round."""

    name: str
    model: nn.Module
    step: Callable[[], None]
    flops_per_image: float = 0.0
    rates: list[float] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def images_per_second(self) -> float:
        return statistics.median(self.rates)


def unet_settings(size: str) -> dict:
    """``DiffusionModule`` settings as ``plankton fit --config configs/diffusion.yaml`` (with the
    paper experiment's overrides for ``paper``) resolves them, image format linked from the data."""
    settings = model_settings_from_config(CONFIGS / "diffusion.yaml")
    linked = dict(DATA_TO_MODEL)
    for key, value in size_overrides("diffusion", size).items():
        if key.startswith("model.init_args."):
            settings[key.removeprefix("model.init_args.")] = value
        elif key.startswith("data.") and key.removeprefix("data.") in linked:
            settings[linked[key.removeprefix("data.")]] = value
        else:
            raise ValueError(f"paper override {key} has no U-Net setting to go to")
    return settings


def diffusers_unet(settings: dict) -> UNet2DModel:
    """diffusers' U-Net with our block layout: the same widths per level, residual blocks per
    level (decoder levels one more, as ours), attention at the same resolutions and in the middle
    with the same head width, the same timestep-embedding width (4x the base) and dropout."""
    widths = [settings["base_channels"] * mult for mult in settings["channel_mult"]]
    sides = [settings["image_size"] // 2**level for level in range(len(widths))]
    attention = [side in settings["attention_resolutions"] for side in sides]
    # UNet2DModel takes one head width for every attention layer, ours one head count.
    head_dims = {w // settings["num_heads"] for w, a in zip(widths, attention, strict=True) if a}
    head_dims.add(widths[-1] // settings["num_heads"])  # the middle block's attention
    if len(head_dims) != 1:
        raise ValueError(f"attention widths {sorted(head_dims)} need one head width in diffusers")
    return UNet2DModel(
        sample_size=settings["image_size"],
        in_channels=settings["in_chans"],
        out_channels=settings["in_chans"],
        block_out_channels=tuple(widths),
        layers_per_block=settings["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=head_dims.pop(),
        dropout=settings["dropout"],
    )


def training_step(
    model: nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, bf16: bool
) -> Callable[[], None]:
    """One AdamW step on ``loss(images)``; under bf16 autocast for ``bf16-mixed``, as Lightning
    runs ``training_step`` (the loss included) and leaves backward and the optimiser outside."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            value = loss(images)
        value.backward()
        optimizer.step()

    return step


def contenders(settings: dict, images: torch.Tensor, bf16: bool) -> list[Contender]:
    device = images.device
    torch.manual_seed(0)
    ours = DiffusionModule(**settings)
    unet, schedule = ours.unet.to(device).train(), ours.schedule.to(device)

    def our_loss(x0: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, schedule.timesteps, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        return F.mse_loss(unet(schedule.q_sample(x0, t, noise), t), noise)

    torch.manual_seed(0)
    theirs = diffusers_unet(settings).to(device).train()
    scheduler = DDPMScheduler(
        num_train_timesteps=settings["timesteps"],
        beta_schedule="linear" if settings["schedule"] == "linear" else "squaredcos_cap_v2",
    )

    def their_loss(x0: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        return F.mse_loss(theirs(scheduler.add_noise(x0, noise, t), t).sample, noise)

    return [
        Contender("ours", unet, training_step(unet, our_loss, images, bf16)),
        Contender("diffusers", theirs, training_step(theirs, their_loss, images, bf16)),
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    parser.add_argument(
        "--size", choices=SIZES, default="demo", help="paper: configs/experiments/paper.yaml"
    )
    parser.add_argument("--batch-size", type=int, help="default 64 (16 with --quick)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = args.batch_size or (16 if args.quick else 64)
    # (warm-up steps after the counted one, rounds, steps per model per round)
    warmup, rounds, steps = (2, 4, 2) if args.quick else (3, 5, 4)
    if device.type == "cuda" and not args.quick:
        # A GPU step takes milliseconds: longer rounds, so launch jitter and clock resolution
        # do not decide the figure, and more warm-up for cuDNN's and the allocator's first calls.
        warmup, steps = 10, 20

    settings = unet_settings(args.size)
    side, channels = settings["image_size"], settings["in_chans"]
    images = torch.rand(batch, channels, side, side, device=device) * 2 - 1
    models = contenders(settings, images, args.precision == "bf16-mixed")
    ours, theirs = models
    gap = abs(ours.parameters - theirs.parameters) / theirs.parameters
    print(
        f"parameters: ours {ours.parameters:,}, diffusers {theirs.parameters:,} ({gap:.1%} apart)"
    )
    if gap > PARAMETER_TOLERANCE:
        raise SystemExit(
            f"parameter counts {gap:.1%} apart, over {PARAMETER_TOLERANCE:.0%}: "
            "the diffusers configuration no longer matches ours"
        )

    for model in models:
        # The first step, counted, is also the first warm-up step: counting slows it down.
        with flop_counter_mode() as counter:
            model.step()
        model.flops_per_image = counter.get_total_flops() / batch
        for _ in range(warmup):
            model.step()
    for round_index in range(rounds):
        for model in models if round_index % 2 == 0 else models[::-1]:
            synchronize(device)
            started = time.perf_counter()
            for _ in range(steps):
                model.step()
            synchronize(device)
            model.rates.append(steps * batch / (time.perf_counter() - started))

    peak = peak_flops(device, args.precision)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{where}, {torch.get_num_threads()} threads, {args.precision}, size {args.size} "
        f"({side} px, base {settings['base_channels']}), batch {batch}, {rounds * steps} timed "
        f"steps per model in {rounds} rounds; peak: {peak[0] if peak else 'none known'}"
    )
    for model in models:
        rates = ", ".join(f"{rate:.1f}" for rate in model.rates)
        utilisation = mfu(model.images_per_second, model.flops_per_image, peak)
        print(
            f"{model.name}: {model.flops_per_image / 1e9:.3f} GFLOP per image per training step, "
            f"img/s per round [{rates}], MFU {utilisation or '-'}"
        )
    print_figures(
        ours_img_per_s=round(ours.images_per_second, 1),
        diffusers_img_per_s=round(theirs.images_per_second, 1),
        ratio_vs_diffusers=round(ours.images_per_second / theirs.images_per_second, 3),
        mfu=mfu(ours.images_per_second, ours.flops_per_image, peak),
    )


if __name__ == "__main__":
    main()
