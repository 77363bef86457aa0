"""**Find nuclei** in the Digitally stain widget: the input's nuclei as a Labels layer ``<input> nuclei``.

The job runs in a worker thread with the widget's model, device, tile and adapt. A plane in memory
goes through :func:`digital_stain.nuclei.find.find_nuclei` (stain, then segment the virtual H&E;
tutorship when the model holds a segmenter) and its layer is added when it is done. A dask plane, a
large one or a pyramid's level 0 goes through :class:`digital_stain.nuclei.lazy.LazyNuclei` (by
either method): once the threshold is set (up to 16 chunks stained), its layer is added at once as a
pyramid that shows the chunks segmented so far, and the job segments the rest, the chunks on screen
first, redrawing as it goes; the count comes at the end. Up to 64 stained chunks are kept while it
runs; the labels are kept (4 bytes a pixel), so planes are limited to :data:`MAX_PIXELS`. The layer lies exactly over the
input (its scale, translation and units) and its metadata records how it was made.
"""

from __future__ import annotations

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning

from digital_stain import __version__
from digital_stain._napari import layers as L
from digital_stain._napari.worker import start_job
from digital_stain.core.arrays import InputError


def nuclei_name(source) -> str:
    return f"{source.name} nuclei"


MAX_PIXELS = 16384 * 16384  # the labels of a larger plane (4 bytes a pixel) belong on disk: the CLI's slide mode


def plane_of(data, multiscale: bool):
    """The plane to find nuclei in: the layer's data, or a pyramid's level 0."""
    return data[0] if multiscale else data


def nuclei_work(data, multiscale: bool, used: dict):
    """The job for :func:`digital_stain._napari.worker.start_job`: find the nuclei of one plane."""
    from digital_stain._napari.models import load_model
    from digital_stain.nuclei.find import Nuclei, find_nuclei
    from digital_stain.nuclei.lazy import LazyNuclei
    from digital_stain.stain.settings import StainSettings

    plane = plane_of(data, multiscale)

    def work(bridge, stop):
        model = load_model(used["model"], used["device"])  # shared, never changed by staining
        settings = StainSettings(tile=used["tile"], chunk=used["tile"], device=used["device"])
        if not L.should_stain_lazily(plane, False):
            found = find_nuclei(model, np.asarray(plane), settings=settings, adapt=used["adapt"],
                                progress=bridge.progress.emit, stop=stop)
            return model, found
        lazy = LazyNuclei(model, plane, settings=settings, adapt=used["adapt"])
        bridge.event.emit(lazy)  # the GUI adds the layer now; what is segmented shows as it comes
        count = lazy.sweep(progress=bridge.progress.emit, stop=stop)
        return model, Nuclei(labels=None, count=count, method=lazy.method, source=lazy.source, stained=None,
                             adaptation=lazy.adaptation.describe(), notes=["found chunk by chunk, as viewed"])

    return work


def check_plane(layer, data, multiscale: bool) -> None:
    """Refuse what Find nuclei cannot do, saying what to do instead."""

    plane = plane_of(data, multiscale)
    if L.is_stack(plane.shape):
        raise InputError(f"{layer.name!r} is a stack; Find nuclei works on one plane. Open one plane of it, or "
                         "write the planes as images and run `digital-stain nuclei PLANES -o LABELS`.")
    height, width = plane.shape[:2]
    if height * width > MAX_PIXELS:
        raise InputError(f"{layer.name!r} is {width} x {height} px, more than Find nuclei keeps labels of in memory "
                         "(16384 x 16384); label the whole slide on disk with `digital-stain nuclei SLIDE -o "
                         "OUT.ome.zarr` and open the store.")


def nuclei_metadata(found, used: dict, source) -> dict:
    """What the layer's metadata records: how its labels were made (``count`` None until counted)."""
    return {"digital_stain": {"nuclei": True, "method": found.method, "stained_by": found.source,
                              "count": found.count, "model": used["model"], "source_layer": source.name,
                              "adaptation": found.adaptation, "version": __version__}}


def show_nuclei(viewer, source, labels, metadata: dict):
    """Add (or replace) the Labels layer ``<source> nuclei`` over ``source``; returns it.

    ``labels`` is one array, or a :class:`~digital_stain.nuclei.lazy.LazyNuclei`, shown as its pyramid
    of what is segmented so far (redraw with ``layer.refresh()``)."""
    name = nuclei_name(source)
    multiscale = False
    if not isinstance(labels, np.ndarray):
        levels = labels.levels()
        multiscale = len(levels) > 1
        labels = levels if multiscale else levels[0]
    if name in viewer.layers and "digital_stain" in viewer.layers[name].metadata:  # ours: replace, never a user's
        viewer.layers.remove(viewer.layers[name])
    return viewer.add_labels(labels, name=name, multiscale=multiscale, cache=False, scale=source.scale[-2:],
                             translate=source.translate[-2:], units=source.units[-2:], metadata=metadata,
                             opacity=0.5)


