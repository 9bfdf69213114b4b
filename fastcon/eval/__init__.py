"""Evaluation of frozen encoders on the papers' benchmarks, through torchgeo's datasets.

- ``load_encoder``: a run folder, ``encoder.safetensors``, SoftCon / torchgeo release files, a
  torchgeo weights name, or a random initialisation (``encoders``).
- ``open_split`` / ``EvalDataset``: EuroSAT, BigEarthNet v1 / v2 (torchgeo's classes) and the
  run's own held-out tiles, mapped onto the encoder's bands and normalisation (``data``).
- ``extract``, ``linear``, ``knn``, ``ssl4eo``: features (cached) and protocols (``protocols``).
- ``evaluate``: all of it for one dataset, with the SoftCon paper's number beside ours
  (``published.json``, ``runner``).
torchgeo is imported only when a public dataset or a torchgeo weights name is used.
"""

from fastcon.eval.data import DATASETS, SSL4EO_S12, EvalDataset, Normalisation, Source, band_indices, open_split
from fastcon.eval.encoders import Encoder, load_encoder
from fastcon.eval.protocols import PROTOCOLS, extract, knn, linear, ssl4eo
from fastcon.eval.runner import evaluate, published, published_table

__all__ = [
    "DATASETS",
    "PROTOCOLS",
    "SSL4EO_S12",
    "Encoder",
    "EvalDataset",
    "Normalisation",
    "Source",
    "band_indices",
    "evaluate",
    "extract",
    "knn",
    "linear",
    "load_encoder",
    "open_split",
    "published",
    "published_table",
    "ssl4eo",
]
