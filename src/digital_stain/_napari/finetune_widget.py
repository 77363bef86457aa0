"""The **Fine-tune** dock widget: adapt a model to your microscope and H&E, with stages, a loss plot and a preview.

It calls :func:`digital_stain.train.finetune.fine_tune`, the same function as
``digital-stain train``, in a worker thread: the enhancer is refitted, the teacher
fine-tuned, the student distilled, and the result checked against the starting model
on held-out images. Each stage shows its own progress; Stop works in every stage (in
the student's, it returns within a step with the best validated state, which is
checked and written). A written model is announced to every model picker (the
Digitally stain widget offers it at once); a model that fails the check is kept aside
with a warning, and the starting model stays selected.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QListWidget, QListWidgetItem,
    QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget,
)

from digital_stain._napari import settings
from digital_stain.core.arrays import InputError
from digital_stain.core.devices import DEVICES
from digital_stain.io.images import list_images
from digital_stain.train.finetune import (FINE_TUNE_STEPS, PAIRED_TEACHER_STEPS, STAGES, TEACHER_STEPS,
                                          rejected_path)
from digital_stain._napari import layers as L
from digital_stain._napari.lossplot import LossPlot
from digital_stain._napari.models import ModelPicker, load_model, registry
from digital_stain._napari.worker import start_job, wait_while

SECTION = "finetune"
SIZES = ("auto", "full", "small", "fast", "tiny")
_ACTIVE: dict = {}  # the one training of this process: {"stop": Event, "widget": FineTuneWidget}
PREVIEW_EVERY = 200  # steps between previews (and one after the first step, to show it works)
PREVIEW_SIDE = 256
PAIRINGS = ("auto", "paired sections (same names)", "unpaired")
_PAIRED = dict(zip(PAIRINGS, ("auto", True, False)))  # fine_tune's paired=
MAX_LAYER_PIXELS = 8192 * 8192  # larger layers: train on exported regions instead


class FineTuneWidget(QWidget):
    """Dock widget: H&E folder, dark-field layers or folder, starting model, steps, size, device; Start/Stop."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        saved = settings.load_settings(SECTION)
        self._worker = self._stop = None
        self.last_output: Path | None = None
        self.last_result = None
        self.val_every: int | None = None  # None: fine_tune's own (about six validations per run)
        self.stage_state: dict[str, str] = {}  # stage -> its short status ("done", "120/300", ...)

        self.stained = _FolderField("Folder of H&E images from your lab (unpaired: any tissue, any size ≥ 128 px).")
        self.stained.set(saved.get("stained", ""))
        self.pairing = QComboBox()
        self.pairing.addItems(PAIRINGS)
        self.pairing.setToolTip("Paired sections (Learning to Align): each H&E image is the stained neighbour section "
                                "of the dark-field image (or layer) of the same name; alignment is learned, not "
                                "required. auto: paired when the names and sizes pair and the tissue agrees.")
        remembered = saved.get("pairing", "paired sections (same names)" if saved.get("paired") else PAIRINGS[0])
        self.pairing.setCurrentText(remembered if remembered in PAIRINGS else PAIRINGS[0])
        self.source = QComboBox()
        self.source.addItems(["open image layers", "a folder"])
        self.layers = QListWidget()
        self.layers.setToolTip("Tick the dark-field image layers to learn from.")
        self.layers.setMaximumHeight(90)
        self.darkfield = _FolderField("Folder of dark-field images.")
        self.darkfield.set(saved.get("darkfield", ""))
        self.model = ModelPicker(saved.get("model_files", []))
        self.steps = QSpinBox(minimum=1, maximum=500_000, singleStep=500,
                              value=_as_int(saved.get("steps"), FINE_TUNE_STEPS))
        self.steps.setToolTip("Student steps (default 500; with every stage, minutes on a 2-core CPU: see the "
                              "user guide).")
        # -1 shows as "default": 300 steps on H&E alone, 1000 on adjacent sections (fine_tune decides once it knows)
        self.teacher_steps = QSpinBox(minimum=-1, maximum=100_000, singleStep=100,
                                      value=_as_int(saved.get("teacher_steps"), -1))
        self.teacher_steps.setSpecialValueText("default")
        self.teacher_steps.setToolTip(f"Steps fine-tuning the teacher first (default: {TEACHER_STEPS} on your H&E "
                                      f"alone, {PAIRED_TEACHER_STEPS} on adjacent sections; 0 keeps the starting "
                                      "model's teacher).")
        self.scratch = QCheckBox("new student of size")
        self.scratch.setToolTip("Start a new student instead of fine-tuning the starting model's one.")
        self.size = QComboBox()
        self.size.addItems(SIZES)
        self.size.setToolTip("auto: full on a CUDA GPU, small elsewhere; fast stains whole slides quickly; tiny is for tests.")
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.output = QLineEdit()
        self.output.setToolTip("Where the fine-tuned model is written (the models folder is offered by the Digitally stain widget).")
        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stages = QLabel("")
        self.stages.setTextFormat(Qt.RichText)
        self.stages.setToolTip("enhancer: its CDFs refitted where your images differ from the model's; teacher: "
                               "fine-tuned on your H&E; student: distilled from it; check: compared with the "
                               "starting model on held-out images")
        self.progress = QProgressBar()
        self.eta = QLabel("")
        self.plot = LossPlot()
        self.preview = QLabel("the student's preview appears here")
        self.preview.setAlignment(Qt.AlignCenter)
        self.preview.setMinimumHeight(128)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        size_row = QHBoxLayout()
        size_row.addWidget(self.scratch)
        size_row.addWidget(self.size, 1)
        form = QFormLayout()
        form.addRow("H&&E folder", self.stained)  # && shows one & (a single one marks a shortcut)
        form.addRow("Pairing", self.pairing)
        form.addRow("Dark-field", self.source)
        form.addRow("", self.layers)
        form.addRow("", self.darkfield)
        form.addRow("Start from", self.model)
        form.addRow("Steps", self.steps)
        form.addRow("Teacher steps", self.teacher_steps)
        form.addRow("Student", size_row)
        form.addRow("Device", self.device)
        form.addRow("Save as", self.output)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button, 1)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.stages)
        layout.addWidget(self.progress)
        layout.addWidget(self.eta)
        layout.addWidget(self.plot)
        layout.addWidget(self.preview)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.source.setCurrentIndex(1 if saved.get("source") == "folder" else 0)
        self.size.setCurrentText(saved.get("size") if saved.get("size") in SIZES else "auto")
        self.device.setCurrentText(saved.get("device") if saved.get("device") in DEVICES else "auto")
        self.source.currentIndexChanged.connect(self._source_changed)
        self.scratch.toggled.connect(self.size.setEnabled)
        self.size.setEnabled(False)
        self.model.changed.connect(lambda _: self._suggest_output())
        self.start_button.clicked.connect(lambda: self.start())
        self.stop_button.clicked.connect(self.stop)
        self._source_changed()
        self._suggest_output()
        self.reset_choices()
        if _ACTIVE:  # a training started from a panel that was closed: this one can stop it
            self.stop_button.setEnabled(True)
            self.status.setText("a fine-tuning started earlier is still running; Stop stops it.")

    # -- public API ----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self) -> bool:
        """Check the inputs and start training; returns whether it started (problems become notifications)."""
        if self.running or _ACTIVE:
            show_info("fine-tuning is already running; press Stop first (one training at a time).")
            return False
        try:
            stained = self._check_folder(self.stained.value(), "H&E")
            darkfield, names, crop_source = self._darkfield()
            init = load_model(self.model.value, "cpu")
            if init.teacher is None:
                raise InputError(f"{init.name} has no teacher to learn from; start from a model with a teacher.")
            output = self._output_path()
        except InputError as err:
            show_error(str(err))
            return False
        except Exception as err:  # unreadable folders or layers: say so, never raise into Qt
            show_error(f"cannot start fine-tuning: {type(err).__name__}: {err}")
            return False
        self._save()
        self.plot.clear()
        steps = self.steps.value()
        # fine_tune validates about six times per run, as the command line does; tests may ask for more
        overrides = {} if self.val_every is None else {"val_every": self.val_every}
        options = dict(steps=steps, device=self.device.currentText(), config_overrides=overrides,
                       teacher_steps=None if self.teacher_steps.value() < 0 else self.teacher_steps.value(),
                       paired=_PAIRED[self.pairing.currentText()],
                       from_scratch=self.scratch.isChecked(),
                       size=None if not self.scratch.isChecked() or self.size.currentText() == "auto"
                       else self.size.currentText())
        crop = _center_crop(crop_source, PREVIEW_SIDE)
        self._set_running(True)
        if init.student is not None and not self.scratch.isChecked():
            self.status.setText(f"preparing to fine-tune the student of {init.name} (width "
                                f"{init.student.config['width']}, {init.student.config['n_blocks']} blocks)…")
        self._worker, self._stop = start_job(
            self._work(self.model.value, darkfield, names, stained, output, options, crop), on_event=self._on_event,
            on_done=lambda outcome: self._on_done(outcome, output), on_crash=self._on_crash,
            on_finished=self._on_finished)
        _ACTIVE.update(stop=self._stop, widget=self)
        return True

    def stop(self) -> None:
        """Stop training: within a step, keeping (and writing) the best validated state so far."""
        stop = self._stop or _ACTIVE.get("stop")
        if stop is not None:
            stop.set()
            self.status.setText("stopping: the best state so far is kept…")

    def wait(self, timeout_s: float = 3600.0) -> None:
        """Process Qt events until training ends (for scripts and notebooks)."""
        wait_while(lambda: self.running, timeout_s)

    def reset_choices(self, *_) -> None:
        """Refill the list of image layers: ticks are kept, new input images come ticked (outputs do not)."""
        from napari.layers import Image

        known = {self.layers.item(i).text() for i in range(self.layers.count())}
        ticked = set(self._ticked_names())
        self.layers.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                item = QListWidgetItem(layer.name)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                tick = layer.name in ticked if layer.name in known else _looks_darkfield(layer)
                item.setCheckState(Qt.Checked if tick else Qt.Unchecked)
                self.layers.addItem(item)

    # -- inputs ----------------------------------------------------------------------------
    def _ticked_names(self) -> list[str]:
        return [self.layers.item(i).text() for i in range(self.layers.count())
                if self.layers.item(i).checkState() == Qt.Checked]

    def _darkfield(self):
        """The dark-field training data (folder path or list of arrays), their names, and an image to preview on."""
        if self.source.currentIndex() == 1:
            folder = self._check_folder(self.darkfield.value(), "dark-field")
            from digital_stain.io.images import read_image

            return folder, None, np.asarray(read_image(list_images(folder)[0]))
        names = [n for n in self._ticked_names() if n in self.viewer.layers]
        if not names:
            raise InputError("no dark-field layer is ticked: tick the layers to learn from, or choose 'a folder'.")
        arrays = []
        for name in names:
            data, multiscale = L.image_source(self.viewer.layers[name])  # 3-D display does not matter here
            level = data[0] if multiscale else data
            plane = level.shape[-3:-1] if self.viewer.layers[name].rgb else level.shape[-2:]
            if plane[0] * plane[1] > MAX_LAYER_PIXELS:
                raise InputError(f"{name!r} is too large to train on whole ({plane[0]} x {plane[1]}); "
                                 "save a few regions of it to a folder and choose 'a folder'.")
            arrays.append(np.asarray(level))
        return arrays, names, arrays[0]

    @staticmethod
    def _check_folder(text: str, kind: str) -> Path:
        if not text:
            raise InputError(f"choose the {kind} folder first.")
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise InputError(f"the {kind} folder {folder} does not exist; choose a folder of {kind} images.")
        if not list_images(folder):
            raise InputError(f"the {kind} folder {folder} has no images (PNG, JPEG or TIFF); choose a folder of "
                             f"{kind} images.")
        return folder

    def _output_path(self) -> Path:
        text = self.output.text().strip()
        if not text:
            raise InputError("choose where to save the model (Save as).")
        path = Path(text).expanduser()
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        if path.exists():
            raise InputError(f"{path} already exists; choose another name so no model is overwritten.")
        return path

    def _suggest_output(self) -> None:
        stem = Path(self.model.value).stem
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.output.setText(str(settings.models_dir() / f"{stem}-finetuned-{stamp}.safetensors"))

    # -- the work, in a worker thread -----------------------------------------------------
    def _work(self, choice, darkfield, names, stained, output, options, crop):
        import torch

        from digital_stain.stain.oom import is_out_of_memory, release_memory
        from digital_stain.train.finetune import fine_tune, preview_student, teacher_checkpoint

        checkpoint = settings.data_dir() / "checkpoints" / (output.name + ".ckpt.safetensors")

        def work(bridge, stop):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            init = load_model(choice, options["device"])  # the teacher's pass runs on the chosen device too
            trained_with = {"enhancer": init.enhancer}  # replaced by the one the enhancer stage makes

            def callback(step, student):
                if step == 1 or step % PREVIEW_EVERY == 0:
                    preview = preview_student(trained_with["enhancer"], student, crop)
                    bridge.event.emit(("preview", step, preview))

            failed = False
            try:
                done = fine_tune(init, darkfield, stained, name=output.stem, checkpoint=checkpoint,
                                 darkfield_names=names,
                                 command="napari Fine-tune widget", on_note=lambda text: bridge.event.emit(("note", text)),
                                 progress=lambda p: bridge.event.emit(("progress", p)), stop=stop,
                                 callback=callback, on_enhancer=lambda e: trained_with.update(enhancer=e),
                                 **options)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_out_of_memory(err):
                    raise
                failed = True  # reported outside the except block, which holds the GPU tensors
            if failed:
                release_memory()
                raise MemoryError("the GPU ran out of memory while training; choose a smaller student (fast or "
                                  "tiny, with 'new student of size') or the CPU. The last checkpoint is kept in "
                                  f"{checkpoint.parent}.")
            if done.model is not None:
                done.model.save(output if done.accepted else rejected_path(output), overwrite=not done.accepted)
            for spent in (checkpoint, teacher_checkpoint(checkpoint)):  # the model holds the chosen states
                spent.unlink(missing_ok=True)
            return done

        return work

    # -- events, in the GUI thread ----------------------------------------------------------
    def _on_event(self, event) -> None:
        try:
            if event[0] == "progress":
                p = event[1]
                if p.stage:
                    self._stage_progress(p)
                if p.total:
                    self.progress.setRange(0, p.total)
                    self.progress.setValue(p.step)
                    if p.stage in ("", "student"):  # the plot shows the student's losses
                        self.plot.add(p.step, p.losses)
                    if p.stage in ("", "teacher", "student"):
                        eta = "" if math.isnan(p.eta_s) else f" · about {_duration(p.eta_s)} left in this stage"
                        where = f"{p.stage}: " if p.stage else ""
                        self.eta.setText(f"{where}step {p.step} of {p.total} · {p.images_per_s:.1f} images/s{eta}")
                if p.message:
                    self.status.setText(p.message)
            elif event[0] == "note":
                if "edge agreement" in event[1]:  # how Pairing "auto" decided, when the names pair
                    show_info(event[1])
            elif event[0] == "preview":
                _, step, image = event
                self.preview.setPixmap(_pixmap(image))
                self.preview.setToolTip(f"the student at step {step}, on the centre of your first dark-field image")
        except Exception as err:  # never raise into Qt's event loop
            show_warning(f"could not show training progress: {err}")

    def _stage_progress(self, p) -> None:
        """Mark the stages before ``p.stage`` done and show where ``p.stage`` is."""
        stopping = self._stop is not None and self._stop.is_set()
        for stage in STAGES[: STAGES.index(p.stage)]:
            state = self.stage_state.get(stage, "")
            if state not in ("kept", "stopped", "done"):  # ended: by a stop when it was still counting steps
                done, _, total = state.partition("/")
                self.stage_state[stage] = "stopped" if stopping and total and done != total else "done"
        if p.total:
            self.stage_state[p.stage] = "done" if p.step >= p.total and p.stage == "check" else f"{p.step}/{p.total}"
        else:
            self.stage_state.setdefault(p.stage, "…")
        self._show_stages()

    def _show_stages(self) -> None:
        parts = []
        for i, stage in enumerate(STAGES):
            state = self.stage_state.get(stage, "")
            mark = {"done": " ✓", "kept": " (kept)", "stopped": " (stopped)", "": ""}.get(state, f" {state}")
            text = f"{i + 1}. {stage}{mark}"
            active = state not in ("", "done", "kept", "stopped", "failed")
            parts.append(f"<b>{text}</b>" if active else text)
        self.stages.setText(" · ".join(parts))

    def _on_done(self, outcome, output: Path) -> None:
        try:
            self._report(outcome, output)
        except Exception as err:  # never raise into Qt's event loop
            show_error(f"fine-tuning ended, but showing its result failed: {type(err).__name__}: {err}")

    def _report(self, outcome, output: Path) -> None:
        if outcome.error is not None:
            show_error(outcome.error)
            self.status.setText(outcome.error)
            return
        done = outcome.result
        self.last_result = done
        if done.model is None:
            text = f"{done.summary}; nothing was written."
            show_info(text)
            self.status.setText(text)
            return
        if not done.accepted:
            text = (f"the fine-tuned model is not better than the starting one on your held-out images, so it is not "
                    f"offered for staining: {'; '.join(done.check.reasons)}. Check the H&E and dark-field folders "
                    f"(not swapped, not bright-field) or train longer. It was kept aside as "
                    f"{rejected_path(output).name} for a look.")
            show_warning(text)
            self.status.setText(text)
            self.stage_state["check"] = "failed"
            self._show_stages()
            return
        self.last_output = output
        registry().added.emit(str(output))
        state = "stopped early; wrote the best state so far" if done.result.cancelled else "wrote"
        text = f"{state}: {output.name} ({done.summary}). It is now offered in Digitally stain."
        show_info(text)
        self.status.setText(text)
        self._suggest_output()

    def _on_crash(self, error: BaseException) -> None:
        self.status.setText(f"training failed: {error}. The last checkpoint is kept in "
                            f"{settings.data_dir() / 'checkpoints'}.")

    def _on_finished(self) -> None:
        if _ACTIVE.get("stop") is self._stop:
            _ACTIVE.clear()
        stopped = self._stop is not None and self._stop.is_set()
        for stage, state in self.stage_state.items():
            if stopped and "/" in state or state == "…":
                self.stage_state[stage] = "stopped"
        self._show_stages()
        self.eta.setText("")  # no estimate outlives its run
        self._worker = self._stop = None
        self._set_running(False)

    def _set_running(self, on: bool) -> None:
        self.start_button.setEnabled(not on)
        self.stop_button.setEnabled(on)
        if on:
            self.stage_state = {} if self.teacher_steps.value() else {"teacher": "kept"}
            self._show_stages()
            self.progress.setRange(0, 0)  # busy until the first step (loading, teacher outputs)
            self.status.setText("preparing: loading images and the teacher's outputs…")
        elif self.progress.maximum() == 0:
            self.progress.setRange(0, 1)

    def _source_changed(self, *_) -> None:
        folder = self.source.currentIndex() == 1
        self.layers.setVisible(not folder)
        self.darkfield.setVisible(folder)

    def _save(self) -> None:
        try:
            settings.save_settings(SECTION, {
                "stained": self.stained.value(), "darkfield": self.darkfield.value(),
                "pairing": self.pairing.currentText(),
                "source": "folder" if self.source.currentIndex() == 1 else "layers", "steps": self.steps.value(),
                "teacher_steps": self.teacher_steps.value(),
                "size": self.size.currentText(), "device": self.device.currentText(),
                "model_files": self.model.files})
        except OSError as err:
            show_warning(f"could not remember the settings: {err}")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt)
        self.stop()
        super().closeEvent(event)


