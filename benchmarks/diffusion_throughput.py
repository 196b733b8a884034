"""Training images per second of our U-Net (``lightning_modules/unet.py``, built by
``DiffusionModule`` from ``configs/diffusion.yaml``, or at the paper's size) against diffusers'
``UNet2DModel`` with its ``DDPMScheduler``, configured to the same architecture and parameter count,
at the same batch, precision and device, in one run.

A timed step is a whole DDPM training step: timestep and noise sampling, noising (our
``NoiseSchedule.q_sample`` / diffusers' ``scheduler.add_noise``), forward, MSE loss, backward and an
AdamW step, on a fixed batch of random images (data loading is not the models' cost). Warm-up steps
are not timed; the models then take turns in rounds, the order alternating, and each model's figure
is the median of its rounds, so background load on a shared machine does not favour either.

The same rounds also time this machine's peak in the run's precision (bfloat16 operands for
``bf16-mixed``, as autocast gives the U-Net's convolutions and matmuls; float32 for ``32-true``): a
large square matrix product (GEMM) and a large 3x3 convolution (many channels, a small batch; the
faster of the NCHW and channels-last layouts), each in FLOP/s by its textbook count (2 m n k; 2 x
outputs x input channels x 9). ``--precision auto`` (the default) resolves as the suite's Trainer
does for ``precision: auto`` (``resolve_precision``).

Figures: images per second of each, ours over diffusers' (above 1: ours is faster), our achieved
FLOP/s (FLOPs per image of one training step counted by FlopCounterMode, forward and backward,
divided by the batch, times images per second) as a fraction of the measured GEMM and convolution
peaks, and our MFU against the GPU's datasheet peak; empty off the peak table (every CPU).
``--profile`` adds a table of the top operators of our training step by self CPU time.
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
from lightning_modules.common.trainer import resolve_precision
from workflows.lightning_cli import DATA_TO_MODEL, model_settings_from_config

PRECISIONS = ("auto", "32-true", "bf16-mixed")
# The peak probes: a square GEMM of this side, and a 3x3 convolution (batch, channels, side);
# a GPU gets a 4x wider GEMM and an 8x larger batch, so a call lasts long enough to time.
GEMM_SIDE = 2048
CONV_SHAPE = (8, 256, 32)
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


@dataclass
class Peak:
    """One operation timed for the machine's peak: its FLOPs per call and FLOP/s per round."""

    name: str
    run: Callable[[], object]
    flops: float
    rates: list[float] = field(default_factory=list)

    @property
    def flop_per_s(self) -> float:
        return statistics.median(self.rates)


def peak_probes(device: torch.device, dtype: torch.dtype) -> list[Peak]:
    """A large GEMM and a large 3x3 convolution in both layouts, operands in ``dtype``."""
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    gpu = device.type != "cpu"
    n = GEMM_SIDE * (4 if gpu else 1)
    a, b = randn(n, n), randn(n, n)
    batch, channels, side = CONV_SHAPE
    batch *= 8 if gpu else 1
    x, w = randn(batch, channels, side, side), randn(channels, channels, 3, 3)
    x_last = x.to(memory_format=torch.channels_last)
    w_last = w.to(memory_format=torch.channels_last)
    conv_flops = 2.0 * batch * channels * side * side * channels * 9
    shape = f"{batch}x{channels}x{side}x{side}"
    return [
        Peak(f"gemm {n}^3", lambda: a @ b, 2.0 * n**3),
        Peak(f"3x3 conv {shape}", lambda: F.conv2d(x, w, padding=1), conv_flops),
        Peak(
            f"3x3 conv {shape} channels-last",
            lambda: F.conv2d(x_last, w_last, padding=1),
            conv_flops,
        ),
    ]


def profile_table(step: Callable[[], None], steps: int, rows: int = 15) -> str:
    """The top operators of ``steps`` calls of ``step`` by self CPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable[[], object], calls: int, device: torch.device) -> float:
    """Wall time of ``calls`` calls of ``run``, the device's queue drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        run()
    synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="auto: as the suite's Trainer"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    parser.add_argument(
        "--size", choices=SIZES, default="demo", help="paper: configs/experiments/paper.yaml"
    )
    parser.add_argument("--batch-size", type=int, help="default 64 (16 with --quick)")
    parser.add_argument(
        "--profile", action="store_true", help="print our step's top operators by self CPU time"
    )
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision, reason = (
        resolve_precision(device.type) if args.precision == "auto" else (args.precision, "as set")
    )
    if precision not in PRECISIONS:
        raise SystemExit(f"precision auto resolves to {precision} here ({reason}): not timed")
    bf16 = precision == "bf16-mixed"
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
    models = contenders(settings, images, bf16)
    peaks = peak_probes(device, torch.bfloat16 if bf16 else torch.float32)
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
    for probe in peaks:
        probe.run()  # oneDNN's first call of a shape builds its kernel
    timed = [(model.step, batch, model.rates) for model in models]
    timed_peaks = [(probe.run, probe.flops, probe.rates) for probe in peaks]
    for round_index in range(rounds):
        for work in (timed, timed_peaks):
            for run, amount, rates in work if round_index % 2 == 0 else work[::-1]:
                rates.append(steps * amount / seconds(run, steps, device))

    peak = peak_flops(device, precision)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{where}, {torch.get_num_threads()} threads, {precision} ({args.precision}: {reason}), "
        f"size {args.size} "
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
    achieved = ours.images_per_second * ours.flops_per_image
    gemm = peaks[0].flop_per_s
    conv = max(probe.flop_per_s for probe in peaks[1:])
    for probe in peaks:
        rates = ", ".join(f"{rate / 1e9:.1f}" for rate in probe.rates)
        print(f"peak {probe.name}: GFLOP/s per round [{rates}]")
    print(
        f"ours achieved {achieved / 1e9:.1f} GFLOP/s; peaks (median of rounds): GEMM "
        f"{gemm / 1e9:.1f} GFLOP/s, conv (the faster layout) {conv / 1e9:.1f} GFLOP/s"
    )
    if args.profile:
        print(f"ours, {steps * 2} training steps, top operators by self CPU time:")
        print(profile_table(ours.step, steps * 2))
    print_figures(
        ours_img_per_s=round(ours.images_per_second, 1),
        diffusers_img_per_s=round(theirs.images_per_second, 1),
        ratio_vs_diffusers=round(ours.images_per_second / theirs.images_per_second, 3),
        fraction_of_gemm_peak=round(achieved / gemm, 3),
        fraction_of_conv_peak=round(achieved / conv, 3),
        mfu=mfu(ours.images_per_second, ours.flops_per_image, peak),
    )


if __name__ == "__main__":
    main()
