"""Finding the inputs: which files make up one scene, in which band order.

Three layouts (``layout=``):

- ``"bands"``: one file per band (JP2 or GeoTIFF), the band named by a token of the file name
  (``T33UUU_20170216T102101_B8A.jp2``, ``..._B01.tif``, ``..._VV.tif``); files whose names agree
  apart from the band token are one scene.
- ``"multiband"``: one multi-band raster per scene, bands in band-set order (or named by the
  band descriptions, which are then checked).
- ``"ssl4eo"``: the SSL4EO-S12 folders ``root/{s1,s2a,s2c}/{id}/{season}/{band}.tif``; the
  band set picks the sub-folder, each ``{id}/{season}`` folder is a scene and ``{id}`` its place.
- ``"auto"`` picks one of these from what the paths hold.

Problems that concern one scene (a missing band, a band given twice) are returned with the
scene's name rather than raised, so a run can skip that scene and report it.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

from fastcon.data.bands import BandSet

LAYOUTS = ("auto", "bands", "multiband", "ssl4eo")
RASTER_EXTENSIONS = (".tif", ".tiff", ".jp2", ".vrt")


class InputError(ValueError):
    """An input (named in the message) cannot be turned into tiles."""


@dataclass(frozen=True)
class SceneInput:
    """One scene to tile: its name, the place it shows, and its files in band order."""

    key: str  # unique and stable; tile ids derive from it
    location: str  # scenes of the same place (e.g. SSL4EO seasons) share it
    files: tuple[str, ...]  # one per band, or a single multi-band file
    multiband: bool = False

    @property
    def tile_prefix(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.key).strip("-")


def _raster_files(path: str) -> list[str]:
    if os.path.isdir(path):
        found = []
        for dirpath, _, names in os.walk(path):
            found += [os.path.join(dirpath, n) for n in names if n.lower().endswith(RASTER_EXTENSIONS)]
        return sorted(found)
    if os.path.isfile(path):
        return [path]
    matches = sorted(glob.glob(path, recursive=True))
    if not matches:
        raise FileNotFoundError(f"input {path!r} does not exist (not a file, a folder or a matching glob pattern)")
    return [m for m in matches if os.path.isfile(m) and m.lower().endswith(RASTER_EXTENSIONS)]


def _root_of(paths: list[str]) -> str:
    """The folder that input names are relative to."""
    dirs = [p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)) for p in paths]
    return os.path.commonpath([os.path.abspath(d) for d in dirs])


def _split_band_token(path: str, band_set: BandSet) -> tuple[str | None, str]:
    """(band, scene name) of a per-band file: the name with its band token taken out."""
    stem = os.path.splitext(os.path.basename(path))[0]
    parts = re.split(r"([_\-. ]+)", stem)  # words at even positions, separators between them
    for i in range(len(parts) - 1, -1, -2):  # re.split with a group: always an odd count
        band = band_set.match_token(parts[i])
        if band is not None:
            rest = parts[: max(i - 1, 0)] + parts[i + 1 :] if i else parts[2:]
            return band, "".join(rest).strip("_-. ")
    return None, stem


def _find_bands_layout(files, root, band_set):
    groups: dict[tuple[str, str], dict[str, list[str]]] = {}
    for f in files:
        band, name = _split_band_token(f, band_set)
        if band is None:
            continue  # not a band of this set (a preview, a mask, ...)
        rel_dir = os.path.relpath(os.path.dirname(os.path.abspath(f)), root)
        key = os.path.normpath(os.path.join(rel_dir, name)) if name else os.path.normpath(rel_dir)
        groups.setdefault((key, os.path.dirname(os.path.abspath(f))), {}).setdefault(band, []).append(f)
    return _complete_groups(groups, band_set, location_of=lambda key: key)


def _complete_groups(groups, band_set, location_of):
    scenes, problems = [], []
    for (key, folder), by_band in sorted(groups.items()):
        missing = [b for b in band_set.bands if b not in by_band]
        doubled = {b: fs for b, fs in by_band.items() if len(fs) > 1}
        if missing:
            problems.append(
                (
                    key,
                    f"input {key} ({folder}): missing band(s) {', '.join(missing)} of band set "
                    f"{band_set.name!r}; found {', '.join(b for b in band_set.bands if b in by_band) or 'none'}",
                )
            )
        elif doubled:
            b, fs = next(iter(doubled.items()))
            problems.append((key, f"input {key}: band {b} is given by more than one file: {', '.join(fs)}"))
        else:
            files = tuple(by_band[b][0] for b in band_set.bands)
            scenes.append(SceneInput(key=key, location=location_of(key), files=files))
    return scenes, problems


def _ssl4eo_split_dir(path: str, band_set: BandSet) -> str | None:
    if os.path.isdir(os.path.join(path, band_set.name)):
        return os.path.join(path, band_set.name)
    if os.path.basename(os.path.normpath(path)) == band_set.name and os.path.isdir(path):
        return path
    return None


def _find_ssl4eo(paths, band_set):
    groups = {}
    for p in paths:
        split_dir = _ssl4eo_split_dir(p, band_set)
        if split_dir is None:
            raise FileNotFoundError(
                f"input {p!r} is not an SSL4EO-S12 folder: expected {os.path.join(p, band_set.name)}/{{id}}/{{season}}/{{band}}.tif"
            )
        for loc in sorted(os.listdir(split_dir)):
            loc_dir = os.path.join(split_dir, loc)
            if not os.path.isdir(loc_dir):
                continue
            for season in sorted(os.listdir(loc_dir)):
                season_dir = os.path.join(loc_dir, season)
                if not os.path.isdir(season_dir):
                    continue
                key = f"{band_set.name}/{loc}/{season}"
                by_band = groups.setdefault((key, season_dir), {})
                for name in sorted(os.listdir(season_dir)):
                    if not name.lower().endswith(RASTER_EXTENSIONS):
                        continue
                    band = band_set.match_token(os.path.splitext(name)[0])
                    if band is not None:
                        by_band.setdefault(band, []).append(os.path.join(season_dir, name))
    return _complete_groups(groups, band_set, location_of=lambda key: key.split("/")[1])


def find_inputs(paths, band_set: BandSet, layout: str = "auto") -> tuple[list[SceneInput], list[tuple[str, str]]]:
    """Scenes found under ``paths`` (files, folders or glob patterns), and per-scene problems.

    Returns ``(scenes, problems)``; ``problems`` is a list of ``(name, message)``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("inputs must name at least one file or folder")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}")
    if layout == "auto":
        if all(_ssl4eo_split_dir(p, band_set) for p in paths):
            layout = "ssl4eo"
        else:
            files = [f for p in paths for f in _raster_files(p)]
            layout = "bands" if any(_split_band_token(f, band_set)[0] for f in files) else "multiband"
    if layout == "ssl4eo":
        scenes, problems = _find_ssl4eo(paths, band_set)
    else:
        files = sorted({f for p in paths for f in _raster_files(p)})
        root = _root_of(paths)
        if layout == "bands":
            scenes, problems = _find_bands_layout(files, root, band_set)
        else:
            scenes = []
            for f in files:
                key = os.path.splitext(os.path.relpath(os.path.abspath(f), root))[0]
                scenes.append(SceneInput(key=key, location=key, files=(f,), multiband=True))
            problems = []
    if not scenes and not problems:
        raise FileNotFoundError(
            f"no {layout!r} inputs of band set {band_set.name!r} found in {', '.join(paths)} "
            f"(raster files end with {', '.join(RASTER_EXTENSIONS)})"
        )
    prefixes = {}
    for s in scenes:
        if s.tile_prefix in prefixes:
            raise ValueError(f"inputs {prefixes[s.tile_prefix]} and {s.key} would give the same tile ids")
        prefixes[s.tile_prefix] = s.key
    return scenes, problems
