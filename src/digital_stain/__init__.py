"""napari-digital-stain: digital H&E staining of dark-field microscopy.

The library core (:mod:`enhance`, :mod:`nets`, :mod:`model`, :mod:`tiling`,
:mod:`train`) never imports Qt or napari; the napari widgets and the CLI are
thin layers over :class:`digital_stain.model.StainModel`.
"""

from . import hostmem

__version__ = "0.1.0"

hostmem.request_huge_pages()  # before any module of ours imports torch: PyTorch reads it at its first allocation

__all__ = ["Enhancer", "StainModel", "__version__"]


def __getattr__(name):  # lazy, so that ``import digital_stain`` does not import torch
    if name == "StainModel":
        from .model import StainModel

        return StainModel
    if name == "Enhancer":
        from .enhance import Enhancer

        return Enhancer
    raise AttributeError(name)
