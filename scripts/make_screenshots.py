"""Make the screenshots of the napari plugin shown in docs/user-guide.md (docs/images/*.png).

Real screenshots of a shown napari window, driven through the plugin's public widget API:

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/make_screenshots.py [--out docs/images]

What each picture shows is fixed (the shipped sample tiles, the shipped models, fixed settings,
a fixed view); only timings (the Fine-tune speed and ETA) differ between runs. The plugin's settings
and models, and napari's own settings, go to a temporary folder (DIGITAL_STAIN_CONFIG_DIR,
DIGITAL_STAIN_DATA_DIR, NAPARI_CONFIG), never the user's. 2.5 to 4 minutes on 2 CPU cores. Needs
an X display with OpenGL (Xvfb at 24-bit depth).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "napari-digital-stain"
WINDOW = (1600, 720)  # fits the Xvfb screen above; pictures are downscaled to MAX_WIDTH
TALL_WINDOW = (1600, 1000)  # room for the whole Fine-tune dock
LEFT_DOCKS, RIGHT_DOCK = 230, 440  # widths of napari's layer docks and of the plugin's dock
MAX_WIDTH = 1400
MAX_BYTES = 400_000
SLIDE = 8192  # side of the dask-backed mosaic stained lazily
SHOTS = ("side-by-side", "widget", "overlay", "finetune", "lazy", "other-microscope", "nuclei")
DSD_P_TILE = ROOT / "tests" / "data" / "dsd_p" / "darkfield"  # real tiles of the lab's second, brighter set-up
DARKFIELD_LIMITS = (0, 40)  # dark-field tiles are dim (mean 2-15 of 255): shown brightened, as one would in napari


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for the PNGs")
    parser.add_argument("--only", nargs="+", choices=SHOTS, default=SHOTS, metavar="SHOT",
                        help=f"make only these: {', '.join(SHOTS)} (default: all)")
    args = parser.parse_args(argv)
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        parser.error('no display: run under xvfb-run -a -s "-screen 0 1600x1000x24"')

    scratch = Path(tempfile.mkdtemp(prefix="digital-stain-screenshots-"))
    # before anything reads them: the plugin's settings and models live here, never in the user's folders
    os.environ["DIGITAL_STAIN_CONFIG_DIR"] = str(scratch / "config")
    os.environ["DIGITAL_STAIN_DATA_DIR"] = str(scratch / "data")
    os.environ["NAPARI_CONFIG"] = str(scratch / "napari" / "settings.yaml")  # napari's defaults; yours untouched
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only)
    written: list[Path] = []
    started = time.monotonic()
    try:
        if wanted & {"side-by-side", "widget", "overlay"}:
            written += stain_shots(args.out, wanted)
        if "finetune" in wanted:
            written += finetune_shot(args.out, scratch)
        if "lazy" in wanted:
            written += lazy_shot(args.out)
        if "other-microscope" in wanted:
            written += other_microscope_shot(args.out)
        if "nuclei" in wanted:
            written += nuclei_shot(args.out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for path in written:
        from PIL import Image

        with Image.open(path) as im:
            size = im.size
        print(f"wrote {path} ({size[0]} x {size[1]} px, {path.stat().st_size / 1024:.0f} KiB)")
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


# -- helpers ----------------------------------------------------------------------------------------
def settle(seconds: float = 0.5, until=None, timeout: float = 120.0) -> None:
    """Process Qt events for ``seconds`` (at least), and then until ``until()`` is true (or ``timeout``)."""
    from qtpy.QtWidgets import QApplication

    start = time.monotonic()
    while True:
        QApplication.processEvents()
        elapsed = time.monotonic() - start
        if elapsed >= seconds and (until is None or until()):
            return
        if elapsed > timeout:
            raise TimeoutError(f"gave up waiting after {timeout:.0f} s")
        time.sleep(0.02)


def new_viewer(title: str, size=WINDOW):
    import napari

    viewer = napari.Viewer(title=title, show=True)
    viewer.window.resize(*size)
    settle(0.5)
    return viewer


def arrange(viewer, dock) -> None:
    """Narrow napari's layer docks and give the plugin's dock a fixed width, so the canvas gets the rest."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget

    window = viewer.window._qt_window  # the QMainWindow
    left = [d for d in window.findChildren(QDockWidget) if d.windowTitle() in ("layer controls", "layer list")]
    dock.setMaximumWidth(RIGHT_DOCK)  # or a one-line status text widens it
    window.resizeDocks(left + [dock], [LEFT_DOCKS] * len(left) + [RIGHT_DOCK], Qt.Horizontal)
    settle(0.3)


