"""Redis mode, worker side: one ``ModelWorker`` thread per model reads its bundle's stream through
the consumer group, batches, answers each job once, reclaims and dead-letters; an ``EntryKeeper``
keeps the entries of a running batch its own. ``python -m server.worker`` (server/worker.py) is the
command around it."""
from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager

import redis

from .batching import Job, run_batch
from .config import WorkerConfig
from .metrics import ServerMetrics
from .models import ServedModel
from .redis_front import connect, redact_url
from .redisq import (GROUP, HEARTBEAT_SCRIPT, LEAVE_SCRIPT, REFRESH_SCRIPT, REPLY_SCRIPT, Keys, bundle_checksum,
                     bundle_member, decode_job, encode_reply, reply_ttl_of, stream_id_key)

log = logging.getLogger("server.worker")
DEAD_CONSUMER_IDLE_MS = 60_000   # a consumer silent this long, holding nothing, belonged to a killed worker
MIN_CLAIM_IDLE_MS = 100          # the keeper refreshes a batch's entries every third of --claim-idle-ms


class EntryKeeper(threading.Thread):
    """While a batch runs, keeps its entries this worker's and the worker advertised: every
    ``interval_s`` (a third of --claim-idle-ms, at most 1 s, the heartbeat period) it refreshes them
    (REFRESH_SCRIPT: XCLAIM ... JUSTID, no delivery counted) and heartbeats. Without it a batch
    longer than --claim-idle-ms was reclaimed by another worker and computed twice (dead-lettered
    once that happened --max-deliveries times), and a lone worker in a batch longer than the
    heartbeat window looked dead to the fronts. Idle between batches: one Condition wait."""

    def __init__(self, worker: "ModelWorker"):
        super().__init__(name=f"keeper-{worker.model.name}", daemon=True)
        self.worker = worker
        self.interval_s = min(1.0, worker.cfg.claim_idle_ms / 3000.0)
        self._cond = threading.Condition()
        self._ids: list | None = None   # entry ids of the batch in hand; None between batches
        self._closed = False

    @contextmanager
    def holding(self, ids: list):
        with self._cond:
            self._ids = list(ids)
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._ids = None
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._ids is None:
                    self._cond.wait()
                    continue
                ids = self._ids
                self._cond.wait(self.interval_s)   # woken early when the batch ends
                if self._closed or self._ids is not ids:
                    continue   # that batch ended (or another began: it starts its own interval)
                self._cond.release()   # Redis round trips without the lock: the batch may end meanwhile
                try:
                    self.worker.keep(ids)
                finally:
                    self._cond.acquire()