class _FolderField(QWidget):
    """A path box with a Browse button."""

    def __init__(self, tip: str):
        super().__init__()
        self.edit = QLineEdit()
        self.edit.setToolTip(tip)
        button = QPushButton("…")
        button.setFixedWidth(32)
        button.clicked.connect(self._browse)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit, 1)
        row.addWidget(button)

    def value(self) -> str:
        return self.edit.text().strip()

    def set(self, text: str) -> None:
        self.edit.setText(text)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a folder", self.value())
        if folder:
            self.edit.setText(folder)


def _looks_darkfield(layer) -> bool:
    """Ticked by default: image layers that are neither our outputs nor marked as H&E (the H&E sample)."""
    return not L.is_output(layer) and layer.metadata.get("kind") != "H&E"


def _as_int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _center_crop(image: np.ndarray, side: int) -> np.ndarray:
    """The central ``side`` square of a plane (the first plane of a stack)."""
    image = np.asarray(image)
    from digital_stain.core.arrays import split_planes

    stack, _ = split_planes(image.shape)
    image = image[(0,) * len(stack)]
    y, x = max(0, (image.shape[0] - side) // 2), max(0, (image.shape[1] - side) // 2)
    return image[y : y + side, x : x + side]


def _pixmap(image: np.ndarray) -> QPixmap:
    """A float RGB [0, 1] image as a pixmap (copied: QImage does not own numpy memory)."""
    rgb = np.ascontiguousarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    h, w = rgb.shape[:2]
    return QPixmap.fromImage(QImage(rgb.data, w, h, 3 * w, QImage.Format_RGB888).copy())


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
