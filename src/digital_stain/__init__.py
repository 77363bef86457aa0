"""napari-digital-stain: digital H&E staining of dark-field microscopy.

The public API is declared here, once (``PUBLIC``): ``from digital_stain import StainModel``. Each name
is imported on first use, so ``import digital_stain`` does not import torch.

The package is laid out by concern (``docs/architecture.md``): ``core`` (maths only: arrays, colour,
the enhancer, histograms and adaptation, devices, the networks), ``stain`` (settings, model, the
kernel, tiling, lazy staining), ``slide`` (whole slides: the run, units, schedulers, the store),
``io`` (image and model files), ``train``, ``quality`` (metrics and evaluation), and the thin layers
over them: ``cli`` and ``_napari``. The core never imports Qt or napari.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# no hostmem.own_process() here: huge pages are a process-wide setting, asked for only
# where this package owns the process (the CLI, cluster workers), never on import (napari's, a user's)

PUBLIC = {  # name -> the module that defines it
    "StainModel": "digital_stain.stain.model",
    "StainSettings": "digital_stain.stain.settings",
    "available_models": "digital_stain.stain.model",
    "LazyStain": "digital_stain.stain.lazy",
    "stain_lazy": "digital_stain.stain.lazy",
    "lazy_pyramid": "digital_stain.stain.lazy",
    "stain_to_zarr": "digital_stain.slide.run",
    "cluster_client": "digital_stain.slide.cluster",
    "save_stains": "digital_stain.slide.export",
    "Enhancer": "digital_stain.core.enhance",
    "InputError": "digital_stain.core.arrays",
    "read_image": "digital_stain.io.images",
    "write_image": "digital_stain.io.images",
    "open_source": "digital_stain.io.images",
    "read_calibration": "digital_stain.io.images",
    "Calibration": "digital_stain.io.calibration",
    "read_pyramids": "digital_stain.io.multiscale",
    "export_model": "digital_stain.io.export",
    "fine_tune": "digital_stain.train.finetune",
    "evaluate_model": "digital_stain.quality.evaluate",
    "synthesize_darkfield": "digital_stain.quality.synth",
    "find_nuclei": "digital_stain.nuclei.find",
    "find_nuclei_files": "digital_stain.nuclei.files",
    "segment_nuclei": "digital_stain.nuclei.segment",
    "NucleiSettings": "digital_stain.nuclei.segment",
}

__all__ = sorted(PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in PUBLIC:
        value = getattr(importlib.import_module(PUBLIC[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'digital_stain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC))