class ModelWorker(threading.Thread):
    def __init__(self, cfg: WorkerConfig, model: ServedModel, metrics: ServerMetrics, stop: threading.Event):
        super().__init__(name=f"worker-{model.name}", daemon=True)
        self.cfg, self.model, self.metrics, self.stop = cfg, model, metrics, stop
        self.keys = Keys(cfg.prefix)
        self.checksum = bundle_checksum(model)
        name, checksum = model.name, self.checksum
        # every key of this bundle: jobs for another bundle of the model go to another stream
        self.stream, self.workers_key = self.keys.jobs(name, checksum), self.keys.workers(name, checksum)
        self.execution_key, self.rows_key = self.keys.execution(name, checksum), self.keys.rows(name, checksum)
        self.stats_key, self.dead_key = self.keys.stats(name, checksum), self.keys.dead(name, checksum)
        self._bundle = bundle_member(checksum, model.version)
        self.r = connect(cfg.redis_url)
        self._reply = self.r.register_script(REPLY_SCRIPT)
        self._beat = self.r.register_script(HEARTBEAT_SCRIPT)
        self._leave = self.r.register_script(LEAVE_SCRIPT)
        self._refresh = self.r.register_script(REFRESH_SCRIPT)
        self._next_beat = self._next_claim = self._next_sweep = 0.0
        self._group_missing = False
        self.max_rows = min(cfg.max_batch, model.max_batch)
        self._execution = json.dumps(model.execution(), separators=(",", ":"))   # fronts report it
        self.clock_offset_s = 0.0   # Redis TIME - this machine's time.time(), measured at each heartbeat
        self._beat_lock = threading.Lock()   # a heartbeat (loop or keeper) never lands after withdraw()
        self.keeper = EntryKeeper(self)
        self.drained = threading.Event()   # set when the loop has left (after a stop: batch answered)

    # -- Redis plumbing -------------------------------------------------------------------------
    def ensure_group(self) -> None:
        try:   # from id 0: jobs added before any worker existed are served (or skipped as expired)
            self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def prepare(self) -> None:
        """Create the group and send the first heartbeat before saying "ready" (a front refuses
        jobs for a model with no live worker). Redis being down is not fatal: the loop retries."""
        try:
            self.ensure_group()
            self.heartbeat()
            self._next_beat = time.time() + 1.0
        except redis.RedisError as exc:
            log.warning("Redis at %s: %s (%s); will keep retrying", redact_url(self.cfg.redis_url),
                        type(exc).__name__, exc)

    def _finish(self, entry_id, reply_key: str, job_id: str, payload: bytes, stat: str, rows: int,
                reply_ttl_s: int, dead_reason: str = "") -> bool:
        keys = [self.stream, reply_key, self.stats_key, self.dead_key if dead_reason else "", self.rows_key]
        return bool(self._reply(keys=keys, args=[GROUP, entry_id, payload, reply_ttl_s, stat, job_id, dead_reason,
                                                 rows]))

    def _dead_letter(self, entry_id, fields: dict, reason: str) -> None:
        reply = fields.get(b"reply", b"").decode() or self.keys.reply("unknown")
        job_id = fields.get(b"id", b"?").decode()
        msg = f"job {job_id} {reason}; moved to the dead-letter stream {self.dead_key}"
        payload = encode_reply({"error": msg, "status": 500})
        self._finish(entry_id, reply, job_id, payload, "dead", _rows(fields), reply_ttl_of(fields, self.cfg.reply_ttl_s),
                     reason)
        self.metrics.dead_letters.labels(self.model.name).inc()
        self.metrics.count_prediction(self.model.name, ok=False)
        log.error("%s", msg, extra=_rid(fields.get(b"rid", b"").decode(errors="replace") or job_id))

    def _refuse(self, entry_id, job: Job, reply: str, reply_ttl_s: int) -> None:
        """A job naming another bundle in this bundle's stream (fronts never write one: only a job
        added by hand or a truncated-checksum collision): answer it with an error naming both,
        never with our labels."""
        msg = (f"model {self.model.name!r}: the front sent this job for version {job.model_version or '?'} "
               f"(bundle sha256 {job.bundle_checksum[:12] or '?'}) but worker {self.cfg.consumer} holds version "
               f"{self.model.version} (bundle sha256 {self.checksum[:12]}); run fronts and workers with the same "
               "bundle (during a rolling upgrade, start workers of the new bundle before its fronts)")
        log.error("%s", msg, extra=_rid(job.request_id or job.id))   # before the reply: the front returns on it
        self.metrics.count_prediction(self.model.name, ok=False)
        self._finish(entry_id, reply, job.id, encode_reply({"error": msg, "status": 409}), "refused", job.rows,
                     reply_ttl_s)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        backoff = 0.1
        self.keeper.start()
        try:
            while not self.stop.is_set():
                try:
                    self.step()
                    backoff = 0.1
                except redis.ResponseError as exc:
                    if "NOGROUP" in str(exc):   # Redis restarted empty, or the stream was deleted
                        self._next_beat, self._group_missing = 0.0, True
                        continue
                    # OOM at maxmemory, READONLY after a failover, LOADING...: wait for Redis to recover
                    backoff = self._retry_later(f"Redis refused a command ({type(exc).__name__}: {exc})", backoff)
                except redis.RedisError as exc:   # connection lost, socket timeout, ...: wait for it to come back
                    backoff = self._retry_later(f"Redis unreachable ({type(exc).__name__}: {exc})", backoff)
            self.leave()
        finally:
            self.keeper.close()
            self.drained.set()

    def _retry_later(self, why: str, backoff: float) -> float:
        self._next_beat = self._next_claim = 0.0   # beat again as soon as Redis is back
        log.warning("%s; retrying in %.1fs", why, backoff)
        self.stop.wait(backoff)
        return min(2.0, backoff * 2)

    def leave(self) -> None:
        """Clean shutdown: stop advertising this worker; forget the consumer if it holds nothing
        (what it still holds stays pending, for another worker to reclaim)."""
        try:
            held = self._leave(keys=[self.stream, self.workers_key], args=[GROUP, self.cfg.consumer])
            if held:
                log.warning("consumer %s left entries pending on %s; another worker will reclaim them",
                            self.cfg.consumer, self.stream)
        except redis.RedisError as exc:
            log.warning("could not deregister consumer %s (%s)", self.cfg.consumer, exc)

    def withdraw(self) -> None:
        """Drain starts: fronts stop counting this worker as live at once (a front with no other
        worker for the model answers a fast 503 instead of queueing for nobody)."""
        with self._beat_lock:   # a heartbeat under way (the keeper's) lands first, none after (stop is set)
            try:
                self.r.zrem(self.workers_key, self.cfg.consumer)
            except redis.RedisError:
                pass   # the heartbeat then simply ages out

    def heartbeat(self) -> None:
        with self._beat_lock:
            if self.stop.is_set():   # draining: never advertise again
                return
            t0 = time.time()
            sec, usec = self._beat(keys=[self.workers_key, self.execution_key, self.keys.bundles(self.model.name)],
                                   args=[self.cfg.consumer, self._execution, self._bundle])
            t1 = time.time()
            self.clock_offset_s = int(sec) + int(usec) / 1e6 - (t0 + t1) / 2

    def keep(self, ids: list) -> None:
        """The keeper's round during a long batch: the entries stay ours, the heartbeat fresh."""
        try:
            self._refresh(keys=[self.stream], args=[GROUP, self.cfg.consumer, *ids])
            self.heartbeat()
        except redis.RedisError as exc:   # the loop reports Redis trouble; the next round retries
            log.debug("refreshing %d held entries failed (%s)", len(ids), exc)

    def step(self) -> None:
        if self._group_missing:   # here, inside the loop's error handling (Redis may be gone again)
            self.ensure_group()
            self._group_missing = False
        now = time.time()
        if now >= self._next_beat:
            self.heartbeat()
            self._next_beat = now + 1.0
        if now >= self._next_claim:
            self.reclaim()
            self._next_claim = now + max(0.1, self.cfg.claim_idle_ms / 2000.0)
        if now >= self._next_sweep:
            self.forget_dead_consumers()
            self._next_sweep = now + 30.0
        got = self.r.xreadgroup(GROUP, self.cfg.consumer, {self.stream: ">"}, count=self.max_rows, block=500)
        entries = got[0][1] if got else []
        if not entries:
            return
        rows = sum(_rows(f) for _, f in entries)
        # Fill the batch for at most max_delay_ms with non-blocking reads 1 ms apart: Redis wakes a
        # blocked reader on new entries at once, but only notices a short BLOCK timeout at its next
        # cron tick (up to 100 ms at the default hz 10), so BLOCK cannot time a 2 ms window.
        # A stop (drain) ends the filling: what is in hand is answered, nothing more is taken.
        end = time.monotonic() + self.cfg.max_delay_ms / 1000.0
        while rows < self.max_rows and not self.stop.is_set():
            more = self.r.xreadgroup(GROUP, self.cfg.consumer, {self.stream: ">"}, count=max(1, self.max_rows - rows))
            if more and more[0][1]:
                entries += more[0][1]
                rows += sum(_rows(f) for _, f in more[0][1])
                continue
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.001))
        self.process(entries)

    def reclaim(self) -> None:
        start = "0-0"
        for _ in range(10):
            if self.stop.is_set():   # draining: take nothing new, reclaimed entries included
                return
            res = self.r.xautoclaim(self.stream, GROUP, self.cfg.consumer, self.cfg.claim_idle_ms,
                                    start_id=start, count=self.max_rows)
            start, msgs = res[0], [m for m in res[1] if m and m[1]]
            if msgs:
                ids = sorted((m[0] for m in msgs), key=stream_id_key)   # numeric order: "-10" after "-9"
                pend = self.r.xpending_range(self.stream, GROUP, min=ids[0], max=ids[-1], count=len(ids) * 4 + 10,
                                             consumername=self.cfg.consumer)
                times = {p["message_id"]: p["times_delivered"] for p in pend}
                log.warning("reclaimed %d stalled job(s) from %s", len(msgs), self.stream)
                live = []
                for eid, fields in msgs:
                    n = times.get(eid, 1)
                    if n > self.cfg.max_deliveries:
                        self._dead_letter(eid, fields, f"failed on {n - 1} deliveries to workers")
                    else:
                        live.append((eid, fields))
                if live:
                    self.process(live)
            if start in (b"0-0", "0-0"):
                break

    def forget_dead_consumers(self) -> None:
        """Consumers of killed workers stay in the group after their entries were reclaimed; drop
        those that hold nothing and were silent for a minute (the script re-checks atomically)."""
        try:
            consumers = self.r.xinfo_consumers(self.stream, GROUP)
        except redis.ResponseError:   # no group yet
            return
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name != self.cfg.consumer and c["pending"] == 0 and c["idle"] > DEAD_CONSUMER_IDLE_MS:
                self._leave(keys=[self.stream, self.workers_key], args=[GROUP, name])

    def process(self, entries: list) -> None:
        with self.keeper.holding([eid for eid, _ in entries]):
            self._process(entries)

    def _process(self, entries: list) -> None:
        jobs: list[tuple[bytes, Job, tuple[str, int]]] = []   # (entry id, job, (reply key, reply TTL s))
        now = time.time()
        for eid, fields in entries:
            try:
                job, reply_key = decode_job(self.model.name, fields, eid, self.clock_offset_s)
            except ValueError as exc:
                self._dead_letter(eid, fields, f"is malformed ({exc})")
                continue
            reply = (reply_key, reply_ttl_of(fields, self.cfg.reply_ttl_s))
            if job.expired(now):
                self._finish(eid, reply[0], job.id, b"", "expired", job.rows, reply[1])
                self.metrics.expired.labels(self.model.name).inc()
                log.info("job %s expired before a worker took it; skipped", job.id, extra=_rid(job.request_id))
                continue
            if (job.model_version, job.bundle_checksum) != (self.model.version, self.checksum):
                self._refuse(eid, job, *reply)
                continue
            jobs.append((eid, job, reply))
        if not jobs:
            return
        try:
            results = run_batch([j for _, j, _ in jobs], self.model.predict, self.max_rows, self.model.combine)
            groups = [(jobs, results)]
        except Exception:
            log.exception("batch of %d jobs failed (requests %s); retrying them one by one", len(jobs),
                          ", ".join(j.request_id or j.id for _, j, _ in jobs))
            groups = []
            for item in jobs:
                try:
                    groups.append(([item], run_batch([item[1]], self.model.predict, self.max_rows, self.model.combine)))
                except Exception:   # left pending: reclaimed later, dead-lettered after max_deliveries
                    self.metrics.count_prediction(self.model.name, ok=False)
                    log.exception("job %s failed", item[1].id, extra=_rid(item[1].request_id))
        for items, results in groups:
            r0 = results[0]
            self.metrics.observe_result(self.model.name, r0.batch_rows, r0.queue_s, r0.infer_s, 0)
            for (eid, job, reply), res in zip(items, results):
                meta = {"batch_rows": res.batch_rows, "queue_s": res.queue_s, "infer_s": res.infer_s,
                        "worker": self.cfg.consumer}
                if self._finish(eid, reply[0], job.id, encode_reply(meta, res.probs), "replied", job.rows, reply[1]):
                    self.metrics.images.labels(self.model.name).inc(job.n_images)
                    self.metrics.count_prediction(self.model.name, ok=True)


def _rid(request_id: str) -> dict:
    """``extra`` for a job's log lines: its HTTP request id (server.logs prints it), else none."""
    return {"request_id": request_id or "-"}


def _rows(fields: dict) -> int:
    try:
        return int(fields[b"shape"].split(b",")[0])
    except (KeyError, ValueError):
        return 1
