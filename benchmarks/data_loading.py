"""Images per second of one epoch read from the preprocessed cache, against decoding every file
with PIL on every epoch.

Both paths give the same items (preprocessed image through the evaluation view, label, index)
through the same DataLoader, so the ratio isolates what the cache saves: decoding, padding and
resizing. Building the cache reads every file, so the PIL epoch that follows reads them from the
page cache too: the figures compare CPU work, not disks. The cache build is timed on its own.

Data: the NDSB ISIIS images in ``shared/data/ndsb_isiis`` beside the repository when present, else
a synthetic set of similar size; ``--quick`` uses about 3,000 images.
"""

from __future__ import annotations

import csv
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import argument_parser, print_figures, work_dir
from torch.utils.data import DataLoader, Dataset

from datamodules.datamodule import PlanktonDataModule, PlanktonImages
from datamodules.preprocessing import IMAGE_SUFFIXES, Preprocessing, load_preprocessed
from datamodules.sources import scan
from datamodules.synthetic import SyntheticPlankton, ensure_dataset

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ndsb_isiis"
BATCH_SIZE = 256
QUICK_IMAGES = 3000
# Balanced and source-only, so that the image count is exactly classes x per_class.
SYNTHETIC = SyntheticPlankton(classes=16, per_class=2000, imbalance=1.0, domains=["source"])
QUICK_SYNTHETIC = SyntheticPlankton(classes=12, per_class=250, imbalance=1.0, domains=["source"])


class DecodedImages(Dataset):
    """The items of ``cached``, decoded and preprocessed from the original files on every access."""

    def __init__(self, cached: PlanktonImages, source: str, settings: Preprocessing) -> None:
        # Row i of the cached array holds the i-th record of the source's scan.
        records = scan(source).records
        self.paths = [records[row].path for row in cached.rows]
        self.labels = cached.labels
        self.settings = settings
        self.transform = cached.transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = torch.from_numpy(load_preprocessed(self.paths[index], self.settings))
        return self.transform(image), int(self.labels[index]), index


def dataset_source(root: Path, quick: bool) -> tuple[str, str]:
    """``(source, description)``: the real images when present, else synthetic ones in ``root``."""
    if REAL_DATA.is_dir():
        if not quick:
            return str(REAL_DATA), REAL_DATA.name
        manifest = subset_manifest(REAL_DATA, root / "ndsb_subset.csv", QUICK_IMAGES)
        return str(manifest), f"{REAL_DATA.name}, {QUICK_IMAGES} files"
    spec = QUICK_SYNTHETIC if quick else SYNTHETIC
    manifest = ensure_dataset(spec, root, progress=False)
    return str(manifest), f"synthetic, {spec.classes} x {spec.per_class} images"


def subset_manifest(folder: Path, manifest: Path, count: int) -> Path:
    """A manifest of ``count`` files taken at even steps through ``folder``'s class folders, so
    that the subset keeps the spread of classes and image sizes."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    chosen = files[:: max(1, len(files) // count)][:count]
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows((path, path.parent.name) for path in chosen)
    return manifest


def check_same_items(cached: PlanktonImages, decoded: DecodedImages, samples: int = 8) -> None:
    """The ratio means something only if both paths yield the same tensors."""
    for index in range(0, len(cached), max(1, len(cached) // samples)):
        if not torch.equal(cached[index][0], decoded[index][0]):
            raise RuntimeError(f"item {index}: the decoded image differs from the cached one")


def images_per_second(loader: DataLoader, epochs: int = 1) -> float:
    """The median rate over ``epochs`` epochs: a cached epoch lasts a fraction of a second, so
    one epoch alone is at the mercy of whatever else the machine does in that moment."""
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        count = sum(len(labels) for _, labels, _ in loader)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argument_parser("Epoch throughput of the image cache against PIL decoding.")
    parser.add_argument("--image-size", type=int, default=64, help="side of the cached images")
    args = parser.parse_args()
    # The image cache goes in a fresh folder even under --cache-dir, so that its build is timed
    # on every run; only generated data is kept there.
    with work_dir(args.cache_dir) as root, tempfile.TemporaryDirectory(dir=root) as cache:
        source, description = dataset_source(root, args.quick)
        datamodule = PlanktonDataModule(
            source=source,
            image_size=args.image_size,
            cache_dir=cache,
            num_workers=0,
            progress=False,
        )
        start = time.perf_counter()
        datamodule.setup()
        cache_build_s = time.perf_counter() - start
        cached = datamodule.dataset("train")
        decoded = DecodedImages(cached, source, datamodule.preprocessing)
        check_same_items(cached, decoded)
        # PIL first: timed right after the cache was written, the cached epochs varied 4x from
        # run to run (45,000 to 185,000 img/s), most likely while the kernel flushed it to disk.
        pil_rate = images_per_second(DataLoader(decoded, batch_size=BATCH_SIZE))
        cache_rate = images_per_second(cached.loader(BATCH_SIZE), epochs=5)
    print(
        f"{description}: train split of {len(cached)} images, {datamodule.num_classes} classes, "
        f"{args.image_size} px, batches of {BATCH_SIZE}, num_workers 0"
    )
    print_figures(
        images=len(cached),
        cache_img_per_s=round(cache_rate),
        pil_img_per_s=round(pil_rate),
        speedup=round(cache_rate / pil_rate, 2),
        cache_build_s=round(cache_build_s, 2),
    )


if __name__ == "__main__":
    main()
