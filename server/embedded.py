"""Embedded mode: an in-process queue and one batching worker thread per model (no Redis needed)."""
from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import contextmanager
from concurrent.futures import Future, TimeoutError as FutureTimeout

from .batching import BatchResult, Job, PredictFn, run_batch
from .errors import APIError

log = logging.getLogger("server.embedded")


class EmbeddedBatcher:
    """Collects jobs for one model into batches of up to max_batch rows.

    A batch takes every job already queued; it waits (at most max_delay_ms) for more only while
    requests for this model are still being decoded (``arriving``): a lone request runs at once,
    so batching costs no latency when there is nothing to batch with.

    With several runners and a ``solo`` predict (a session with all the runners' threads), a batch
    that finds no other batch running and no request being decoded runs on ``solo`` and holds every
    runner slot while it does: a lone request gets every core (mobilenet_v3_large batch 1 on 2
    cores: 3.6 ms instead of 6.3), and under load the runners keep their single-thread sessions,
    which give more images/s than one pooled call at a time.
    """

    def __init__(self, name: str, predict: PredictFn, max_batch: int = 32, max_delay_ms: float = 5.0,
                 max_queue: int = 256, combine=None, runners: int = 1, solo: PredictFn | None = None,
                 max_queue_rows: int = 1024):
        self.name, self.predict, self.combine = name, predict, combine
        self.solo = solo if runners > 1 else None
        self.runners = runners
        self._running = 0                    # runner slots taken by batches being computed
        self._slots = threading.Condition()
        self.solo_batches = 0                # how many batches ran on the solo session
        self.max_batch, self.max_delay = max_batch, max_delay_ms / 1000.0
        self.max_queue, self.max_queue_rows = max_queue, max_queue_rows
        # model rows (images x views) admitted and not yet answered or dropped: queued, or being
        # computed by a runner or a request's own thread. Jobs differ in size by up to ~1000x (one
        # image vs 64 images x 16 views), so a job count alone does not bound memory or wait.
        self._rows = 0
        self._rows_lock = threading.Lock()
        self._q: queue.Queue[tuple[Job, Future]] = queue.Queue()
        self._arriving = 0
        self._arriving_lock = threading.Lock()
        self._stop = threading.Event()
        # runners > 1: several batches in flight at once (the model must allow concurrent calls, as
        # onnxruntime sessions do); with one intra-op thread each this avoids the thread pool's
        # synchronisation and spinning, which on CPU costs more than it gains at batch sizes > 1.
        self._threads = [threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True)
                         for i in range(runners)]
        for t in self._threads:
            t.start()

    def depth(self) -> int:
        return self._q.qsize()

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    @contextmanager
    def arriving(self):
        """Wrap the decoding of a request for this model: the batch being gathered waits for it."""
        with self._arriving_lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._arriving_lock:
                self._arriving -= 1

    def rows(self) -> int:
        """Model rows queued or being computed."""
        return self._rows

    def _admit(self, job: Job) -> None:
        with self._rows_lock:
            if self._rows and self._rows + job.rows > self.max_queue_rows:
                raise APIError(503, f"model {self.name!r} has {self._rows} model rows queued or running and this "
                                    f"request adds {job.rows} (--max-queue-rows {self.max_queue_rows}); retry "
                                    "shortly", retry_after=1)
            self._rows += job.rows

    def _release(self, job: Job) -> None:
        with self._rows_lock:
            self._rows -= job.rows

    def submit(self, job: Job) -> Future:
        """Queue an admitted job (``_admit``); the runner that takes it releases its rows."""
        if self._q.qsize() >= self.max_queue:
            raise APIError(503, f"model {self.name!r} has {self._q.qsize()} queued requests (--max-queue "
                                f"{self.max_queue}); retry shortly", retry_after=1)
        fut: Future = Future()
        self._q.put((job, fut))
        return fut

    def infer(self, job: Job) -> BatchResult:
        self._admit(job)
        queued = False
        try:
            direct = self._run_here(job)
            if direct is not None:
                return direct
            fut = self.submit(job)
            queued = True
        finally:
            if not queued:   # answered here or refused; a queued job's rows go with its batch
                self._release(job)
        try:
            return fut.result(timeout=max(0.0, job.deadline - time.time()))
        except FutureTimeout:
            fut.cancel()
            raise APIError(504, f"no answer within the {job.deadline - job.enqueued:.1f}s left of the request "
                                f"deadline when the job was queued (--timeout-s); the server is overloaded") from None

    def _run_here(self, job: Job) -> BatchResult | None:
        """A job that finds nothing queued or arriving and a free slot (every slot, for the solo
        session) runs in the calling thread: no hand-over to a runner and back (two thread wake-ups,
        ~0.25 ms here). None otherwise: the job then goes through the queue."""
        if self._arriving or not self._q.empty():
            return None
        taken = self._take_slots(wait=False)
        if taken is None:
            return None
        slots, predict = taken
        try:
            (result,) = run_batch([job], predict, self.max_batch, self.combine)
            return result
        except Exception as exc:   # as in a runner: the model failed, not the request
            log.exception("batch of 1 job failed")
            raise APIError(500, f"inference failed: {exc}") from exc
        finally:
            self._free_slots(slots)

    def _gather(self) -> list[tuple[Job, Future]]:
        try:
            first = self._q.get(timeout=0.2)
        except queue.Empty:
            return []
        items, rows = [first], first[0].rows
        end = time.monotonic() + self.max_delay
        while rows < self.max_batch:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                remaining = end - time.monotonic()
                if remaining <= 0 or not self._arriving:
                    break
                try:
                    item = self._q.get(timeout=remaining)
                except queue.Empty:
                    break
            items.append(item)
            rows += item[0].rows
        return items

    def _loop(self) -> None:
        while not self._stop.is_set():
            items = self._gather()
            if items:
                self._run_items(items)

    def _run_items(self, items: list[tuple[Job, Future]]) -> None:
        """Run the jobs still waited for; every job's rows are released before its answer is set
        (a client that sends its next request at once finds them free)."""
        now = time.time()
        # skip what nobody waits for any more: cancelled (timed out) or past its deadline
        live = [(j, f) for j, f in items if not j.expired(now) and f.set_running_or_notify_cancel()]
        for j, f in items:
            if not any(f is g for _, g in live):
                self._release(j)
        if not live:
            return
        jobs = [j for j, _ in live]
        slots, predict = self._take_slots()
        try:
            results = run_batch(jobs, predict, self.max_batch, self.combine)
        except Exception as exc:  # a model failure answers every job of the batch with a 500
            log.exception("batch of %d jobs failed", len(jobs))
            results = [APIError(500, f"inference failed: {exc}")] * len(jobs)
        finally:
            self._free_slots(slots)
            for j in jobs:
                self._release(j)
        for (_, f), r in zip(live, results):
            if isinstance(r, APIError):
                f.set_exception(r)
            else:
                f.set_result(r)

    def _take_slots(self, wait: bool = True) -> tuple[int, PredictFn] | None:
        """(slots held, predict to call): every slot and the solo session when nothing else runs
        and nothing is arriving; otherwise one slot (waiting while a solo batch holds them all).
        wait=False: None instead of waiting, and None while others run when there is a solo session
        (a lone request then queues rather than take one core beside them)."""
        with self._slots:
            if self.solo is not None:
                if self._running == 0 and not self._arriving:
                    self._running = self.runners
                    self.solo_batches += 1
                    return self.runners, self.solo
                if not wait:
                    return None
            while self._running >= self.runners:
                if not wait:
                    return None
                self._slots.wait()
            self._running += 1
            return 1, self.predict

    def _free_slots(self, n: int) -> None:
        with self._slots:
            self._running -= n
            self._slots.notify_all()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
