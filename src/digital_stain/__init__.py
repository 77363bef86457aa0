"""napari-digital-stain: digital H&E staining of dark-field microscopy.

The library core (:mod:`enhance`, :mod:`nets`, :mod:`model`, :mod:`tiling`,
:mod:`train`) never imports Qt or napari; the napari widgets and the CLI are
thin layers over :class:`digital_stain.model.StainModel`.
"""

__version__ = "0.1.0"

# no hostmem.request_huge_pages() here: PyTorch's huge pages are a process-wide setting, asked for only
# where this package owns the process (the CLI, cluster workers), never on import (napari's, a user's)

__all__ = ["Enhancer", "StainModel", "__version__"]


def __getattr__(name):  # lazy, so that ``import digital_stain`` does not import torch
    if name == "StainModel":
        from .model import StainModel

        return StainModel
    if name == "Enhancer":
        from .enhance import Enhancer

        return Enhancer
    raise AttributeError(name)
