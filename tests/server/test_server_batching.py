"""Batch -> predict -> unbatch, and the embedded batching thread (fake model, no Redis)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from server.batching import Job, merge_views, run_batch, topk
from server.embedded import EmbeddedBatcher
from server.errors import APIError
from server_fixtures import make_fake_model
from trainer.tta import merge_probs


def _job(rows: int, seed: int, n_views: int = 1, merge: str = "mean", deadline: float = 0.0) -> Job:
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 255, (rows, 3, 32, 32), dtype=np.uint8)
    return Job(model="fake", pixels=px, n_images=rows // n_views, n_views=n_views, merge=merge,
               deadline=deadline or time.time() + 30)


def test_run_batch_equals_one_call_per_job_and_chunks():
    m = make_fake_model()
    calls: list[int] = []
    pred = lambda x: (calls.append(x.shape[0]), m.predict(x))[1]  # noqa: E731
    jobs = [_job(3, 0), _job(1, 1), _job(5, 2)]
    res = run_batch(jobs, pred, max_rows=4)
    assert calls == [4, 4, 1]                                    # 9 rows in chunks of at most 4
    for j, r in zip(jobs, res):
        np.testing.assert_allclose(r.probs, m.predict(j.pixels), rtol=1e-4, atol=1e-5)
        assert r.batch_rows == 9


@pytest.mark.parametrize("merge", ["mean", "max", "vote"])
def test_views_are_merged_per_image_with_trainer_tta(merge):
    m = make_fake_model()
    job = _job(6, 3, n_views=3, merge=merge)                     # 2 images x 3 views, image-major
    (res,) = run_batch([job], m.predict)
    per_view = torch.from_numpy(m.predict(job.pixels).reshape(2, 3, -1)).transpose(0, 1)
    np.testing.assert_allclose(res.probs, merge_probs(per_view, merge).numpy(), rtol=1e-4, atol=1e-5)
    assert res.probs.shape == (2, 3)


def test_ensemble_members_merge_views_then_fuse():
    a, b = make_fake_model(), make_fake_model(n_classes=3)
    pred = lambda x: np.stack([a.predict(x), b.predict(x)[:, ::-1]])  # noqa: E731   (M=2, N, K)
    job = _job(4, 4, n_views=2, merge="max")
    (res,) = run_batch([job], pred, combine=lambda ps: (ps[0] + ps[1]) / 2)
    want = (merge_views(a.predict(job.pixels), 2, 2, "max") + merge_views(b.predict(job.pixels)[:, ::-1], 2, 2, "max")) / 2
    np.testing.assert_allclose(res.probs, want, rtol=1e-4, atol=1e-5)


def test_topk_orders_and_clips():
    out = topk(np.array([[0.1, 0.7, 0.2]], np.float32), ["a", "b", "c"], 5)
    assert out == [{"labels": ["b", "c", "a"], "indices": [1, 2, 0], "probabilities": pytest.approx([0.7, 0.2, 0.1])}]


def test_embedded_batcher_batches_concurrent_jobs_and_answers_each_correctly():
    calls: list[int] = []
    m = make_fake_model(delay_s=0.03, calls=calls)
    b = EmbeddedBatcher("fake", m.predict, max_batch=16, max_delay_ms=20)
    jobs = [_job(1, i) for i in range(24)]
    results = [None] * len(jobs)

    def go(i):
        results[i] = b.infer(jobs[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    b.close()
    assert sum(calls) == 24 and max(calls) > 1 and len(calls) < 24      # batching happened
    for j, r in zip(jobs, results):
        np.testing.assert_allclose(r.probs, m.predict(j.pixels), rtol=1e-4, atol=1e-5)
        assert r.batch_rows >= 1


def test_embedded_batcher_skips_expired_jobs_and_times_out_with_504():
    calls: list[int] = []
    m = make_fake_model(delay_s=0.3, calls=calls)
    b = EmbeddedBatcher("fake", m.predict, max_batch=1, max_delay_ms=0)
    first = b.submit(_job(1, 0))                   # occupies the model for 0.3 s
    time.sleep(0.05)
    with pytest.raises(APIError) as exc:
        b.infer(_job(2, 1, deadline=time.time() + 0.1))
    assert exc.value.status == 504 and "deadline" in exc.value.message
    first.result(5)
    time.sleep(0.4)
    b.close()
    assert calls == [1]                            # the expired job was never computed


def test_embedded_batcher_full_queue_gives_503_with_retry_after():
    m = make_fake_model(delay_s=0.5)
    b = EmbeddedBatcher("fake", m.predict, max_batch=1, max_delay_ms=0, max_queue=2)
    b.submit(_job(1, 0))
    time.sleep(0.05)                               # the first is running; two wait
    b.submit(_job(1, 1))
    b.submit(_job(1, 2))
    with pytest.raises(APIError) as exc:
        b.submit(_job(1, 3))
    assert exc.value.status == 503 and exc.value.retry_after == 1
    b.close()


def test_lone_job_does_not_wait_for_the_batch_to_fill_but_arriving_ones_are_waited_for():
    calls: list[int] = []
    m = make_fake_model(calls=calls)
    b = EmbeddedBatcher("fake", m.predict, max_batch=16, max_delay_ms=5000)
    t0 = time.time()
    assert b.infer(_job(1, 0)).batch_rows == 1
    assert time.time() - t0 < 2.5                  # nothing being decoded: no 5 s wait for company
    results = []
    with b.arriving():                             # a request is still being decoded ...
        first = b.submit(_job(1, 1))
        time.sleep(0.2)
        second = b.submit(_job(2, 2))              # ... and joins the batch the first one waits in
    results = [first.result(10), second.result(10)]
    b.close()
    assert [r.batch_rows for r in results] == [3, 3] and calls == [1, 3]


def test_runners_keep_several_batches_in_flight():
    active, peak, lock = [0], [0], threading.Lock()
    m = make_fake_model()

    def predict(x):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return m.predict(x)

    b = EmbeddedBatcher("fake", predict, max_batch=1, max_delay_ms=0, runners=2)
    futures = [b.submit(_job(1, i)) for i in range(6)]
    out = [f.result(10) for f in futures]
    b.close()
    assert peak[0] == 2 and all(r.batch_rows == 1 for r in out)


def _recording(m, name, log, lock, active, delay=0.0):
    def predict(x):
        with lock:
            active.append(name)
            log.append((name, x.shape[0], len(active)))   # how many batches run at the start of this one
        time.sleep(delay)
        with lock:
            active.remove(name)
        return m.predict(x)
    return predict


def test_lone_batch_runs_on_the_solo_session_and_holds_every_runner_slot():
    m = make_fake_model()
    log, lock, active = [], threading.Lock(), []
    b = EmbeddedBatcher("fake", _recording(m, "runner", log, lock, active, 0.05), max_batch=1, max_delay_ms=0,
                        runners=2, solo=_recording(m, "solo", log, lock, active, 0.3))
    job = _job(1, 0)
    np.testing.assert_allclose(b.infer(job).probs, m.predict(job.pixels), rtol=1e-4, atol=1e-5)
    assert log == [("solo", 1, 1)]                 # nothing else to do: the session with every thread
    first = b.submit(_job(1, 1))                   # solo again (idle batcher) ...
    time.sleep(0.05)
    second = b.submit(_job(1, 2))                  # ... this one waits for it instead of sharing the cores
    first.result(10), second.result(10)
    b.close()
    assert log[1] == ("solo", 1, 1) and log[2][2] == 1 and b.solo_batches >= 2


def test_under_load_the_runners_use_their_own_sessions_side_by_side():
    m = make_fake_model()
    log, lock, active = [], threading.Lock(), []
    b = EmbeddedBatcher("fake", _recording(m, "runner", log, lock, active, 0.2), max_batch=1, max_delay_ms=0,
                        runners=2, solo=_recording(m, "solo", log, lock, active))
    with b.arriving():                             # more requests are being decoded: no solo batch
        futures = [b.submit(_job(1, i)) for i in range(4)]
        out = [f.result(10) for f in futures]
    b.close()
    assert [name for name, _, _ in log] == ["runner"] * 4 and max(n for _, _, n in log) == 2
    assert b.solo_batches == 0 and all(r.batch_rows == 1 for r in out)