def dismiss_notifications() -> None:
    """Close napari's notification toasts (e.g. its PyQt5 deprecation warning) so they cover nothing."""
    from qtpy.QtWidgets import QApplication

    for widget in QApplication.allWidgets():
        if type(widget).__name__ == "NapariQtNotification":
            widget.close()
    settle(0.3)


def camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return getattr(scene, "camera", None) or viewer.camera


def window_shot(viewer, path: Path) -> Path:
    dismiss_notifications()
    return save_png(viewer.window.screenshot(flash=False, canvas_only=False), path)


def save_png(image, path: Path) -> Path:
    """Save an RGB(A) array or a QPixmap as a small PNG: at most MAX_WIDTH wide, palette if RGB is too big."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, np.ndarray):  # a QPixmap
        buffer = io.BytesIO(_pixmap_png(image))
        image = np.asarray(Image.open(buffer).convert("RGB"))
    im = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    if im.width > MAX_WIDTH:
        im = im.resize((MAX_WIDTH, round(im.height * MAX_WIDTH / im.width)), Image.Resampling.LANCZOS)
    data = _png_bytes(im)
    if len(data) > MAX_BYTES:  # screenshots have few colours but tissue: 256-colour palette with dithering
        data = _png_bytes(im.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG))
    path.write_bytes(data)
    return path


def _png_bytes(im) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _pixmap_png(pixmap) -> bytes:
    from qtpy.QtCore import QBuffer, QByteArray, QIODevice

    array = QByteArray()
    buffer = QBuffer(array)
    buffer.open(QIODevice.WriteOnly)
    pixmap.save(buffer, "PNG")
    buffer.close()
    return bytes(array)


def grab_dock(dock, widget):
    """The dock (title bar and widget) down to the widget's last control, without the empty stretch below."""
    from qtpy.QtCore import QPoint, QRect

    top = widget.mapTo(dock, QPoint(0, 0)).y()
    layout = widget.layout()
    bottom = 0
    for i in range(layout.count()):
        item = layout.itemAt(i)
        if item.spacerItem() is None:
            bottom = max(bottom, item.geometry().bottom())
    height = min(dock.height(), top + bottom + 12)
    return dock.grab(QRect(0, 0, dock.width(), height))


def mosaic_of_samples(viewer):
    """The shipped dark-field tiles as one 1024 x 512 mosaic (each of the three tiles in several orientations)."""
    import numpy as np

    layers = viewer.open_sample(PLUGIN, "darkfield_tiles")
    tiles = [np.asarray(layer.data) for layer in layers]
    scale, units = tuple(layers[0].scale), tuple(layers[0].units)
    for layer in layers:
        viewer.layers.remove(layer)
    a, b, c = tiles
    grid = [[a, b],
            [c, np.rot90(a)],
            [np.rot90(b, 3), np.fliplr(c)],
            [np.flipud(a), np.rot90(b, 2)]]
    mosaic = np.concatenate([np.concatenate(row, axis=1) for row in grid], axis=0)
    return np.ascontiguousarray(mosaic), scale, units


def stain_widget_on_mosaic(title: str):
    """A viewer with the Digitally stain dock, the sample mosaic as ``dark-field`` chosen as input, the
    shipped default model chosen: ``(viewer, dock, widget, mosaic)``."""
    viewer = new_viewer(title)
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    arrange(viewer, dock)
    mosaic, scale, units = mosaic_of_samples(viewer)
    source = viewer.add_image(mosaic, name="dark-field", rgb=True, scale=scale, units=units,
                              contrast_limits=DARKFIELD_LIMITS)
    widget.input_layer = source
    widget.model.set_value("dsd-unpaired")
    return viewer, dock, widget, mosaic


