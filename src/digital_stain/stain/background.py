"""One background thread that serves the newest request first: how a viewer's missing chunks get stained.

A viewer asks for the region on screen now; what it asked for a moment ago may already be off
screen. :class:`NewestFirst` keeps the requests in order of asking (a repeated request moves to
the newest place), runs the newest one next, drops the oldest beyond ``max_pending``, and never
runs a job that failed before (it would fail again on every redraw). Its thread lives only while
there is work, so an idle one keeps nothing alive. It knows nothing of networks or chunks: the
:class:`~digital_stain.stain.lazy.LazyStain` that owns it hands it a ``compute(job)`` function.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable


class NewestFirst:
    """A queue of jobs and the one thread that runs them, newest request first.

    Parameters
    ----------
    compute : callable(job)
        Runs one job (in the worker thread).
    done : callable(job), optional
        Called after a job succeeded, unless closed meanwhile, before the job counts as finished
        (so :meth:`wait` returns after it).
    failed : callable(job, BaseException), optional
        Called after a job raised; the job is never run again.
    max_pending : int
        Most jobs kept waiting; the oldest requests are dropped beyond it.
    name : str
        The thread's name.
    """

    def __init__(self, compute: Callable[[Hashable], None], *, done: Callable[[Hashable], None] | None = None,
                 failed: Callable[[Hashable, BaseException], None] | None = None, max_pending: int = 64,
                 name: str = "LazyStain worker"):
        self.compute, self.done, self.failed = compute, done, failed
        self.max_pending, self.name = max_pending, name
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a job finished or was dropped
        self._waiting: OrderedDict[Hashable, None] = OrderedDict()  # oldest request first
        self._failed: set = set()
        self.running: Hashable | None = None
        self.thread: threading.Thread | None = None
        self.closed = False

    @property
    def pending(self) -> int:
        """Jobs waiting or running."""
        with self._lock:
            return len(self._waiting) + (self.running is not None)

    def submit(self, job: Hashable) -> None:
        """Ask for ``job`` (again): it becomes the newest request. Ignored once closed, or for a job that failed."""
        with self._lock:
            if self.closed or job in self._failed or job == self.running:
                return
            self._waiting[job] = None
            self._waiting.move_to_end(job)  # asked for again: it is what is on screen now
            while len(self._waiting) > self.max_pending:
                self._waiting.popitem(last=False)  # the oldest request is the least likely still to be looked at
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self.thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job waits or runs; False if ``timeout`` (s) ran out first."""
        with self._lock:
            return self._changed.wait_for(lambda: not self._waiting and self.running is None, timeout)

    def cancel_pending(self) -> int:
        """Drop the waiting jobs (not the running one); returns how many."""
        with self._lock:
            dropped = len(self._waiting)
            self._waiting.clear()
            self._changed.notify_all()
        return dropped

    def close(self, wait: bool = True) -> None:
        """Drop the waiting jobs and stop after the running one; ``wait`` joins the thread."""
        with self._lock:
            self.closed = True
            self._waiting.clear()
            thread = self.thread
            self._changed.notify_all()
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _serve(self) -> None:
        """The thread: newest request first, until none waits."""
        while True:
            with self._lock:
                if self.closed or not self._waiting:
                    self.thread = None
                    return
                job = self.running = self._waiting.popitem(last=True)[0]
            try:
                self.compute(job)
                if self.done is not None and not self.closed:
                    self.done(job)
            except Exception as error:  # a failed job must not stop the thread, nor be run again
                with self._lock:
                    self._failed.add(job)
                if self.failed is not None:
                    with contextlib.suppress(Exception):
                        self.failed(job, error)
            finally:
                with self._lock:
                    self.running = None
                    self._changed.notify_all()
