"""Where a plane's pixels lie in space: pixel size, unit and origin, read from a file and written to every output.

A stain is only useful beside its input: a stained OME-Zarr or TIFF must say the same pixel size
(and, for OME-Zarr, the same origin) as the dark-field it came from, or napari, QuPath and Fiji
show the two at different sizes or places. What is read:

- OME-TIFF: ``PhysicalSizeX/Y`` and their units in the OME-XML;
- SVS: ``MPP`` (micrometres per pixel) in the Aperio description;
- ImageJ TIFF: the resolution tags in the hyperstack's ``unit`` (``micron``, ``nm``, ...);
- any other TIFF: the resolution tags (XResolution, YResolution) in inches or centimetres
  (NDPI writes centimetres); a TIFF whose resolution unit is "none" says nothing;
- OME-Zarr: level 0's ``scale`` and ``translation``, the dataset's transforms then the
  multiscale-wide ones (NGFF 0.4 and 0.5), with the Y and X axes' units.

Units are NGFF's (UDUNITS-2) names, e.g. ``"micrometer"``. A pyramid made by 2 x 2 means puts
level ``l``'s first pixel centre half a pixel of that level further in (:meth:`Calibration.level`).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

# NGFF unit names for the spellings files use, and each in micrometres
_UNIT_NAMES = {
    "micrometer": "micrometer", "µm": "micrometer", "um": "micrometer", "μm": "micrometer", "micron": "micrometer",
    "\\u00b5m": "micrometer", "nanometer": "nanometer", "nm": "nanometer", "millimeter": "millimeter",
    "mm": "millimeter", "centimeter": "centimeter", "cm": "centimeter", "meter": "meter", "m": "meter",
    "angstrom": "angstrom", "å": "angstrom",
}
MICROMETRES = {"nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6,
               "angstrom": 1e-4}
_TIFF_UNIT_MICROMETRES = {2: 25_400.0, 3: 10_000.0}  # ResolutionUnit: 2 inch, 3 centimetre (1: none)


@dataclass(frozen=True)
class Calibration:
    """Pixel size and origin of a plane's level 0, ``(y, x)``.

    Attributes
    ----------
    pixel_size : tuple of float
        Height and width of one pixel, in ``unit``; positive and finite.
    unit : str or None
        NGFF unit name (``"micrometer"``, ``"nanometer"``, ...); None when the
        file gives sizes without a unit.
    origin : tuple of float
        Where level 0's first pixel centre lies, in ``unit`` (OME-Zarr ``translation``).
    """

    pixel_size: tuple[float, float]
    unit: str | None = "micrometer"
    origin: tuple[float, float] = (0.0, 0.0)

    def level(self, level: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """``(scale, translation)`` of pyramid level ``level``, each level the 2 x 2 mean of the one above.

        The mean of level 0's pixels 0 and 1 lies at their midpoint, so level 1's first pixel
        centre is half a level-0 pixel in from level 0's; level ``l``'s is ``(2**l - 1) / 2`` in.
        """
        factor = 2**level
        scale = tuple(size * factor for size in self.pixel_size)
        translation = tuple(origin + (factor - 1) / 2 * size for origin, size in zip(self.origin, self.pixel_size))
        return scale, translation

    def micrometres(self) -> tuple[float, float] | None:
        """The pixel size in micrometres, or None when the unit is not a known length."""
        factor = MICROMETRES.get(self.unit) if self.unit else None
        return None if factor is None else (self.pixel_size[0] * factor, self.pixel_size[1] * factor)


def unit_name(unit: str | None) -> str | None:
    """The NGFF name of a unit as files spell it (``"µm"``, ``"micron"`` -> ``"micrometer"``); None if unknown."""
    if not unit:
        return None
    return _UNIT_NAMES.get(str(unit).strip().lower())


def _made(pixel_size, unit, origin=(0.0, 0.0)) -> Calibration | None:
    """A Calibration, or None where the sizes are missing, zero, negative or not finite (nothing to trust)."""
    try:
        size = (float(pixel_size[0]), float(pixel_size[1]))
        start = (float(origin[0]), float(origin[1]))
    except (TypeError, ValueError, IndexError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in size) or not all(math.isfinite(v) for v in start):
        return None
    return Calibration(size, unit, start)


def from_tiff(tif) -> Calibration | None:
    """The calibration an open ``tifffile.TiffFile`` states, or None (see the module's list)."""
    if tif.is_ome:
        found = _from_ome_xml(tif.ome_metadata)
        if found is not None:
            return found
    page = tif.pages.first
    if tif.is_svs:  # "Aperio Image Library ...|AppMag = 40|MPP = 0.2520|..."
        mpp = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
        if mpp is not None:
            return _made((mpp.group(1), mpp.group(1)), "micrometer")
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    x_per, y_per = (_rational(tags[name].value) for name in ("XResolution", "YResolution"))
    if not x_per or not y_per:
        return None
    if tif.is_imagej:
        unit = unit_name((tif.imagej_metadata or {}).get("unit"))
        return None if unit is None else _made((1 / y_per, 1 / x_per), unit)
    per_unit = _TIFF_UNIT_MICROMETRES.get(int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2)
    return None if per_unit is None else _made((per_unit / y_per, per_unit / x_per), "micrometer")


def _rational(value) -> float | None:
    try:
        numerator, denominator = value
        return numerator / denominator if denominator else None
    except (TypeError, ValueError):
        return None


def _from_ome_xml(xml: str | None) -> Calibration | None:
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib or "PhysicalSizeY" not in pixels.attrib:
        return None
    unit_x = unit_name(pixels.get("PhysicalSizeXUnit", "µm"))  # OME's default unit is the micrometre
    unit_y = unit_name(pixels.get("PhysicalSizeYUnit", "µm"))
    if unit_x is None or unit_y is None:
        return None
    size_y = float(pixels.get("PhysicalSizeY")) * MICROMETRES[unit_y] / MICROMETRES[unit_x]  # in X's unit
    return _made((size_y, pixels.get("PhysicalSizeX")), unit_x)


def from_ngff(entry: dict, names: list[str]) -> Calibration | None:
    """Level 0's calibration from an NGFF ``multiscales`` entry whose axes are ``names`` (upper case)."""
    if "Y" not in names or "X" not in names:
        return None
    scale, offset = placement(entry, len(names))
    y, x = names.index("Y"), names.index("X")
    axes = [a if isinstance(a, dict) else {"name": a} for a in entry.get("axes", [])]
    units = [unit_name(axes[i].get("unit")) if i < len(axes) else None for i in (y, x)]
    if scale[y] == scale[x] == 1.0 and offset[y] == offset[x] == 0.0 and units == [None, None]:
        return None  # nothing stated
    return _made((scale[y], scale[x]), units[1] or units[0], (offset[y], offset[x]))


def placement(entry: dict, ndim: int) -> tuple[list[float], list[float]]:
    """Level 0's scale and offset per axis: its dataset's transforms, then the multiscale-wide ones after them."""
    scale, offset = [1.0] * ndim, [0.0] * ndim
    for transforms in (entry["datasets"][0].get("coordinateTransformations", []),
                       entry.get("coordinateTransformations", [])):
        for t in transforms:
            if t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
                scale = [v * float(s) for v, s in zip(scale, t["scale"])]
                offset = [v * float(s) for v, s in zip(offset, t["scale"])]
            elif t.get("type") == "translation" and len(t.get("translation", [])) == ndim:
                offset = [v + float(s) for v, s in zip(offset, t["translation"])]
    return scale, offset


def tiff_options(calibration: Calibration | None, axes: str) -> dict:
    """``tifffile.imwrite`` keywords that record ``calibration``: resolution tags (centimetres) and,
    for a plane or a ``Z``/``TZ`` stack (``axes`` as tifffile names them, e.g. ``"YXS"``), OME-XML."""
    if calibration is None:
        return {}
    size = calibration.micrometres()
    if size is None:
        return {}
    options = {"resolution": (1e4 / size[1], 1e4 / size[0]), "resolutionunit": "CENTIMETER"}
    if axes in ("YX", "YXS", "ZYX", "ZYXS", "TZYX", "TZYXS"):
        options["ome"] = True
        options["metadata"] = {"axes": axes, "PhysicalSizeX": size[1], "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": size[0], "PhysicalSizeYUnit": "µm"}
    return options