# -- the pictures -------------------------------------------------------------------------------------
def stain_shots(out: Path, wanted: set) -> list[Path]:
    """stain-side-by-side.png, stain-widget.png, stain-overlay.png: the shipped model on the sample tiles."""
    viewer, dock, widget, mosaic = stain_widget_on_mosaic("napari-digital-stain: Digitally stain")
    for box in widget.output_boxes.values():
        box.setChecked(True)
    widget.device.setCurrentText("auto")
    widget.tile.setValue(512)
    widget.mode.setCurrentIndex(widget.mode.findData("auto"))
    t0 = time.monotonic()
    layers = widget.run(timeout_s=600)
    if set(layers) != {"enhanced", "teacher", "student"}:
        raise RuntimeError(f"staining did not finish: {widget.status.text()!r}")
    print(f"stained the {mosaic.shape[0]} x {mosaic.shape[1]} mosaic in {time.monotonic() - t0:.0f} s")
    viewer.layers.selection.active = layers["student"]
    arrange(viewer, dock)  # the dock may have widened to fit the status line
    viewer.reset_view()
    settle(1.0)
    written = []
    if "side-by-side" in wanted:
        written.append(window_shot(viewer, out / "stain-side-by-side.png"))
    if "widget" in wanted:
        written.append(save_png(grab_dock(dock, widget), out / "stain-widget.png"))
    if "overlay" in wanted:
        widget.side_by_side.click()  # back to one panel: the outputs lie over the input
        layers["enhanced"].visible = False
        layers["teacher"].visible = False
        viewer.reset_view()
        camera(viewer).zoom *= 1.5  # closer: one panel has the whole canvas
        settle(1.0)
        written.append(window_shot(viewer, out / "stain-overlay.png"))
    viewer.close()
    return written


def nuclei_shot(out: Path) -> list[Path]:
    """nuclei.png: Find nuclei on the sample mosaic: the Labels layer over the dark-field, zoomed in."""
    viewer, dock, widget, _ = stain_widget_on_mosaic("napari-digital-stain: Find nuclei")
    widget.device.setCurrentText("auto")
    if not widget.find_nuclei():
        raise RuntimeError(f"Find nuclei did not start: {widget.status.text()!r}")
    widget.wait(600)
    if "dark-field nuclei" not in viewer.layers:
        raise RuntimeError(f"Find nuclei did not finish: {widget.status.text()!r}")
    labels = viewer.layers["dark-field nuclei"]
    labels.contour = 2  # outlines, so the dark-field shows through
    labels.opacity = 1.0
    viewer.layers.selection.active = labels
    arrange(viewer, dock)
    viewer.reset_view()
    camera(viewer).zoom *= 2.0
    settle(1.0)
    written = [window_shot(viewer, out / "nuclei.png")]
    viewer.close()
    return written


def other_microscope_shot(out: Path) -> list[Path]:
    """other-microscope.png: a DSD_P tile stained by a DSD_U model, adapted (top row) and not (bottom row)."""
    import numpy as np
    from PIL import Image

    from digital_stain._napari import layers as L

    viewer = new_viewer("napari-digital-stain: another microscope")
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    arrange(viewer, dock)
    with Image.open(sorted(DSD_P_TILE.glob("*.png"))[0]) as im:
        tile = np.asarray(im.convert("RGB"))
    widget.model.set_value("dsd-unpaired-fast")
    for box in widget.output_boxes.values():
        box.setChecked(True)
    widget.device.setCurrentText("auto")
    shown = []
    for name, adapt in (("DSD_P, adapt auto", "auto"), ("DSD_P, adapt never", "off")):  # rows from the top
        source = viewer.add_image(tile, name=name, rgb=True)
        widget.adapt.setCurrentIndex(widget.adapt.findData(adapt))
        layers = widget.run(source, timeout_s=600)
        if set(layers) != {"enhanced", "teacher", "student"}:
            raise RuntimeError(f"staining did not finish: {widget.status.text()!r}")
        shown.append((source, layers))
    L.set_side_by_side(viewer, True, columns=4)  # one row per staining: input, enhanced, teacher, student
    widget.input_layer = shown[0][0]
    widget.adapt.setCurrentIndex(widget.adapt.findData("auto"))
    viewer.reset_view()
    settle(1.0)
    written = [window_shot(viewer, out / "other-microscope.png")]
    viewer.close()
    return written


