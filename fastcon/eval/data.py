"""Evaluation datasets through torchgeo's own classes, mapped onto an encoder's bands and normalisation.

``open_split(name, root, split, modality)`` gives a ``Source``: a dataset whose items are
``{"image": float (C, H, W) in the source's own units, "label": ...}`` (torchgeo's item format),
the source's band names in their stored order, the class names and the task (``multilabel`` or
``multiclass``). ``EvalDataset(source, encoder_bands, norm, size)`` turns it into what the
encoder eats: bands picked by name in the encoder's order, normalised, resized.

- ``eurosat``: ``torchgeo.datasets.EuroSAT`` (13-band GeoTIFFs, 10 classes, top-1 accuracy).
  torchgeo lists the bands of those files as B01..B12 with B8A *last*; they are picked by
  those names.
- ``bigearthnet``: ``torchgeo.datasets.BigEarthNet`` v1, 19 classes, ``s2`` (12 bands, no B10:
  a 13-band encoder gets B10 as a zero band in the source units before normalisation, as the
  SSL4EO-S12 benchmark code does) or ``s1`` (torchgeo reads the VH and VV files sorted by name:
  VH first).
- ``bigearthnet-v2``: ``torchgeo.datasets.BigEarthNetV2`` (reBEN, ``metadata.parquet``).
- ``sample``: the run's own prepared folder, split spatially as in pretraining (see
  ``sample_split``).

Normalisation (``Normalisation``): per encoder band ``(x - mean) / std`` in the source units.
From a run's ``stats.json`` (stored units, converted with the band set's offset / scale), or
the SSL4EO-S12 statistics for released weights (``SSL4EO_S12``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastcon.models.bands import S1_BANDS, S2_L1C_BANDS

DATASETS = ("sample", "eurosat", "bigearthnet", "bigearthnet-v2")
MODALITIES = ("s2", "s1")

# SSL4EO-S12 statistics, as torchgeo attaches them to the SoftCon / SSL4EO-S12 weights
# (torchgeo/models/resnet.py: _mean_s2/_std_s2 from the SSL4EO-S12 repository's benchmark code,
# Sentinel-2 L1C digital numbers; _mean_s1/_std_s1 from DeCUR, Sentinel-1 backscatter in dB)
_S2_MEAN = (1612.9, 1397.6, 1322.3, 1373.1, 1561.0, 2108.4, 2390.7, 2318.7, 2581.0, 837.7, 22.0, 2195.2, 1537.4)
_S2_STD = (791.0, 854.3, 878.7, 1144.9, 1127.5, 1164.2, 1276.0, 1249.5, 1345.9, 577.5, 47.5, 1340.0, 1142.9)
SSL4EO_S12 = {
    **{b: (m, s) for b, m, s in zip(S2_L1C_BANDS, _S2_MEAN, _S2_STD)},
    "VV": (-12.59, 5.26),
    "VH": (-20.26, 5.91),
}


def band_name(name: str) -> str:
    """Our spelling of a band name: B01 -> B1, B08A / B8a -> B8A, vv -> VV."""
    n = name.upper()
    m = re.fullmatch(r"B0*(\d+)(A?)", n)
    return f"B{int(m.group(1))}{m.group(2)}" if m else n


def band_indices(source_bands, encoder_bands) -> list[int | None]:
    """For each encoder band, its index in ``source_bands``, or None for a zero band (B10 only)."""
    src = [band_name(str(b)) for b in source_bands]
    out = []
    for b in encoder_bands:
        name = band_name(str(b))
        if name in src:
            out.append(src.index(name))
        elif name == "B10":  # cirrus: not in L2A products (BigEarthNet); SSL4EO feeds zeros
            out.append(None)
        else:
            raise ValueError(
                f"the encoder's band {b!r} is not in the dataset (bands {', '.join(src)}); "
                "pick the matching --modality or an encoder of these bands"
            )
    return out


@dataclass(frozen=True)
class Normalisation:
    """Per-band mean and std in the source units, in the encoder's band order."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @classmethod
    def ssl4eo(cls, bands) -> Normalisation:
        names = [band_name(str(b)) for b in bands]
        unknown = [b for b in names if b not in SSL4EO_S12]
        if unknown:
            raise ValueError(f"no SSL4EO-S12 statistics for bands {unknown}")
        return cls(
            tuple(SSL4EO_S12[b][0] for b in names), tuple(SSL4EO_S12[b][1] for b in names), "SSL4EO-S12 statistics"
        )

    @classmethod
    def from_stats(cls, stats: dict, bands, *, offset: float = 0.0, scale: float = 1.0, source: str = "stats.json"):
        """From a prepared folder's stats.json (stored = (value - offset) * scale)."""
        names = [band_name(str(b)) for b in stats["bands"]]
        idx = [names.index(band_name(str(b))) for b in bands]
        mean = tuple(stats["mean"][i] / scale + offset for i in idx)
        # a constant band (std 0) would divide by zero: 1 stored unit instead, as TileDataset does
        std = tuple(max(stats["std"][i], 1.0) / scale for i in idx)
        return cls(mean, std, source)


