"""Choosing a model in the widgets: shipped models, the user's fine-tuned ones, and any file they pick.

Model files are loaded once per (file, device) and checked when picked, so a
corrupt file is reported at once, not when staining starts. A fine-tuned
model announced through :data:`REGISTRY` appears in every open picker.
"""

from __future__ import annotations

import threading
from pathlib import Path

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QPushButton, QWidget

from digital_stain._napari import settings
from digital_stain.core.devices import resolve_device
from digital_stain.stain.model import DEFAULT_MODEL, StainModel, available_models, resolve_model_path

OTHER = "Other model file…"


class _Registry(QObject):
    added = Signal(str)  # path of a newly written model file


REGISTRY = None


def registry() -> _Registry:
    """The process-wide announcer of new model files (made on first use, in the GUI thread)."""
    global REGISTRY
    if REGISTRY is None:
        REGISTRY = _Registry()
    return REGISTRY


_CACHE: dict[tuple, StainModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(choice: str, device: str = "cpu") -> StainModel:
    """The model for a picker value (shipped name or file path), loaded once per file version.

    Raises :class:`~digital_stain.core.arrays.InputError` (or its subclass
    ``ModelFileError``) with a message for the user. The same object is
    returned to every caller, and any number of jobs may stain with it at once:
    staining never changes a model, and each device runs its own read-only copy
    of the networks (:meth:`StainModel.networks`), made here so that the first
    stain on ``device`` does not wait for it.
    """
    path = resolve_model_path(choice)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = StainModel.load(path, device="cpu")
        model = _CACHE[key]
    model.networks(resolve_device(device))
    return model


def model_label(choice: str) -> str:
    if choice in available_models():
        return f"{choice} (shipped)"
    return f"{Path(choice).stem} ({Path(choice).parent})"


class ModelPicker(QWidget):
    """A combo of models plus a button to pick a model file; ``value`` is a shipped name or a path."""

    changed = Signal(str)

    def __init__(self, remembered: list | None = None, parent=None, *, select_new: bool = False):
        super().__init__(parent)
        self.select_new = select_new  # switch to a model as soon as fine-tuning writes it
        self.combo = QComboBox()
        self.combo.setToolTip("The model that stains: shipped with the plugin, fine-tuned by you, or any model file.")
        self.browse = QPushButton("…")
        self.browse.setToolTip("Pick a model file (.safetensors)")
        self.browse.setFixedWidth(32)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.browse)
        self.files: list[str] = [p for p in (remembered or []) if Path(p).is_file()]
        self.bad: set[str] = set()  # files that failed to load: not offered again this session
        self._last = DEFAULT_MODEL
        self._before: str | None = None
        self.refresh()
        self.combo.activated.connect(self._activated)
        self.browse.clicked.connect(self._browse)
        registry().added.connect(self._announced)

    @property
    def value(self) -> str:
        return self.combo.currentData() or DEFAULT_MODEL

    def set_value(self, choice: str) -> None:
        self.bad.discard(choice)  # picked again on purpose: try it again
        if choice not in available_models() and choice not in self.files:
            self.files.insert(0, choice)
            self.refresh()
        index = self.combo.findData(choice)
        if index >= 0:
            self.combo.setCurrentIndex(index)
        self._chosen()

    def _chosen(self) -> None:
        if self.value != self._last:
            self._before = self._last  # where reject() goes back to
        self._last = self.value
        self.changed.emit(self.value)

    def reject(self, choice: str) -> str:
        """Forget a model that cannot be used and go back to the one chosen before it (else the default);
        returns the model now chosen."""
        self.bad.add(choice)
        self.files = [f for f in self.files if f != choice]
        self.refresh()
        back = self._before if self._before not in (choice, None) and self._before not in self.bad else None
        index = self.combo.findData(back) if back is not None else -1
        self.combo.setCurrentIndex(index if index >= 0 else max(self.combo.findData(DEFAULT_MODEL), 0))
        self._last = self.value
        return self.value

    def refresh(self) -> None:
        """List the shipped models, the fine-tuned ones in the user's models folder, and picked files."""
        current = self.combo.currentData()
        user = [str(p) for p in settings.user_models()]
        choices = available_models() + [c for c in dict.fromkeys(user + self.files) if c not in self.bad]
        self.combo.blockSignals(True)
        self.combo.clear()
        for choice in choices:
            self.combo.addItem(model_label(choice), choice)
        self.combo.addItem(OTHER, None)
        index = self.combo.findData(current if current else DEFAULT_MODEL)
        self.combo.setCurrentIndex(max(index, 0))
        self.combo.blockSignals(False)

    def _activated(self, index: int) -> None:
        if self.combo.itemData(index) is None:  # "Other model file…"
            self._browse()
        else:
            self._chosen()

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a model file", str(settings.models_dir()),
                                              "Model files (*.safetensors)")
        if path:
            self.set_value(path)
        else:  # cancelled: back to what was chosen before
            self.combo.setCurrentIndex(max(self.combo.findData(self._last), 0))

    def _announced(self, path: str) -> None:
        if path not in self.files:
            self.files.insert(0, path)
        self.refresh()
        if self.select_new:
            self.set_value(path)
