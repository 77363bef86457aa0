"""The background queue: newest request first, oldest dropped, a failed job never run again."""

from __future__ import annotations

import threading
import time

from digital_stain.stain.background import NewestFirst


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_newest_request_first_and_the_oldest_dropped():
    gate, ran = threading.Event(), []
    queue = NewestFirst(lambda job: (gate.wait(10), ran.append(job)), max_pending=3)
    queue.submit("first")  # starts running at once and waits at the gate
    _until(lambda: queue.running == "first")
    for job in ("a", "b", "c", "d", "b"):  # "a" is dropped (over 3 waiting); "b" asked again becomes the newest
        queue.submit(job)
    assert queue.pending == 4
    gate.set()
    assert queue.wait(10)
    assert ran == ["first", "b", "d", "c"] and queue.thread is None  # no idle thread left


def test_a_failed_job_is_reported_once_and_never_run_again():
    calls, failures, done = [], [], []

    def compute(job):
        calls.append(job)
        if job == "bad":
            raise ValueError("boom")

    queue = NewestFirst(compute, done=done.append, failed=lambda job, error: failures.append((job, str(error))))
    for _ in range(3):
        queue.submit("bad")
        assert queue.wait(10)
    queue.submit("good")
    assert queue.wait(10)
    assert calls == ["bad", "good"] and failures == [("bad", "boom")] and done == ["good"]


def test_close_drops_the_waiting_jobs_and_refuses_new_ones():
    gate, ran = threading.Event(), []
    queue = NewestFirst(lambda job: (gate.wait(10), ran.append(job)))
    queue.submit(1)
    _until(lambda: queue.running == 1)
    queue.submit(2)
    closer = threading.Thread(target=queue.close)
    closer.start()
    gate.set()
    closer.join(10)
    queue.submit(3)
    assert not closer.is_alive() and queue.closed and ran == [1] and queue.pending == 0