def finetune_shot(out: Path, scratch: Path) -> list[Path]:
    """finetune-widget.png: the Fine-tune dock in the student stage (stages, loss plot and preview filled in)."""
    from digital_stain._napari.finetune_widget import PREVIEW_EVERY
    from digital_stain._sample_data import sample_paths

    hne = scratch / "microscopy" / "my-lab" / "H&E-reference-tiles"  # the field shows the end of the path
    hne.mkdir(parents=True)
    for path in sample_paths("stained"):
        shutil.copy2(path, hne / path.name)
    viewer = new_viewer("napari-digital-stain: Fine-tune", TALL_WINDOW)
    viewer.open_sample(PLUGIN, "darkfield_tiles")
    for layer in viewer.layers:
        layer.contrast_limits = DARKFIELD_LIMITS
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget.stained.set(str(hne))
    widget.source.setCurrentIndex(0)  # the open image layers
    widget.reset_choices()
    widget.model.set_value("dsd-unpaired-fast")
    widget.steps.setValue(400)
    widget.teacher_steps.setValue(60)  # a token teacher stage, so the picture shows it done
    widget.device.setCurrentText("auto")
    widget.val_every = 100
    widget.output.setText(str(scratch / "data" / "models" / "dsd-unpaired-fast-my-lab.safetensors"))
    t0 = time.monotonic()
    if not widget.start():
        raise RuntimeError(f"fine-tuning did not start: {widget.status.text()!r}")

    def previewed_and_plotted() -> bool:
        pixmap = widget.preview.pixmap()
        return (pixmap is not None and not pixmap.isNull() and f"step {PREVIEW_EVERY}" in widget.preview.toolTip()
                and widget.progress.value() >= PREVIEW_EVERY and "student" in widget.eta.text())

    try:
        settle(1.0, until=previewed_and_plotted, timeout=600)
        print(f"fine-tuned to step {widget.progress.value()} in {time.monotonic() - t0:.0f} s")
        written = [save_png(grab_dock(dock, widget), out / "finetune-widget.png")]
    finally:
        widget.stop()
        widget.wait(120)
    viewer.close()
    return written


def lazy_shot(out: Path) -> list[Path]:
    """lazy-slide.png: an 8192 x 8192 dask mosaic stained lazily, zoomed into one region once its chunks are done."""
    import dask.array as da

    viewer = new_viewer("napari-digital-stain: a large image, stained as viewed")
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Digitally stain")
    arrange(viewer, dock)
    mosaic, scale, units = mosaic_of_samples(viewer)
    reps = (-(-SLIDE // mosaic.shape[0]), -(-SLIDE // mosaic.shape[1]), 1)
    slide = da.tile(da.from_array(mosaic, chunks=(256, 256, 3)), reps)[:SLIDE, :SLIDE]  # never in memory
    source = viewer.add_image(slide, name="slide", rgb=True, scale=scale, units=units,
                              contrast_limits=DARKFIELD_LIMITS)
    widget.input_layer = source
    widget.model.set_value("dsd-unpaired-fast")
    for name, box in widget.output_boxes.items():
        box.setChecked(name == "student")
    widget.tile.setValue(512)
    widget.mode.setCurrentIndex(widget.mode.findData("auto"))
    t0 = time.monotonic()
    layers = widget.run(timeout_s=600)
    if "student" not in layers:
        raise RuntimeError(f"staining did not start: {widget.status.text()!r}")
    student = layers["student"]
    stains = widget.lazy_stains(student)  # one LazyStain per pyramid level, largest first

    def done() -> bool:
        return all(stain.pending == 0 for stain in stains)

    settle(1.0, until=done, timeout=300)  # the whole slide: a few coarse chunks
    # zoom into a region of level 0: about 700 x 700 pixels of the slide in each panel
    centre = (3000 * scale[0], 5200 * scale[1])
    camera(viewer).center = centre
    camera(viewer).zoom = 1.0 / scale[0]  # one screen pixel per image pixel
    settle(1.0, until=lambda: student.data_level == 0 and stains[0].network_runs["student"] > 0 and done(),
           timeout=300)
    settle(1.0)  # the last refresh (the widget refreshes lazy layers 150 ms after a chunk is ready)
    arrange(viewer, dock)  # the dock may have widened to fit the status line
    runs = stains[0].network_runs["student"]
    blocks = stains[0].arrays["student"].numblocks
    print(f"lazy: {runs} level-0 chunks of {blocks[0] * blocks[1]} stained "
          f"in {time.monotonic() - t0:.0f} s")
    viewer.layers.selection.active = student
    written = [window_shot(viewer, out / "lazy-slide.png")]
    viewer.close()
    return written


if __name__ == "__main__":
    sys.exit(main())
