"""SSL4EO-S12 scene-level multi-labels (SoftCon's "SSL4EO-S12-ML"): a JSON of Dynamic World classes.

The file maps ``{location_id: {season_id: ["0", "4", ...]}}``: the class indices (strings or
integers) of each season of each location, in the order of the label scheme (Dynamic World:
water, trees, grass, flooded_vegetation, crops, shrub_and_scrub, built, bare, snow_and_ice).
An empty list means the season has no label.

``SceneLabels(path, scheme)`` matches it to the scenes ``find_inputs`` found in the v1 layout
``ROOT/{band_set}/{location}/{season}/{band}.tif`` (scene key ``{band_set}/{location}/{season}``):
a season is matched by its folder name, or else by its position (``"0"``..``"3"``) among the
location's season folders sorted by name. ``select`` drops the scenes without a label (absent
from the JSON, or an empty list) and counts them, unless asked to keep them unlabelled;
locations in the JSON but not on disk are ignored. Every tile of a scene gets the scene's
classes: its label fractions are split evenly among them (each ``1 / n``, so a tile's
fractions sum to 1 and each class is above any multi-hot threshold under ``1 / n``).
"""

from __future__ import annotations

import json
import os

from fastcon.data.landcover import LANDCOVER_SCHEMES


class SceneLabels:
    """Scene-level class lists from an SSL4EO-S12-ML JSON (picklable: plain dicts)."""

    def __init__(self, path, scheme: str = "dynamicworld"):
        path = os.fspath(path)
        if scheme not in LANDCOVER_SCHEMES:
            raise ValueError(f"label_scheme must be one of {', '.join(map(repr, LANDCOVER_SCHEMES))}; got {scheme!r}")
        codes = sorted(LANDCOVER_SCHEMES[scheme])
        self.path, self.scheme = path, scheme
        self.class_names = tuple(LANDCOVER_SCHEMES[scheme][c] for c in codes)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"labels_json {path} does not exist")
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"labels_json {path} is not readable JSON: {e}") from e
        if not isinstance(doc, dict):
            raise ValueError(
                f"labels_json {path}: expected {{location_id: {{season_id: [class, ...]}}}}, got a {type(doc).__name__}"
            )
        self.labels: dict[str, dict[str, list[int]]] = {}
        for loc, seasons in doc.items():
            if not isinstance(seasons, dict):
                raise ValueError(
                    f"labels_json {path}: location {loc!r} maps to a {type(seasons).__name__}, not {{season_id: [...]}}"
                )
            self.labels[str(loc)] = {}
            for season, classes in seasons.items():
                self.labels[str(loc)][str(season)] = self._indices(classes, f"{loc}/{season}", len(codes))

    def _indices(self, classes, where: str, k: int) -> list[int]:
        if not isinstance(classes, list):
            raise ValueError(f"labels_json {self.path}: {where} must be a list of class indices, got {classes!r}")
        out = []
        for c in classes:
            try:
                i = int(c)
            except (TypeError, ValueError):
                raise ValueError(f"labels_json {self.path}: {where} has class {c!r}, not an index 0..{k - 1}") from None
            if not 0 <= i < k:
                raise ValueError(f"labels_json {self.path}: {where} has class {i}, outside 0..{k - 1} ({self.scheme})")
            if i not in out:
                out.append(i)
        return sorted(out)

    def describe(self) -> dict:
        return {"labels_json": os.path.abspath(self.path), "scheme": self.scheme}

    def for_scene(self, key: str, seasons_of_location: list[str]) -> list[int]:
        """The class indices of scene ``{band_set}/{location}/{season}``; [] when it has none."""
        parts = key.split("/")
        loc, season = parts[-2], parts[-1]
        by_season = self.labels.get(loc)
        if by_season is None:
            return []
        if season in by_season:
            return by_season[season]
        position = str(seasons_of_location.index(season)) if season in seasons_of_location else None
        return by_season.get(position, [])

    def select(self, scenes, keep_unlabelled: bool = False):
        """(scenes to tile, {scene key: class indices}, number of unlabelled scenes skipped)."""
        seasons: dict[str, list[str]] = {}
        for s in scenes:
            seasons.setdefault(s.location, []).append(s.key.split("/")[-1])
        for v in seasons.values():
            v.sort()
        keep, classes, skipped = [], {}, 0
        for s in scenes:
            c = self.for_scene(s.key, seasons[s.location])
            if c or keep_unlabelled:
                keep.append(s)
                classes[s.key] = c
            else:
                skipped += 1
        return keep, classes, skipped


def tile_counts(classes: list[int], num_classes: int, num_tiles: int, tile_size: int) -> list[list[int]]:
    """Per-tile class pixel counts that give each of the scene's classes the fraction 1 / n."""
    row = [0] * num_classes
    for c in classes:
        row[c] = (tile_size * tile_size) // len(classes)
    return [list(row) for _ in range(num_tiles)]
