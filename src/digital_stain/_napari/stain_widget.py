"""The **Digitally stain** dock widget: pick a dark-field layer and a model, press the button.

A thin layer over the library: small images go through
:func:`digital_stain.stain.oom.stain_with_fallback` in a worker thread (progress bar,
Stop); large, dask-backed, multiscale or stacked layers become lazy pyramids
(:func:`digital_stain.stain.lazy.lazy_pyramid`) that stain chunks in the
background as napari shows them. Every expected failure becomes a
notification that says what to do; nothing is raised into the event loop.
"""

from __future__ import annotations

from pathlib import Path

from napari.utils.notifications import show_error, show_info, show_warning
import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox, QComboBox, QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton, QSpinBox, QVBoxLayout,
    QWidget,
)

from digital_stain import __version__
from digital_stain._napari import settings
from digital_stain.core.arrays import InputError
from digital_stain.core.devices import DEVICES
from digital_stain.stain.model import OUTPUTS
from digital_stain.stain.settings import StainSettings
from digital_stain.stain.tiling import Cancelled
from digital_stain._napari import layers as L
from digital_stain._napari.models import ModelPicker, load_model, model_label
from digital_stain._napari.nuclei import FindNuclei
from digital_stain._napari.worker import start_job, wait_while

SECTION = "stain"
MODES = {"auto": "auto (lazy for large, dask, pyramid or stack)", "now": "whole image now", "lazy": "lazily, as viewed"}
ADAPT_CHOICES = {"auto": "auto (when far from the model's)", "on": "always", "off": "never"}
LAZY_CACHE_BYTES = 256 * 2**20  # stained chunks kept per output and pyramid level


class _Signals(QObject):
    """Lazy chunks finished (or failed) in a background thread → handled in the GUI thread."""

    ready = Signal(object)  # the LazyStain that finished a chunk
    failed = Signal(object, object)  # the LazyStain, the error
    warning = Signal(str)


