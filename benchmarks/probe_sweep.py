"""Wall time of probing an L x T grid of frozen U-Net features, three ways in the same run.

1. per pair: one probe per (layer, timestep), each re-running the whole backbone on every batch
   of every epoch (a forward hook reads its layer, as a probe script without the suite's early
   stop would; with the early stop, encoder pairs cost less, see ``--truncate-pairs``);
2. shared forward (the DDAE way): one forward per timestep and batch feeds the heads of every
   layer, every epoch;
3. ours: ProbeModule in cached mode, features extracted once (one forward per timestep and
   image), then every epoch trains all heads as one batched operation.

All three train linear heads with AdamW (same learning rate, epochs, batch size, zero initial
weights) on the same images, and choose the best key by validation macro-F1. ``--quick`` measures
the per-pair way on a few pairs and scales its time to the whole grid.
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from harness import argument_parser, print_figures, work_dir

from datamodules import PlanktonDataModule, SyntheticPlankton
from lightning_modules import DiffusionFeatures, DiffusionModule, ProbeModule
from lightning_modules.probes.grid_metrics import GridConfusion, grid_scores

LAYERS = ["enc.0.1", "enc.1.1", "enc.2.1", "mid.1", "dec.2.1", "dec.1.1", "dec.0.1", "dec.0.2"]
TIMESTEPS = [1, 10, 25, 50, 100, 200]
EPOCHS, BATCH_SIZE, LR = 30, 64, 1e-3


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


def train_heads(
    source: DiffusionFeatures, data: PlanktonDataModule, keys: list | None = None
) -> dict:
    """Linear heads for ``keys`` (default: every key of ``source``) trained on features computed
    every batch (the backbone runs each epoch); returns validation macro-F1 per key."""
    keys = keys or source.keys
    dims = source.feature_dims()
    heads = torch.nn.ModuleList(torch.nn.Linear(dims[key], data.num_classes) for key in keys)
    for head in heads:
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=LR, weight_decay=1e-4)
    train = data.dataset("train")
    generator = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        for images, labels, indices in train.loader(BATCH_SIZE, shuffle=True, generator=generator):
            features = source(images, indices)
            loss = sum(
                F.cross_entropy(head(features[key]), labels)
                for head, key in zip(heads, keys, strict=True)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    grid = GridConfusion(len(keys), data.num_classes)
    with torch.no_grad():
        for images, labels, indices in data.dataset("val").loader(256):
            features = source(images, indices)
            preds = [head(features[k]).argmax(-1) for head, k in zip(heads, keys, strict=True)]
            grid.update(torch.stack(preds), labels)
    scores = grid_scores(grid.compute()).macro_f1
    return dict(zip(keys, scores.tolist(), strict=True))


def ours(module: DiffusionModule, data: PlanktonDataModule, cache_dir: str) -> dict:
    source = DiffusionFeatures.from_unet(
        module.ema, module.schedule, layers=LAYERS, timesteps=TIMESTEPS
    )
    probe = ProbeModule(
        source, num_classes=data.num_classes, lr=LR, standardize="none", fusion_top_k=0,
        cache_dir=cache_dir, extract_batch_size=256,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=EPOCHS, default_root_dir=cache_dir,
    )  # fmt: skip
    trainer.fit(probe, data)
    return dict(zip(probe.keys, probe.val_macro_f1.tolist(), strict=True))


def best(scores: dict) -> tuple:
    return max(scores, key=scores.get)


def main() -> None:
    parser = argument_parser("Probe-sweep wall time: per pair, shared forward, cached (ours).")
    parser.add_argument(
        "--truncate-pairs",
        action="store_true",
        help="per-pair probes stop the forward at their layer (the suite's early stop)",
    )
    args = parser.parse_args()
    per_class = 30 if args.quick else 120
    measured_pairs = 3 if args.quick else len(LAYERS) * len(TIMESTEPS)
    with work_dir(args.cache_dir) as root:
        spec = SyntheticPlankton(classes=8, per_class=per_class, imbalance=2.0, size=32)
        data = PlanktonDataModule(
            synthetic=spec, image_size=16, batch_size=BATCH_SIZE, cache_dir=str(root / "data"),
            progress=False,
        )  # fmt: skip
        data.setup()
        module = frozen_unet(16)

        start = time.perf_counter()
        ours_scores = ours(module, data, str(root / "features"))
        ours_s = time.perf_counter() - start

        start = time.perf_counter()
        shared_scores = {}
        for t in TIMESTEPS:
            source = DiffusionFeatures.from_unet(
                module.ema, module.schedule, layers=LAYERS, timesteps=[t]
            )
            shared_scores |= train_heads(source, data)
        shared_s = time.perf_counter() - start

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

    same = best(ours_scores) == best(shared_scores)
    if measured_pairs == len(pairs):
        same = same and best(ours_scores) == best(pair_scores)
    print(
        f"{len(LAYERS)} layers x {len(TIMESTEPS)} timesteps, {EPOCHS} epochs, "
        f"{len(data.dataset('train'))} training images at 16 px; per pair measured on "
        f"{measured_pairs} of {len(pairs)} pairs; best key: ours {best(ours_scores)}, "
        f"shared {best(shared_scores)}"
    )
    print_figures(
        ours_s=round(ours_s, 1),
        shared_s=round(shared_s, 1),
        pair_s=round(pair_s, 1),
        ratio_vs_shared=round(shared_s / ours_s, 1),
        ratio_vs_pair=round(pair_s / ours_s, 1),
        same_best_key=str(same).lower(),
    )


if __name__ == "__main__":
    main()