class FindNuclei:
    """The widget's **Find nuclei** action (a mixin of the Digitally stain widget, which owns the
    viewer, the model picker, the progress bar, the status line and the one-job-at-a-time rule)."""

    def _setup_find_nuclei(self) -> None:
        from qtpy.QtCore import QTimer

        self._lazy_nuclei = None  # (layer, LazyNuclei) while a large plane's layer is filled in
        self._nuclei_timer = QTimer(self, singleShot=True, interval=300)
        self._nuclei_timer.timeout.connect(self._refresh_lazy_nuclei)

    def find_nuclei(self, layer=None) -> bool:
        """Find the nuclei of ``layer`` (default: the chosen input) in the background: the **Find nuclei**
        button. Adds the Labels layer ``<input> nuclei`` and says the count; returns whether it started.
        A dask, large or pyramid layer (its level 0) is stained and segmented chunk by chunk: its layer
        is added once the threshold is set and filled in as chunks are found, those on screen first."""
        if self._busy():
            return False
        try:
            layer = layer if layer is not None else self.input_layer
            data, multiscale = L.image_source(layer, self.viewer)
            check_plane(layer, data, multiscale)
        except InputError as err:
            show_error(str(err))
            return False
        self._save()
        used = dict(model=self.model.value, device=self.device.currentText(), tile=self.tile.value(),
                    adapt=self.adapt.currentData())
        self._set_running(True, f"finding the nuclei of {layer.name!r}")
        self._lazy_nuclei = None
        self._worker, self._stop = start_job(
            nuclei_work(data, multiscale, used), on_progress=self._on_nuclei_progress,
            on_event=lambda lazy: self._show_lazy_nuclei(lazy, layer, used),
            on_done=lambda outcome: self._on_nuclei_done(outcome, layer, used), on_crash=self._on_crash,
            on_finished=self._on_finished)
        return True

    def _show_lazy_nuclei(self, lazy, source, used) -> None:
        """A large plane's threshold is set: show its labels now, filled in as the job segments them."""
        from digital_stain.nuclei.find import Nuclei

        try:
            if source not in self.viewer.layers:
                return
            pending = Nuclei(labels=None, count=None, method=lazy.method, source=lazy.source, stained=None,
                             adaptation=lazy.adaptation.describe(), notes=[])
            layer = show_nuclei(self.viewer, source, lazy, nuclei_metadata(pending, used, source))
            self._lazy_nuclei = (layer, lazy)
            self.last_layers = {"nuclei": layer}
            self.status.setText(f"finding the nuclei of {source.name!r}: those on screen first, the count at the end…")
        except Exception as err:  # never raise into Qt's event loop
            show_error(f"could not show the nuclei: {err}")

    def _on_nuclei_progress(self, done: int, total: int) -> None:
        self._on_progress(done, total)
        if self._lazy_nuclei is not None and not self._nuclei_timer.isActive():
            self._nuclei_timer.start()  # chunks in quick succession → one redraw

    def _refresh_lazy_nuclei(self) -> None:
        layer = self._lazy_nuclei[0] if self._lazy_nuclei is not None else None
        try:
            if layer is not None and layer in self.viewer.layers and layer.visible:
                layer.refresh()
        except Exception as err:  # never raise into Qt's event loop
            show_warning(f"could not redraw the nuclei: {err}")

    def _on_nuclei_done(self, outcome, source, used) -> None:
        lazy, self._lazy_nuclei = self._lazy_nuclei, None
        try:
            self._nuclei_timer.stop()
            if lazy is not None and lazy[0] in self.viewer.layers:
                lazy[0].refresh()  # the last chunks
            if outcome.error is not None:
                show_error(outcome.error)
                self.status.setText(f"no nuclei found: {outcome.error}")
            elif outcome.stopped:
                self.status.setText("stopped; nothing was added." if lazy is None else
                                    f"stopped: {lazy[1].done} of {lazy[1].total} chunks labelled and shown; "
                                    "not counted.")
            elif lazy is None and source not in self.viewer.layers:
                self.status.setText(f"{source.name!r} was closed meanwhile; nothing was added.")
            else:
                model, found = outcome.result
                metadata = nuclei_metadata(found, used, source)
                if lazy is None:
                    self.last_layers = {"nuclei": show_nuclei(self.viewer, source, found.labels, metadata)}
                elif lazy[0] in self.viewer.layers:
                    lazy[0].metadata = metadata
                self.progress.setValue(100)
                how = (f"{model.name}'s {found.source} stain, segmented" if found.method == "adaptation"
                       else f"{model.name}'s nuclei segmenter on the enhanced image")
                text = f"{found.count} nuclei in {source.name!r} ({found.method}: {how})"
                show_info(text)
                self.status.setText(text + ".")
        except Exception as err:  # never raise into Qt's event loop
            show_error(f"could not show the nuclei: {err}")