class StainWidget(FindNuclei, QWidget):
    """Dock widget: input layer, model, outputs, device, tile size, mode; **Digitally stain** and **Stop**."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        saved = settings.load_settings(SECTION)
        self._worker = None
        self._stop = None
        # output layer's unique_id -> (layer, the LazyStains behind it); not id(): napari hands plugins proxies
        self._lazy: dict[str, tuple] = {}
        self._ready: set = set()  # LazyStains with new chunks since the last refresh
        self._failures_shown: set = set()
        self._layout_chosen = False  # once the user picks overlay or grid, staining leaves it alone
        self._signals = _Signals()
        self._refresh_timer = QTimer(self, singleShot=True, interval=150)
        self._refresh_timer.timeout.connect(self._refresh_lazy_layers)
        self._signals.ready.connect(self._chunk_ready)
        self._signals.failed.connect(self._chunk_failed)
        self._signals.warning.connect(show_warning)
        self._pending_timer = QTimer(self, interval=500)  # Stop stays usable while lazy chunks wait
        self._pending_timer.timeout.connect(self._update_stop_button)
        self._setup_find_nuclei()
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
        self.adapt = QComboBox()
        for key, label in ADAPT_CHOICES.items():
            self.adapt.addItem(label, key)
        self.adapt.setToolTip("Another microscope's dark-field: auto adapts when the image is far from the model's "
                              "(the enhancer's dark-field CDF is refitted on the image and the student's input "
                              "channels mapped onto the model's); on always; off never.")
        self.run_button = QPushButton("Digitally stain")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.folder_button = QPushButton("Stain a folder…")
        self.folder_button.setToolTip("Stain every image of a folder into a new folder, in the background, with these "
                                      "settings (what digital-stain stain FOLDER -o OUT does). Nothing is added here.")
        self.nuclei_button = QPushButton("Find nuclei")
        self.nuclei_button.setToolTip("Stain the input with this model, then find the nuclei in the virtual H&E: a "
                                      "Labels layer '<input> nuclei' over the input, and the count below.")
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
        form.addRow("Adapt", self.adapt)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.folder_button)
        layout.addWidget(self.nuclei_button)
        layout.addWidget(self.side_by_side)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self._restore(saved)
        self.run_button.clicked.connect(lambda: self.stain())
        self.stop_button.clicked.connect(self.stop)
        self.folder_button.clicked.connect(self._pick_folders)
        self.nuclei_button.clicked.connect(lambda: self.find_nuclei())
        self.side_by_side.toggled.connect(self._toggle_grid)
        self.side_by_side.clicked.connect(self._layout_clicked)
        self.model.changed.connect(self._model_changed)
        for widget in (self.device, self.mode, self.adapt):
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
        if self._busy():
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
        except Exception as err:  # e.g. a model file deleted since it was picked: say so, never raise into Qt
            show_error(f"cannot stain: {type(err).__name__}: {err}")
            return False
        self._save()
        settings_used = dict(model=self.model.value, device=self.device.currentText(), tile=self.tile.value(),
                             outputs=list(outputs), mode="lazy" if lazy else "now", adapt=self.adapt.currentData())
        work = self._lazy_work(data, settings_used) if lazy else self._eager_work(data, settings_used)
        self._set_running(True, f"staining {layer.name!r}" + (" (lazily)" if lazy else ""))
        self._worker, self._stop = start_job(
            work, on_progress=self._on_progress,
            on_done=lambda outcome: self._on_done(outcome, layer, settings_used, multiscale or lazy),
            on_crash=self._on_crash, on_finished=self._on_finished)
        return True

    def stain_folder(self, source, output) -> bool:
        """Stain every image of folder ``source`` into the new folder ``output`` in the background (the
        **Stain a folder…** button, after asking for both). Returns whether it started; progress is per
        image, Stop stops after the current one (nothing is written then), and a notification sums up."""
        from digital_stain._napari.folder import folder_work

        if self._busy():
            return False
        if not self.outputs:
            show_error("no output is ticked: tick enhanced, teacher or student.")
            return False
        self._save()
        used = dict(model=self.model.value, device=self.device.currentText(), tile=self.tile.value(),
                    outputs=list(self.outputs), adapt=self.adapt.currentData())
        self._set_running(True, f"staining the images of {Path(source).name}")
        self._worker, self._stop = start_job(
            folder_work(Path(source), Path(output), used), on_progress=self._on_progress,
            on_event=lambda message: self.status.setText(str(message)), on_done=self._on_folder_done,
            on_crash=self._on_crash, on_finished=self._on_finished)
        return True

    def _busy(self) -> bool:
        """Whether a job runs (one at a time): then says so and the new one is not started."""
        if self.running:
            show_info("staining is already running; press Stop first to start another.")
        return self.running

    def stop(self) -> None:
        """Stop the running staining (within one tile) and drop the chunks waiting to be stained.

        Lazy layers stay usable: chunks looked at again are queued again.
        """
        if self._stop is not None:
            self._stop.set()
            self.status.setText("stopping…")
        dropped = sum(stain.cancel_pending() for _, stains in self._lazy.values() for stain in stains)
        if dropped and self._stop is None:
            self.status.setText(f"stopped: {dropped} chunk(s) waiting to be stained were dropped.")
        self.stop_button.setEnabled(self.running)

    def lazy_stains(self, layer) -> list:
        """The :class:`~digital_stain.stain.lazy.LazyStain` objects behind a lazily stained output layer."""
        return list(self._lazy.get(layer.unique_id, (None, []))[1])

    def run(self, layer=None, timeout_s: float = 600.0) -> dict:
        """Stain and wait (for scripts and notebooks): returns ``{output: layer}`` of this run."""
        self.last_layers = {}
        if not self.stain(layer):
            return {}
        self.wait(timeout_s)
        return dict(self.last_layers)

    def wait(self, timeout_s: float = 600.0) -> None:
        """Process Qt events until the running job ends (its results are then in the viewer)."""
        wait_while(lambda: self.running, timeout_s)

    def reset_choices(self, *_) -> None:
        """Refill the input list with the viewer's image layers (napari calls this when layers change)."""
        from napari.layers import Image

        current = self.input.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image) and not L.is_output(layer)]
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
        from digital_stain.stain.oom import stain_with_fallback

        signals = self._signals

        def work(bridge, stop):
            model = load_model(used["model"], used["device"])
            image = np.asarray(data)
            adaptation = model.adaptation(image, used["adapt"])  # decided once, for the whole layer
            # the model is shared with other jobs, without a lock: staining never changes it
            results, actual = stain_with_fallback(
                model, image, used["outputs"], tile=used["tile"], device=used["device"],
                precision="auto", progress=bridge.progress.emit, stop=stop, notify=signals.warning.emit,
                adapt=adaptation)
            return model, results, {**actual, "adaptation": adaptation}

        return work

    def _lazy_work(self, data, used):
        from digital_stain.stain.lazy import lazy_pyramid

        signals = self._signals  # the closures hold the QObject: it must outlive the background threads

        def work(bridge, stop):
            model = load_model(used["model"], used["device"])  # shared: staining never changes it
            # the CLI's defaults (statistics, overlap, precision), the widget's chunk, device and adaptation
            stain_settings = StainSettings(chunk=used["tile"], stats_crop=min(512, used["tile"]), device=used["device"],
                                           adapt=used["adapt"])
            arrays, stains = lazy_pyramid(
                model, data, used["outputs"], settings=stain_settings, background=True, cache_bytes=LAZY_CACHE_BYTES,
                on_fallback=signals.warning.emit)
            for stain in stains:  # bound here, so each report says which pyramid level it is from
                stain.on_ready = lambda s=stain: signals.ready.emit(s)
                stain.on_error = lambda error, s=stain: signals.failed.emit(s, error)
            if len(stains) > 1 and stains[-1].stack_ndim == 0:
                _stain_coarsest_level(stains[-1], stop)
            if stop.is_set():
                for stain in stains:
                    stain.close(wait=False)
                raise Cancelled("stopped by the user")
            actual = {"tile": used["tile"], "device": str(stains[0].device), "fallbacks": [],
                      "adaptation": stains[0].prep.adaptation}  # level 0's, used by every level
            return model, (arrays, stains), actual

        return work

    # -- results, in the GUI thread ------------------------------------------------------
    def _on_done(self, outcome, source, used, multiscale) -> None:
        try:
            if outcome.error is not None:
                show_error(outcome.error)
                self.status.setText(f"not stained: {outcome.error}")
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
            adaptation = actual["adaptation"]
            metadata = {"digital_stain": {
                **model.describe(), "outputs": used["outputs"], "tile": actual["tile"], "device": actual["device"],
                "mode": used["mode"], "source_layer": source.name, "fallbacks": actual["fallbacks"],
                "adaptation": adaptation.describe(), "version": __version__}}
            if adaptation.applied:
                show_info(f"{source.name!r}: {adaptation.message(model.name)}")
            self.last_layers = {}
            L.label_earlier_outputs(self.viewer, source, used["outputs"])
            for position, output in enumerate(used["outputs"]):
                levels = data[output]
                pyramid = lazy and len(levels) > 1
                layer_data = levels if pyramid else (levels[0] if lazy else levels)
                layer = L.show_output(self.viewer, source, output, layer_data,
                                      {"digital_stain": {**metadata["digital_stain"], "output": output}},
                                      multiscale=pyramid, position=position)
                self.last_layers[output] = layer
                self._track(layer, stains if lazy else [])
            if not self._layout_chosen and not self.side_by_side.isChecked():
                self.side_by_side.setChecked(True)  # results are shown side by side until the user chooses
            elif self.side_by_side.isChecked():
                L.set_side_by_side(self.viewer, True)  # new panels joined the grid
            where = "as you view it" if lazy else f"in {actual['tile']}-px tiles"
            adapted = " (adapted to this image's dark-field)" if adaptation.applied else ""
            self.progress.setValue(100)
            self.status.setText(f"stained {source.name!r} with {model.name}{adapted} on {actual['device']} {where}.")
        except Exception as err:  # never raise into Qt's event loop
            show_error(f"could not show the result: {err}")

    def _pick_folders(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        from digital_stain._napari.folder import output_folder

        source = QFileDialog.getExistingDirectory(self, "Folder of dark-field images to stain")
        if not source:
            return
        parent = QFileDialog.getExistingDirectory(self, f"Where to put the new folder {Path(source).name}-stained")
        if parent:
            self.stain_folder(source, output_folder(source, parent))

    def _on_folder_done(self, outcome) -> None:
        from digital_stain._napari.folder import summary

        if outcome.error is not None:
            show_error(outcome.error)
            self.status.setText(f"not stained: {outcome.error}")
        elif outcome.stopped:
            self.status.setText("stopped; nothing was written.")
        else:
            text = summary(outcome.result)
            (show_warning if outcome.result.skipped else show_info)(text)
            self.status.setText(text.splitlines()[0])

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
    def _track(self, layer, stains: list) -> None:
        """Remember the LazyStains behind ``layer``; those it showed before are closed if nothing else shows them."""
        _, old = self._lazy.pop(layer.unique_id, (None, []))
        if stains:
            self._lazy[layer.unique_id] = (layer, stains)
            self._pending_timer.start()
        self._close_unused(old)

    def _close_unused(self, stains: list) -> None:
        in_use = {id(s) for _, others in self._lazy.values() for s in others}
        for stain in stains:
            if id(stain) not in in_use:
                stain.close(wait=False)  # never join in the GUI thread: a chunk may take seconds

    def _update_stop_button(self) -> None:
        pending = sum(stain.pending for _, stains in self._lazy.values() for stain in stains)
        self.stop_button.setEnabled(self.running or pending > 0)
        if not self._lazy:
            self._pending_timer.stop()

    def _chunk_ready(self, stain) -> None:
        self._ready.add(stain)
        if not self._refresh_timer.isActive():
            self._refresh_timer.start()  # many chunks in quick succession → one redraw

    def _refresh_lazy_layers(self) -> None:
        ready, self._ready = self._ready, set()
        try:
            for layer, stains in list(self._lazy.values()):
                if layer.visible and any(stain in ready for stain in stains):
                    layer.refresh()
        except Exception as err:  # never raise into Qt's event loop
            show_warning(f"could not redraw a stained layer: {err}")

    def _chunk_failed(self, stain, error) -> None:
        if id(stain) in self._failures_shown:
            return  # one message per pyramid level, not one per chunk
        self._failures_shown.add(id(stain))
        show_warning(f"some chunks could not be stained and stay gray ({type(error).__name__}: {error}).")

    def _layer_removed(self, event) -> None:
        _, stains = self._lazy.pop(getattr(event.value, "unique_id", None), (None, []))
        self._close_unused(stains)  # no layer shows them any more: stop their background work

    # -- settings and small slots --------------------------------------------------------------
    def _model_changed(self, choice: str) -> None:
        try:
            model = load_model(choice, "cpu")
        except Exception as err:  # a corrupt or vanished file: say so and go back to a usable model
            back = self.model.reject(choice)
            show_error(f"cannot use this model: {err} Back to {model_label(back)}.")
            if self.model.value != choice:
                self._model_changed(self.model.value)
            return
        for name, box in self.output_boxes.items():
            box.setEnabled(name in model.outputs)
            box.setToolTip("" if name in model.outputs else f"{model.name} has no {name} network")
        self._save()

    def _layout_clicked(self) -> None:
        self._layout_chosen = True

    def _toggle_grid(self, on: bool) -> None:
        L.set_side_by_side(self.viewer, on)  # pressed in: side by side; released: overlaid

    def _restore(self, saved: dict) -> None:
        """Put back the last session's choices (values that do not fit are ignored)."""
        index = self.model.combo.findData(saved.get("model"))
        if index >= 0:
            self.model.combo.setCurrentIndex(index)
            self.model._last = self.model.value
        if saved.get("device") in DEVICES:
            self.device.setCurrentText(saved["device"])
        self.tile.setValue(_as_int(saved.get("tile"), StainSettings.tile))  # the library's default, 1024
        index = self.mode.findData(saved.get("mode", "auto"))
        self.mode.setCurrentIndex(max(index, 0))
        self.adapt.setCurrentIndex(max(self.adapt.findData(saved.get("adapt", "auto")), 0))

    def _save(self, *_) -> None:
        try:
            settings.save_settings(SECTION, {
                "model": self.model.value, "model_files": self.model.files, "device": self.device.currentText(),
                "tile": self.tile.value(), "mode": self.mode.currentData(), "adapt": self.adapt.currentData(),
                "outputs": [n for n, b in self.output_boxes.items() if b.isChecked()]})
        except OSError as err:
            show_warning(f"could not remember the settings: {err}")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt)
        self.stop()
        self._close_unused([s for _, stains in self._lazy.values() for s in stains])
        super().closeEvent(event)


def _stain_coarsest_level(stain, stop) -> None:
    """Stain a pyramid's coarsest level (at most 512 px) before it is shown.

    napari reads the coarsest level of a 2-D pyramid once and keeps it (for the
    thumbnail and the zoomed-out view), so a placeholder there would stay gray.
    """
    for array in stain.arrays.values():
        np.asarray(array)  # queues its chunks (placeholders come back at once)
    while not stain.wait(0.2):
        if stop.is_set():
            return


def _as_int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default