@dataclass
class Source:
    """One split of a dataset in its own band order and units."""

    name: str
    split: str
    dataset: torch.utils.data.Dataset
    bands: tuple[str, ...]
    classes: tuple[str, ...]
    task: str  # "multilabel" | "multiclass"
    subset: np.ndarray | None = None  # indices into dataset, if not all of it

    def __len__(self):
        return len(self.dataset) if self.subset is None else len(self.subset)

    def item(self, i: int) -> dict:
        return self.dataset[int(i) if self.subset is None else int(self.subset[i])]


def _torchgeo_datasets():
    try:
        import torchgeo.datasets as tgd
    except ImportError as e:  # pragma: no cover - the eval extra installs it
        raise ImportError(f"evaluation on public datasets needs torchgeo: pip install 'fastcon[eval]' ({e})") from e
    return tgd


# what torchgeo's classes look for under ROOT (they download nothing here: download=False)
LAYOUTS = {
    "eurosat": "EuroSAT: ROOT/ds/images/remote_sensing/otherDatasets/sentinel_2/tif/{Class}/{Class}_{n}.tif "
    "(or ROOT/EuroSATallBands.zip) and ROOT/eurosat-{train,val,test}.txt",
    "bigearthnet": "BigEarthNet v1: ROOT/BigEarthNet-v1.0/{patch}/ (S2) or ROOT/BigEarthNet-S1-v1.0/{patch}/ (S1), "
    "or their .tar.gz, and ROOT/bigearthnet-{train,val,test}.csv",
    "bigearthnet-v2": "BigEarthNetV2 (reBEN): ROOT/metadata.parquet, ROOT/BigEarthNet-S2/ or ROOT/BigEarthNet-S1/ "
    "and ROOT/Reference_Maps/",
}


def open_split(name: str, root: str, split: str, modality: str = "s2") -> Source:
    """``split`` (train / val / test) of a public dataset under ``root`` through torchgeo's class."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}; got {modality!r}")
    if name not in LAYOUTS:
        raise ValueError(f"dataset must be one of {', '.join(LAYOUTS)}; got {name!r}")
    tgd = _torchgeo_datasets()
    try:
        return _open(tgd, name, root, split, modality)
    except tgd.DatasetNotFoundError as e:
        raise FileNotFoundError(f"{name} split {split!r} not found under {root}: expected {LAYOUTS[name]}") from e


def _open(tgd, name: str, root: str, split: str, modality: str) -> Source:
    if name == "eurosat":
        if modality != "s2":
            raise ValueError("EuroSAT is Sentinel-2 only: use --modality s2")
        ds = tgd.EuroSAT(root, split=split)
        return Source(name, split, ds, tuple(map(band_name, ds.all_band_names)), tuple(ds.classes), "multiclass")
    # both BigEarthNet classes read a patch's band files sorted by name (S1: VH before VV) or
    # by torchgeo's sort_sentinel2_bands (B01..B08, B8A, B09, B11, B12: no B10 in L2A)
    bands = ("VH", "VV") if modality == "s1" else tuple(b for b in S2_L1C_BANDS if b != "B10")
    if name == "bigearthnet":
        ds = tgd.BigEarthNet(root, split=split, bands=modality, num_classes=19)
        return Source(name, split, ds, bands, tuple(ds.class_sets[19]), "multilabel")
    if name == "bigearthnet-v2":
        ds = tgd.BigEarthNetV2(root, split=split, bands=modality)
        return Source(name, split, ds, bands, tuple(ds.class_set), "multilabel")
    raise AssertionError(name)


def fraction_subset(n: int, fraction: float, seed: int = 42) -> np.ndarray:
    """The SSL4EO-S12 benchmark's training subset: ``default_rng(seed).choice(n, int(fraction * n))``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(n)
    return np.random.default_rng(seed).choice(n, int(fraction * n), replace=False)


