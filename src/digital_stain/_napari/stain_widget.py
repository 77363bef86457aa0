"""The **Digitally stain** dock widget: pick a dark-field layer and a model, press the button.

A thin layer over the library: small images go through
:func:`digital_stain.oom.stain_with_fallback` in a worker thread (progress bar,
Stop); large, dask-backed, multiscale or stacked layers become lazy pyramids
(:func:`digital_stain.lazy.lazy_pyramid`) that stain chunks in the
background as napari shows them. Every expected failure becomes a
notification that says what to do; nothing is raised into the event loop.
"""

from __future__ import annotations

import copy

from napari.utils.notifications import show_error, show_info, show_warning
import numpy as np
from qtpy.QtCore import QEventLoop, QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox, QComboBox, QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton, QSpinBox, QVBoxLayout,
    QWidget,
)

from .. import __version__, settings
from ..arrays import InputError
from ..devices import DEVICES
from ..model import OUTPUTS
from . import layers as L
from .models import ModelPicker, load_model
from .worker import start_job

SECTION = "stain"
MODES = {"auto": "auto (lazy for large, dask, pyramid or stack)", "now": "whole image now", "lazy": "lazily, as viewed"}
LAZY_STATS_PIXELS = 1024 * 1024  # statistics per pyramid level: enough crops to be stable, cheap on a CPU


class _Ready(QObject):
    """Lazy chunks finished in a background thread → one coalesced refresh in the GUI thread."""

    ready = Signal()
    warning = Signal(str)


