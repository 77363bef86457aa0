"""The plugin's dock widgets (npe2 ``widgets`` contributions; implementations in ``digital_stain._napari``)."""

from digital_stain._napari.finetune_widget import FineTuneWidget
from digital_stain._napari.stain_widget import StainWidget

__all__ = ["FineTuneWidget", "StainWidget"]
