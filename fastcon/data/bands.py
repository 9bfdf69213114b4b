"""Band sets as data: which bands an input must have, in which order, and how they are stored.

A band set names the bands of one sensor product in the order the tiles store them (the
SSL4EO-S12 order: B1..B12 with B8A after B8), their nominal resolution, the spellings that
file names use for them, and how values are encoded into the uint16 tiles. Adding a sensor is
adding an entry (``register_band_set``), never a new code path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_S2_RESOLUTION = {
    "B1": 60,
    "B2": 10,
    "B3": 10,
    "B4": 10,
    "B5": 20,
    "B6": 20,
    "B7": 20,
    "B8": 10,
    "B8A": 20,
    "B9": 60,
    "B10": 60,
    "B11": 20,
    "B12": 20,
}


@dataclass(frozen=True)
class BandSet:
    """One sensor product's bands.

    ``offset``/``scale`` encode values into uint16 tiles: ``stored = round((value - offset) *
    scale)`` clipped to [0, 65535]; Sentinel-2 digital numbers are stored as they are, Sentinel-1
    backscatter in dB is stored as ``(dB + 50) * 1000``. ``nodata`` is the stored value of a
    missing pixel (0 for both); Sentinel-2 files mark missing pixels with 0.
    """

    name: str
    bands: tuple[str, ...]
    resolution_m: tuple[float, ...]
    description: str = ""
    offset: float = 0.0
    scale: float = 1.0
    nodata: int = 0
    # value that marks a missing pixel in the source files when they declare none (S2: 0)
    source_nodata: float | None = None
    # extra spellings found in file names, e.g. "B01" for "B1"; matched case-insensitively
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.bands) != len(self.resolution_m):
            raise ValueError(
                f"band set {self.name!r}: {len(self.bands)} bands but {len(self.resolution_m)} resolutions"
            )
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"band set {self.name!r}: duplicate band names in {self.bands}")

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    def match_token(self, token: str) -> str | None:
        """The band a file-name token stands for ("B01", "b8a", "VV"), or None."""
        t = token.upper()
        for b in self.bands:
            if t == b.upper():
                return b
        return {k.upper(): v for k, v in self.aliases.items()}.get(t)

    def encoding(self) -> dict:
        return {"offset": self.offset, "scale": self.scale, "nodata": self.nodata, "dtype": "uint16"}


def _s2(name: str, bands: tuple[str, ...], description: str) -> BandSet:
    # Sentinel-2 product files spell bands zero-padded (T33UUU_..._B01.jp2), SSL4EO-S12 does not (B1.tif)
    aliases = {f"B{int(m.group(1)):02d}": b for b in bands if (m := re.fullmatch(r"B(\d+)", b))}
    resolution = tuple(float(_S2_RESOLUTION[b]) for b in bands)
    return BandSet(name, bands, resolution, description, source_nodata=0.0, aliases=aliases)


BAND_SETS: dict[str, BandSet] = {}


def register_band_set(band_set: BandSet, *, replace: bool = False) -> BandSet:
    """Make a band set known by name (to ``prepare`` and the command line)."""
    if not isinstance(band_set, BandSet):
        raise TypeError(f"band_set must be a BandSet, got {type(band_set).__name__}")
    if band_set.name in BAND_SETS and not replace:
        raise ValueError(f"band set {band_set.name!r} is already registered (pass replace=True to redefine it)")
    BAND_SETS[band_set.name] = band_set
    return band_set


register_band_set(
    _s2("s2c", tuple(_S2_RESOLUTION), "Sentinel-2 Level-1C top-of-atmosphere reflectance, 13 bands (SSL4EO-S12 s2c)")
)
register_band_set(
    _s2(
        "s2a",
        tuple(b for b in _S2_RESOLUTION if b != "B10"),
        "Sentinel-2 Level-2A surface reflectance, 12 bands: no B10 (SSL4EO-S12 s2a)",
    )
)
register_band_set(
    BandSet(
        "s1",
        ("VV", "VH"),
        (10.0, 10.0),
        "Sentinel-1 GRD backscatter in dB, VV and VH (SSL4EO-S12 s1), stored as (dB + 50) * 1000",
        offset=-50.0,
        scale=1000.0,
    )
)


def get_band_set(band_set: str | BandSet) -> BandSet:
    """A registered band set by name (or a BandSet itself); an unknown name lists the known ones."""
    if isinstance(band_set, BandSet):
        return band_set
    if not isinstance(band_set, str):
        raise TypeError(f"band_set must be a band-set name or a BandSet, got {type(band_set).__name__}")
    if band_set not in BAND_SETS:
        known = ", ".join(f"{k!r} ({v.num_bands} bands)" for k, v in BAND_SETS.items())
        raise ValueError(f"unknown band set {band_set!r}; known band sets: {known}")
    return BAND_SETS[band_set]
