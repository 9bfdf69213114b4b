"""Band registry: names and centre wavelengths of the Sentinel-2 and Sentinel-1 bands.

The first conv / patch embedding of a 3-channel (RGB) checkpoint is adapted to a band list by
wavelength, so a model needs to know what each of its input channels is. Bands are named as in
the data pipeline: Sentinel-2 ``B1``..``B12`` with ``B8A`` after ``B8``; Sentinel-1 ``VV``, ``VH``.
A band can also be given as a number, its centre wavelength in nm (for other sensors), and a
whole list as a band set of the data pipeline (``"s2c"``, ``"s2a"``, ``"s1"`` or a ``BandSet``),
e.g. ``create_encoder(name, bands=loader.dataset.band_names)`` or ``bands="s2a"``.
"""

from __future__ import annotations

import numbers

# Sentinel-2 MSI centre wavelengths (nm), in product order (L1C has all 13, L2A drops B10).
S2_WAVELENGTHS_NM = {
    "B1": 443.0,
    "B2": 490.0,
    "B3": 560.0,
    "B4": 665.0,
    "B5": 705.0,
    "B6": 740.0,
    "B7": 783.0,
    "B8": 842.0,
    "B8A": 865.0,
    "B9": 945.0,
    "B10": 1375.0,
    "B11": 1610.0,
    "B12": 2190.0,
}
S2_L1C_BANDS = tuple(S2_WAVELENGTHS_NM)
S2_L2A_BANDS = tuple(b for b in S2_L1C_BANDS if b != "B10")
# Sentinel-1 C-band SAR polarisations: no optical wavelength (5.55 cm).
S1_BANDS = ("VV", "VH")

# Channels of an RGB checkpoint, in order, and the Sentinel-2 band each one stands for.
RGB_WAVELENGTHS_NM = (665.0, 560.0, 490.0)  # R, G, B
RGB_TO_S2 = ("B4", "B3", "B2")
# A custom (numeric) band takes an RGB filter only if it is this close to the RGB wavelength.
RGB_MATCH_TOLERANCE_NM = 30.0

# Default band lists by channel count, so ``in_chans=13`` / ``12`` / ``2`` / ``3`` needs no band list.
DEFAULT_BANDS = {13: S2_L1C_BANDS, 12: S2_L2A_BANDS, 3: RGB_TO_S2, 2: S1_BANDS}

Band = str | float


def wavelength(band: Band) -> float | None:
    """Centre wavelength in nm of a band name or number; None for SAR bands."""
    if isinstance(band, numbers.Real) and not isinstance(band, bool):
        return float(band)
    name = band.upper()
    if name in S2_WAVELENGTHS_NM:
        return S2_WAVELENGTHS_NM[name]
    return None  # VV / VH


def resolve_bands(bands, in_chans: int | None = None, *, required: bool = True) -> tuple[Band, ...] | None:
    """Check a band list (names or wavelengths in nm) against ``in_chans``; fill in the default list.

    Returns band names upper-cased (``"b8a"`` -> ``"B8A"``) and wavelengths as floats. Without a
    list and without a default for ``in_chans``: an error, or None when not ``required``.
    """
    if bands is None:
        if in_chans is None or in_chans not in DEFAULT_BANDS:
            if not required:
                return None
            raise ValueError(
                f"bands must be given for in_chans={in_chans} (defaults exist for "
                f"{', '.join(f'{c} ({DEFAULT_BANDS[c][0]}..{DEFAULT_BANDS[c][-1]})' for c in DEFAULT_BANDS)})"
            )
        return DEFAULT_BANDS[in_chans]
    if isinstance(bands, str):  # a band set of the data pipeline: "s2c", "s2a", "s1", ...
        from fastcon.data.bands import get_band_set

        bands = get_band_set(bands).bands
    elif hasattr(bands, "bands") and hasattr(bands, "resolution_m"):  # a fastcon.data BandSet
        bands = bands.bands
    if not hasattr(bands, "__iter__"):
        raise TypeError(f"bands must be a list of band names or wavelengths, got {type(bands).__name__}")
    out = []
    for b in bands:
        if isinstance(b, str):
            name = b.upper()
            if name not in S2_WAVELENGTHS_NM and name not in S1_BANDS:
                known = ", ".join((*S2_L1C_BANDS, *S1_BANDS))
                raise ValueError(f"bands: unknown band {b!r}; known names are {known}, or give a wavelength in nm")
            out.append(name)
        elif isinstance(b, numbers.Real) and not isinstance(b, bool) and float(b) > 0:
            out.append(float(b))
        else:
            raise ValueError(f"bands: each band must be a name or a positive wavelength in nm, got {b!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"bands must not repeat a band, got {list(bands)}")
    if in_chans is not None and len(out) != in_chans:
        raise ValueError(f"bands has {len(out)} entries but in_chans is {in_chans}")
    if not out:
        raise ValueError("bands must not be empty")
    return tuple(out)


def rgb_positions(bands) -> tuple[int | None, int | None, int | None]:
    """Index in ``bands`` of the band that takes the R, G and B filter (None where no band fits).

    A named Sentinel-2 band list uses B4/B3/B2 exactly. A numeric band takes an RGB filter when it
    is the closest band to that RGB wavelength and within ``RGB_MATCH_TOLERANCE_NM``; SAR bands
    never do.
    """
    out = []
    for rgb_nm, s2_name in zip(RGB_WAVELENGTHS_NM, RGB_TO_S2):
        if s2_name in bands:
            out.append(bands.index(s2_name))
            continue
        best, best_d = None, RGB_MATCH_TOLERANCE_NM
        for i, b in enumerate(bands):
            if isinstance(b, float) and abs(b - rgb_nm) <= best_d:
                best, best_d = i, abs(b - rgb_nm)
        out.append(best)
    taken = [i for i in out if i is not None]
    if len(set(taken)) != len(taken):  # one band closest to two RGB wavelengths: give it to neither
        raise ValueError(f"bands {list(bands)}: one band is the closest match for two RGB channels; name the bands")
    return tuple(out)
