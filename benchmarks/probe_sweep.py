"""Wall time of probing an L x T grid of frozen U-Net features, four ways in the same run.

Like with like, three ways train the same linear heads with AdamW (the same learning rate,
weight decay, epochs, batch size and zero initial weights, the same batches: the datamodule's
whole batches, shuffled from one seed, features rounded to float16) on the same images and choose
the best key by validation macro-F1; they differ only in how often the backbone runs:

1. per pair: one probe per (layer, timestep), each re-running the whole backbone on every batch
   of every epoch (a forward hook reads its layer, as a probe script without the suite's early
   stop would; with the early stop, encoder pairs cost less, see ``--truncate-pairs``);
2. shared forward (the DDAE way): one forward per timestep and batch feeds the heads of every
   layer, every epoch;
3. cached AdamW (ours): ``ProbeModule`` in cached mode with ``solver="adamw"``: features
   extracted once (one forward per timestep and image, stored as float16), then every epoch
   trains all heads as one batched operation.

Beside them, what a user of the suite runs:

4. the default: ``ProbeModule`` in cached mode with its own defaults (``solver`` None, so
   full-batch L-BFGS, ``lbfgs_iterations`` per epoch, each read from the module; the weight decay
   grid ``LBFGS_DECAY_GRID``, one fit per decay before the first epoch; features standardised on
   the training set; a fusion head on the top keys), for the epochs the demo experiment gives the
   diffusion probe (``configs/experiments/demo.yaml``).

Both cached ways run under the same plain 32-bit Trainer, extract their own features into their
own cache folder (the same extraction batch: the extraction is shared work, timed and printed
apart) and validate once, after the last epoch. Figures: each way's seconds, and the ratios
shared / cached AdamW, per pair / cached AdamW, and default / cached AdamW (under 1: the default
is faster); ``same_best_key`` compares the best keys of the AdamW ways over the keys each
measured (per pair only when it measured every pair), and each way's best key is printed;
``keys_tied_at_top`` counts the keys sharing the cached AdamW way's best score (above 1, the
best key is a tie and ``same_best_key`` says little). A cached run of one epoch, not timed, comes
first, so no way pays the first calls' set-up.
The per-pair way is measured on ``--pairs`` pairs spread over the grid (default 8; all 48 take
about two hours on 2 CPU cores) and its time scaled to the whole grid: without the early stop
every pair runs the whole U-Net on the same batches, so each costs the same. ``--quick`` also
measures the shared forward on two timesteps and scales it alike, on a quarter of the images.
The AdamW ways train on whole batches only, so at ``--quick``'s size (122 training images, one
batch of 64 an epoch) the cached way extracts 140 images for the 64 a shared epoch computes, which
caps its ratio near 30 x 64 / 140 = 14: the goals (15x and 100x) are judged on the full size.
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from harness import CONFIGS, argument_parser, print_figures, work_dir

from datamodules import PlanktonDataModule, SyntheticPlankton
from lightning_modules import DiffusionFeatures, DiffusionModule, ProbeModule
from lightning_modules.probes.features import UNetFeatures
from lightning_modules.probes.grid_metrics import GridConfusion, grid_scores

LAYERS = ["enc.0.1", "enc.1.1", "enc.2.1", "mid.1", "dec.2.1", "dec.1.1", "dec.0.1", "dec.0.2"]
TIMESTEPS = [1, 10, 25, 50, 100, 200]
# At lr 1e-3 the zero-initialised heads on these unstandardised features barely leave the
# majority class in 30 epochs: every key scores the same and any "best key" is the first one.
EPOCHS, BATCH_SIZE, LR, WEIGHT_DECAY = 30, 64, 1e-1, 1e-4
EXTRACT_BATCH_SIZE = 256


def demo_probe_epochs() -> int:
    """The epochs the demo experiment gives the diffusion probe (the suite's default run)."""
    experiment = yaml.safe_load((CONFIGS / "experiments" / "demo.yaml").read_text())
    return int(experiment["probes"]["diffusion"]["max_epochs"])


def frozen_unet(image_size: int) -> DiffusionModule:
    """A U-Net with non-zero weights everywhere (a fresh one zeroes its output layers)."""
    torch.manual_seed(0)
    module = DiffusionModule(
        image_size=image_size,
        base_channels=16,
        attention_resolutions=(image_size // 2,),
        sample_every_n_epochs=0,
    )
    for parameter in module.ema.parameters():
        parameter.data.normal_(std=0.1)
    return module


def train_heads(source: UNetFeatures, data: PlanktonDataModule, keys: list | None = None) -> dict:
    """Linear heads for ``keys`` (default: every key of ``source``) trained on features computed
    every batch (the backbone runs each epoch); returns validation macro-F1 per key. The batches
    are the cached way's: the datamodule's (whole batches only), shuffled from the same seed, and
    the features rounded to float16 as the feature cache stores them."""
    keys = keys or source.keys
    dims = source.feature_dims()
    heads = torch.nn.ModuleList(torch.nn.Linear(dims[key], data.num_classes) for key in keys)
    for head in heads:
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    train = data.dataset("train")
    torch.manual_seed(0)
    for _ in range(EPOCHS):
        loader = train.loader(BATCH_SIZE, shuffle=True, drop_last=len(train) > BATCH_SIZE)
        for images, labels, indices in loader:
            features = source(images, indices)
            loss = sum(
                F.cross_entropy(head(features[key].half().float()), labels)
                for head, key in zip(heads, keys, strict=True)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    grid = GridConfusion(len(keys), data.num_classes)
    with torch.no_grad():
        for images, labels, indices in data.dataset("val").loader(256):
            features = source(images, indices)
            preds = [
                head(features[k].half().float()).argmax(-1)
                for head, k in zip(heads, keys, strict=True)
            ]
            grid.update(torch.stack(preds), labels)
    scores = grid_scores(grid.compute()).macro_f1
    return dict(zip(keys, scores.tolist(), strict=True))


def cached(
    module: DiffusionModule, data: PlanktonDataModule, cache_dir: str, epochs: int, **settings
) -> tuple[ProbeModule, dict, float]:
    """``ProbeModule`` in cached mode with ``settings`` over the grid, its own cache folder;
    returns the module, validation macro-F1 per key and the seconds its extraction took."""
    source = DiffusionFeatures.from_unet(
        module.ema, module.schedule, layers=LAYERS, timesteps=TIMESTEPS
    )
    probe = ProbeModule(
        source, num_classes=data.num_classes, mode="cached", cache_dir=cache_dir,
        extract_batch_size=EXTRACT_BATCH_SIZE, **settings,
    )  # fmt: skip
    extract_s = 0.0
    extract = probe._extract

    def timed_extract(*splits: str) -> None:
        nonlocal extract_s
        started = time.perf_counter()
        extract(*splits)
        extract_s += time.perf_counter() - started

    probe._extract = timed_extract
    trainer = L.Trainer(
        accelerator="cpu", precision="32-true", max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, check_val_every_n_epoch=epochs, default_root_dir=cache_dir,
    )  # fmt: skip
    torch.manual_seed(0)  # the batch order of train_heads
    trainer.fit(probe, data)
    return probe, dict(zip(probe.keys, probe.val_macro_f1.tolist(), strict=True)), extract_s


def best(scores: dict) -> tuple:
    return max(scores, key=scores.get)


def key_name(key: tuple) -> str:
    return f"{key[0]}@{key[1]}"


def main() -> None:
    parser = argument_parser(
        "Probe-sweep wall time: per pair, shared forward, cached AdamW (ours), the default."
    )
    parser.add_argument(
        "--truncate-pairs",
        action="store_true",
        help="per-pair probes stop the forward at their layer (the suite's early stop)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        help="per-pair probes measured, spread over the grid and scaled to it (default: 3 with "
        f"--quick, else 8; {len(LAYERS) * len(TIMESTEPS)} for every pair)",
    )
    args = parser.parse_args()
    per_class = 30 if args.quick else 120
    measured_pairs = args.pairs if args.pairs is not None else (3 if args.quick else 8)
    if not 1 <= measured_pairs <= len(LAYERS) * len(TIMESTEPS):
        parser.error(f"--pairs must be between 1 and {len(LAYERS) * len(TIMESTEPS)}")
    shared_timesteps = TIMESTEPS[::3] if args.quick else TIMESTEPS
    default_epochs = demo_probe_epochs()
    with work_dir(args.cache_dir) as root:
        spec = SyntheticPlankton(classes=8, per_class=per_class, imbalance=2.0, size=32)
        data = PlanktonDataModule(
            synthetic=spec, image_size=16, batch_size=BATCH_SIZE, cache_dir=str(root / "data"),
            progress=False,
        )  # fmt: skip
        data.setup()
        module = frozen_unet(16)
        # Each cached way extracts into a folder of its own: a kept --cache-dir must not let a
        # later run (or the other way) read features extracted earlier.
        run = f"{time.time_ns()}"
        adamw = dict(
            solver="adamw", lr=LR, weight_decay=WEIGHT_DECAY, standardize="none", fusion_top_k=0
        )
        cached(module, data, str(root / f"features-warmup-{run}"), 1, **adamw)

        start = time.perf_counter()
        _, ours_scores, ours_extract_s = cached(
            module, data, str(root / f"features-adamw-{run}"), EPOCHS, **adamw
        )
        ours_s = time.perf_counter() - start

        start = time.perf_counter()
        default, default_scores, default_extract_s = cached(
            module, data, str(root / f"features-default-{run}"), default_epochs
        )
        default_s = time.perf_counter() - start

        start = time.perf_counter()
        shared_scores = {}
        for t in shared_timesteps:
            source = DiffusionFeatures.from_unet(
                module.ema, module.schedule, layers=LAYERS, timesteps=[t]
            )
            shared_scores |= train_heads(source, data)
        shared_s = (time.perf_counter() - start) * len(TIMESTEPS) / len(shared_timesteps)

        pairs = [(layer, t) for t in TIMESTEPS for layer in LAYERS]
        start = time.perf_counter()
        pair_scores = {}
        # Spread over the grid: encoder pairs stop early, decoder pairs run most of the U-Net.
        last = module.ema.block_names[-1]
        for layer, t in pairs[:: len(pairs) // measured_pairs][:measured_pairs]:
            # Asking for the last block too makes the forward run to the end.
            layers = [layer] if args.truncate_pairs else list(dict.fromkeys([layer, last]))
            source = DiffusionFeatures.from_unet(
                module.ema, module.schedule, layers=layers, timesteps=[t]
            )
            pair_scores |= train_heads(source, data, keys=[(layer, t)])
        pair_s = (time.perf_counter() - start) * len(pairs) / measured_pairs

    same = best({key: ours_scores[key] for key in shared_scores}) == best(shared_scores)
    if measured_pairs == len(pairs):
        same = same and best(ours_scores) == best(pair_scores)
    print(
        f"{len(LAYERS)} layers x {len(TIMESTEPS)} timesteps, {len(data.dataset('train'))} "
        f"training images at 16 px; AdamW ways: {EPOCHS} epochs, batch {BATCH_SIZE}, lr {LR}, "
        f"weight decay {WEIGHT_DECAY}; default: {default.solver}, {default_epochs} epochs "
        f"(demo.yaml) x {default.hparams.lbfgs_iterations} iterations, decay grid "
        f"{default.decay_grid} (chose {float(default.weight_decay):g}), standardize "
        f"{default.hparams.standardize}, fusion of {len(default.fusion_keys)} keys; per pair "
        f"measured on {measured_pairs} of {len(pairs)} pairs, shared forward on timesteps "
        f"{shared_timesteps}"
    )
    ways = {
        "cached AdamW": ours_scores,
        "shared (of the measured)": shared_scores,
        "per pair (of the measured)": pair_scores,
        "default": default_scores,
    }
    bests = ", ".join(
        f"{way} {key_name(best(scores))} ({max(scores.values()):.3f})"
        for way, scores in ways.items()
    )
    print(
        f"extraction: cached AdamW {ours_extract_s:.1f} s of {ours_s:.1f} s, default "
        f"{default_extract_s:.1f} s of {default_s:.1f} s; best key (val macro-F1): {bests}"
    )
    print_figures(
        ours_s=round(ours_s, 1),
        default_s=round(default_s, 1),
        shared_s=round(shared_s, 1),
        pair_s=round(pair_s, 1),
        ratio_vs_shared=round(shared_s / ours_s, 1),
        ratio_vs_pair=round(pair_s / ours_s, 1),
        same_best_key=str(same).lower(),
        keys_tied_at_top=sum(score == max(ours_scores.values()) for score in ours_scores.values()),
        default_vs_cached_adamw=round(default_s / ours_s, 2),
    )


if __name__ == "__main__":
    main()
