"""Background jobs for the widgets: a napari worker thread, a Stop that really stops, and a signal bridge.

The library's long calls (``StainModel.stain``, ``fine_tune``) take a
``progress`` callback and a ``stop`` :class:`threading.Event`. A job runs
one of them in napari's thread pool; the callbacks emit Qt signals of a
:class:`Bridge` made in the GUI thread, so the widget's slots run in the GUI
thread (queued connections) and may touch the viewer. Stop only sets the
event: the library returns (or raises ``Cancelled``) at its next check, so
training still hands back its best state. Closing the window or a test's
teardown calls ``quit()``, which sets the same event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from napari.qt.threading import FunctionWorker, create_worker
from qtpy.QtCore import QObject, Signal

from digital_stain.core.arrays import InputError
from digital_stain.stain.tiling import Cancelled

_RUNNING: set = set()  # live jobs, so tests and shutdown can stop them all


class Bridge(QObject):
    """Signals a worker thread emits and the GUI thread receives."""

    progress = Signal(int, int)  # done, total
    event = Signal(object)  # anything else: training progress, previews, messages


@dataclass
class Outcome:
    """What a job ended with: a result, a stop, or an expected error (shown to the user, not raised)."""

    result: object = None
    stopped: bool = False
    error: str | None = None
    notes: list = field(default_factory=list)


class _StoppableWorker(FunctionWorker):
    stop_event: threading.Event | None = None

    def quit(self) -> None:  # window closing, test teardown
        if self.stop_event is not None:
            self.stop_event.set()
        super().quit()


def start_job(work: Callable[[Bridge, threading.Event], object], *, on_progress=None, on_event=None,
              on_done: Callable[[Outcome], None], on_crash: Callable[[BaseException], None],
              on_finished: Callable[[], None]):
    """Run ``work(bridge, stop)`` in a worker thread; returns ``(worker, stop_event)``.

    ``work`` returns a result; :class:`InputError` (bad data, bad model file)
    and :class:`Cancelled` become an :class:`Outcome` for ``on_done``. Any
    other exception reaches ``on_crash`` (napari also posts it as an error
    notification). ``on_finished`` runs last in every case.
    """
    stop = threading.Event()
    bridge = Bridge()
    on_done, on_crash, on_finished = _guarded(on_done), _guarded(on_crash), _guarded(on_finished)
    if on_progress is not None:
        bridge.progress.connect(_guarded(on_progress))
    if on_event is not None:
        bridge.event.connect(_guarded(on_event))

    def job() -> Outcome:
        try:
            return Outcome(result=work(bridge, stop))
        except Cancelled:
            return Outcome(stopped=True)
        except (InputError, MemoryError) as err:
            return Outcome(error=str(err) or f"{type(err).__name__} (no details)")

    worker = create_worker(job, _start_thread=False, _worker_class=_StoppableWorker,
                           _connect={"returned": on_done, "errored": on_crash})
    worker.stop_event = stop
    worker.bridge = bridge  # keep the QObject alive as long as the worker

    def finished() -> None:
        _RUNNING.discard(worker)
        on_finished()

    worker.finished.connect(finished)
    _RUNNING.add(worker)
    worker.start()
    return worker, stop


def _guarded(callback: Callable) -> Callable:
    """``callback``, made harmless once its widget is gone: a viewer closed from a script while a job
    ran deletes the widget's Qt objects, and the job's last reports must not raise into Qt then."""
    def call(*args):
        try:
            return callback(*args)
        except RuntimeError as err:
            if "has been deleted" in str(err):  # PyQt/PySide: "wrapped C/C++ object ... has been deleted"
                return None
            raise

    return call


def stop_all(timeout_s: float = 30.0) -> None:
    """Ask every running job to stop and wait for them, keeping Qt events flowing (tests, shutdown)."""
    from qtpy.QtWidgets import QApplication

    for worker in list(_RUNNING):
        worker.quit()
    end = time.monotonic() + timeout_s
    while _RUNNING and time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def wait_while(busy: Callable[[], bool], timeout_s: float) -> None:
    """Run a local Qt event loop while ``busy()`` (scripts and notebooks wait for a job this way).

    Polling ``busy`` (rather than waiting for a ``finished`` signal) cannot miss a job that ended
    before the loop started.
    """
    from qtpy.QtCore import QEventLoop, QTimer

    if not busy():
        return
    loop, poll = QEventLoop(), QTimer(interval=50)
    poll.timeout.connect(lambda: None if busy() else loop.quit())
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    poll.start()
    loop.exec_()
    poll.stop()


def running() -> int:
    return len(_RUNNING)