class StainWidget(QWidget):
    """Dock widget: input layer, model, outputs, device, tile size, mode; **Digitally stain** and **Stop**."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        saved = settings.load_settings(SECTION)
        self._worker = None
        self._stop = None
        self._lazy: dict[str, list] = {}  # output layer name -> LazyStain objects behind it
        self._signals = _Ready()
        self._refresh_timer = QTimer(self, singleShot=True, interval=150)
        self._refresh_timer.timeout.connect(self._refresh_lazy_layers)
        self._signals.ready.connect(self._refresh_timer.start)
        self._signals.warning.connect(show_warning)
        self.last_layers: dict[str, object] = {}

        self.input = QComboBox()
        self.input.setToolTip("The dark-field image layer to stain (image layers only).")
        self.model = ModelPicker(saved.get("model_files", []), select_new=True)
        self.output_boxes = {name: QCheckBox(name) for name in OUTPUTS}
        outputs_row = QHBoxLayout()
        for name, box in self.output_boxes.items():
            box.setChecked(name in saved.get("outputs", OUTPUTS))
            outputs_row.addWidget(box)
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.device.setToolTip("auto: a CUDA or Apple GPU when there is one, else the CPU.")
        self.tile = QSpinBox(minimum=256, maximum=4096, singleStep=256, suffix=" px")
        self.tile.setToolTip("Tile (and lazy chunk) side: larger is faster on a GPU, smaller needs less memory.")
        self.mode = QComboBox()
        for key, label in MODES.items():
            self.mode.addItem(label, key)
        self.run_button = QPushButton("Digitally stain")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.side_by_side = QPushButton("Side by side")
        self.side_by_side.setCheckable(True)
        self.side_by_side.setToolTip("Show the input and each output in its own panel (grid), or overlaid.")
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Input", self.input)
        form.addRow("Model", self.model)
        form.addRow("Outputs", outputs_row)
        form.addRow("Device", self.device)
        form.addRow("Tile", self.tile)
        form.addRow("Mode", self.mode)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.side_by_side)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self._restore(saved)
        self.run_button.clicked.connect(lambda: self.stain())
        self.stop_button.clicked.connect(self.stop)
        self.side_by_side.toggled.connect(self._toggle_grid)
        self.model.changed.connect(self._model_changed)
        for widget in (self.device, self.mode):
            widget.currentIndexChanged.connect(self._save)
        self.tile.valueChanged.connect(self._save)
        for box in self.output_boxes.values():
            box.toggled.connect(self._save)
        self.viewer.layers.events.removed.connect(self._layer_removed)
        self.reset_choices()
        self._model_changed(self.model.value)

    # -- public API (also what the buttons do) ---------------------------------------
    @property
    def input_layer(self):
        name = self.input.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    @input_layer.setter
    def input_layer(self, layer) -> None:
        self.reset_choices()
        index = self.input.findText(layer.name)
        if index >= 0:
            self.input.setCurrentIndex(index)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(name for name, box in self.output_boxes.items() if box.isChecked() and box.isEnabled())

    @property
    def running(self) -> bool:
        return self._worker is not None

    def stain(self, layer=None) -> bool:
        """Stain ``layer`` (default: the chosen input). Returns whether staining started.

        Problems (wrong layer type, bad shape, a model without the asked
        outputs, a missing GPU) are shown as notifications and return False.
        """
        if self.running:
            show_info("staining is already running; press Stop first to start another.")
            return False
        try:
            layer = layer if layer is not None else self.input_layer
            data, multiscale = L.image_source(layer, self.viewer)
            outputs = self.outputs
            if not outputs:
                raise InputError("no output is ticked: tick enhanced, teacher or student.")
            load_model(self.model.value, "cpu").check_outputs(outputs)
            mode = self.mode.currentData()
            lazy = mode == "lazy" or (mode == "auto" and L.should_stain_lazily(data, multiscale))
            if not lazy and (multiscale or L.is_stack(data.shape)):
                raise InputError(f"{layer.name!r} is a {'pyramid' if multiscale else 'stack'}; "
                                 "choose mode 'auto' or 'lazily, as viewed' to stain it as you view it.")
        except InputError as err:
            show_error(str(err))
            return False
        self._save()
        settings_used = dict(model=self.model.value, device=self.device.currentText(), tile=self.tile.value(),
                             outputs=list(outputs), mode="lazy" if lazy else "now")
        work = self._lazy_work(data, settings_used) if lazy else self._eager_work(data, settings_used)
        self._set_running(True, f"staining {layer.name!r}" + (" (lazily)" if lazy else ""))
        self._worker, self._stop = start_job(
            work, on_progress=self._on_progress,
            on_done=lambda outcome: self._on_done(outcome, layer, settings_used, multiscale or lazy),
            on_crash=self._on_crash, on_finished=self._on_finished)
        return True

    def stop(self) -> None:
        """Stop the running staining (returns within one tile); lazy layers stop their background work."""
        if self._stop is not None:
            self._stop.set()
            self.status.setText("stopping…")
        for stains in self._lazy.values():
            for stain in stains:
                stain.close()

    def run(self, layer=None, timeout_s: float = 600.0) -> dict:
        """Stain and wait (for scripts and notebooks): returns ``{output: layer}`` of this run."""
        self.last_layers = {}
        if not self.stain(layer):
            return {}
        self.wait(timeout_s)
        return dict(self.last_layers)

    def wait(self, timeout_s: float = 600.0) -> None:
        """Process Qt events until the running job ends (its results are then in the viewer)."""
        if self._worker is None:
            return
        loop = QEventLoop()
        self._worker.finished.connect(loop.quit)
        QTimer.singleShot(int(timeout_s * 1000), loop.quit)
        if self._worker is not None:
            loop.exec_()

    def reset_choices(self, *_) -> None:
        """Refill the input list with the viewer's image layers (napari calls this when layers change)."""
        from napari.layers import Image

        current = self.input.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)
                 and not layer.name.endswith(tuple(f" {o}" for o in OUTPUTS))]
        self.input.blockSignals(True)
        self.input.clear()
        self.input.addItems(names)
        if current in names:
            self.input.setCurrentText(current)
        elif names:
            self.input.setCurrentIndex(len(names) - 1)  # the newest image layer
        self.input.blockSignals(False)

    # -- the work, in a worker thread ------------------------------------------------------
    def _eager_work(self, data, used):
        from ..oom import stain_with_fallback

        def work(bridge, stop):
            model = load_model(used["model"], used["device"])
            results, actual = stain_with_fallback(
                model, np.asarray(data), used["outputs"], tile=used["tile"], device=used["device"], precision="auto",
                progress=bridge.progress.emit, stop=stop, notify=self._signals.warning.emit)
            return model, results, actual

        return work

    def _lazy_work(self, data, used):
        from ..lazy import lazy_pyramid

        def work(bridge, stop):
            model = copy.deepcopy(load_model(used["model"], used["device"]))  # the background threads' own copy
            arrays, stains = lazy_pyramid(
                model, data, used["outputs"], chunk=used["tile"], stats_pixels=LAZY_STATS_PIXELS,
                stats_crop=min(512, used["tile"]), background=True, on_ready=self._signals.ready.emit,
                on_fallback=self._signals.warning.emit)
            actual = {"tile": used["tile"], "device": str(model._device), "fallbacks": []}
            return model, (arrays, stains), actual

        return work

    # -- results, in the GUI thread ------------------------------------------------------
    def _on_done(self, outcome, source, used, multiscale) -> None:
        try:
            if outcome.error:
                show_error(outcome.error)
                return
            if outcome.stopped:
                self.status.setText("stopped; nothing was added.")
                return
            if source not in self.viewer.layers:
                self.status.setText(f"{source.name!r} was closed while it was stained; nothing was added.")
                return
            model, results, actual = outcome.result
            lazy = used["mode"] == "lazy"
            stains = results[1] if lazy else None
            data = results[0] if lazy else results
            metadata = {"digital_stain": {
                **model.describe(), "outputs": used["outputs"], "tile": actual["tile"], "device": actual["device"],
                "mode": used["mode"], "source_layer": source.name, "fallbacks": actual["fallbacks"],
                "version": __version__}}
            self.last_layers = {}
            for position, output in enumerate(used["outputs"]):
                levels = data[output]
                pyramid = lazy and len(levels) > 1
                layer_data = levels if pyramid else (levels[0] if lazy else levels)
                layer = L.show_output(self.viewer, source, output, layer_data,
                                      {"digital_stain": {**metadata["digital_stain"], "output": output}},
                                      multiscale=pyramid, position=position)
                self.last_layers[output] = layer
                if lazy:
                    self._lazy[layer.name] = stains
            if not self.side_by_side.isChecked():
                self.side_by_side.setChecked(True)  # the first result is shown side by side
            else:
                L.set_side_by_side(self.viewer, True)
            where = "as you view it" if lazy else f"in {actual['tile']}-px tiles"
            self.progress.setValue(100)
            self.status.setText(f"stained {source.name!r} with {model.name} on {actual['device']} {where}.")
        except Exception as err:  # never raise into Qt's event loop
            show_error(f"could not show the result: {err}")

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setValue(int(100 * done / max(total, 1)))

    def _on_crash(self, error: BaseException) -> None:
        self.status.setText(f"staining failed: {error}")

    def _on_finished(self) -> None:
        self._worker = self._stop = None
        self._set_running(False)

    def _set_running(self, on: bool, text: str = "") -> None:
        self.run_button.setEnabled(not on)
        self.stop_button.setEnabled(on)
        if on:
            self.progress.setValue(0)
            self.status.setText(text + "…")

    # -- lazy layers ---------------------------------------------------------------------
    def _refresh_lazy_layers(self) -> None:
        for name in list(self._lazy):
            if name in self.viewer.layers and self.viewer.layers[name].visible:
                self.viewer.layers[name].refresh()
        pending = sum(stain.pending for stains in self._lazy.values() for stain in stains)
        if pending:
            self._refresh_timer.start()  # keep the view fresh while chunks arrive

    def _layer_removed(self, event) -> None:
        name = getattr(event.value, "name", None)
        stains = self._lazy.pop(name, None)
        if stains and not any(s is t for others in self._lazy.values() for s in others for t in stains):
            for stain in stains:
                stain.close()  # no layer shows them any more: stop their background work

    # -- settings and small slots --------------------------------------------------------------
    def _model_changed(self, choice: str) -> None:
        try:
            model = load_model(choice, "cpu")
        except InputError as err:
            show_error(f"cannot use this model: {err}")
            self.model.files = [f for f in self.model.files if f != choice]
            self.model.refresh()
            return
        for name, box in self.output_boxes.items():
            box.setEnabled(name in model.outputs)
            box.setToolTip("" if name in model.outputs else f"{model.name} has no {name} network")
        self._save()

    def _toggle_grid(self, on: bool) -> None:
        L.set_side_by_side(self.viewer, on)
        self.side_by_side.setText("Overlay" if on else "Side by side")

    def _restore(self, saved: dict) -> None:
        if saved.get("model"):
            index = self.model.combo.findData(saved["model"])
            if index >= 0:
                self.model.combo.setCurrentIndex(index)
        self.device.setCurrentText(saved.get("device", "auto"))
        self.tile.setValue(int(saved.get("tile", 512)))
        index = self.mode.findData(saved.get("mode", "auto"))
        self.mode.setCurrentIndex(max(index, 0))

    def _save(self, *_) -> None:
        try:
            settings.save_settings(SECTION, {
                "model": self.model.value, "model_files": self.model.files, "device": self.device.currentText(),
                "tile": self.tile.value(), "mode": self.mode.currentData(),
                "outputs": [n for n, b in self.output_boxes.items() if b.isChecked()]})
        except OSError as err:
            show_warning(f"could not remember the settings: {err}")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt)
        self.stop()
        super().closeEvent(event)