class EvalDataset(torch.utils.data.Dataset):
    """Items ``(image (C_enc, size, size) float32 normalised, target float32)`` of a ``Source``.

    Targets: multi-hot (C,) for multi-label data, one-hot (C,) for multi-class data.
    """

    def __init__(self, source: Source, encoder_bands, norm: Normalisation, size: int):
        self.source = source
        self.index = band_indices(source.bands, encoder_bands)
        if len(norm.mean) != len(self.index):
            raise ValueError(f"normalisation has {len(norm.mean)} bands, the encoder {len(self.index)}")
        self.mean = torch.tensor(norm.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(norm.std, dtype=torch.float32)[:, None, None]
        self.size = size

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        item = self.source.item(i)
        image = item["image"].float()
        zero = image.new_zeros(image.shape[1:])
        x = torch.stack([image[j] if j is not None else zero for j in self.index])
        x = (x - self.mean) / self.std
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        label = torch.as_tensor(item["label"])
        if self.source.task == "multiclass":
            y = F.one_hot(label.long().reshape(()), len(self.source.classes)).float()
        else:
            y = label.float().reshape(-1)
        return x, y


# --------------------------------------------------------------------------------------------
# the run's own held-out tiles


class _Tiles(torch.utils.data.Dataset):
    """Tiles of a prepared folder in source units (stored / scale + offset) with their multi-hot labels."""

    def __init__(self, tiles, indices):
        self.tiles, self.indices, self.root = tiles, indices, tiles.root
        enc = tiles.info.get("encoding", {})
        self.offset, self.scale = float(enc.get("offset", 0.0)), float(enc.get("scale", 1.0))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        item = self.tiles[int(self.indices[i])]
        image = torch.as_tensor(item["image"]).float() / self.scale + self.offset
        return {"image": image, "label": torch.as_tensor(item["multihot"])}


def sample_split(root: str, split: str, *, holdout_fraction: float | None, holdout_axis: str = "x") -> Source:
    """A prepared folder split as pretraining split it: ``test`` = the spatially held-out part
    (the east quarter by default) that pretraining never saw, ``train`` = the rest; no ``val``
    (the probe's L2 weight is then chosen by cross-validation on ``train``)."""
    from fastcon.data import TileDataset, spatial_split

    if split not in ("train", "test"):
        raise ValueError(f"the sample dataset has the splits train and test, not {split!r}")
    tiles = TileDataset(root)
    fraction = holdout_fraction if holdout_fraction is not None else 0.25
    train_idx, test_idx = spatial_split(tiles, fraction, axis=holdout_axis)
    indices = np.asarray(train_idx if split == "train" else test_idx)
    return Source("sample", split, _Tiles(tiles, indices), tiles.band_names, tiles.class_names, "multilabel")


def run_normalisation(root: str, bands) -> Normalisation:
    """A prepared folder's stats.json (what pretraining normalised with) in source units, for ``bands``."""
    import json
    import os

    with open(os.path.join(root, "dataset.json")) as f:
        enc = json.load(f).get("encoding", {})
    with open(os.path.join(root, "stats.json")) as f:
        stats = json.load(f)
    return Normalisation.from_stats(
        stats,
        bands,
        offset=float(enc.get("offset", 0.0)),
        scale=float(enc.get("scale", 1.0)),
        source=os.path.join(root, "stats.json"),
    )


def default_bands(in_chans: int) -> tuple[str, ...]:
    if in_chans == len(S2_L1C_BANDS):
        return S2_L1C_BANDS
    if in_chans == len(S1_BANDS):
        return S1_BANDS
    if in_chans == len(S2_L1C_BANDS) - 1:
        return tuple(b for b in S2_L1C_BANDS if b != "B10")
    raise ValueError(f"no default band list for {in_chans} input channels")
