"""The scale-out engine: the same job on a Ray cluster through Ray Data (the ``ray`` extra).

    python -m batch --bundle bundles/digits --images index.parquet --out preds/ --ray-address auto

``ray.data.from_items`` over the paths still to do (the driver has already subtracted the
done-manifest), ``map_batches`` with ``BundlePredictor``: an actor class that loads the bundle once
(``num_cpus=1``, or ``num_gpus=1`` per actor with ``--device cuda``) and decodes, preprocesses and
classifies its batches. The results (path, probabilities, error: a few hundred bytes a row) stream
back to the driver, which commits them with the same parts and done-manifest as the embedded engine,
so a resume works the same way whichever engine wrote the parts. Scheduling, retries of failed
actors and back-pressure are Ray Data's. Every machine must see the bundle and the images at the
same paths (a shared filesystem); each actor checks that its bundle is the job's (manifest sha256).
"""
from __future__ import annotations

import logging

import numpy as np

from trainer.errors import UserError

log = logging.getLogger("batch")


class BundlePredictor:
    """Ray Data actor: loads the bundle once, then {"path": [...]} -> {"path", "probs", "error"}."""

    def __init__(self, opts, identity, threads: int):
        from .job import load_checked
        from .plan import PredictPlan

        self.bundle = load_checked(opts, identity, threads)
        self.plan = PredictPlan.of(self.bundle)

    def __call__(self, batch: dict) -> dict:
        from .plan import collate

        paths = [str(p) for p in batch["path"]]
        _, crops, errors = collate([(p, *self.plan.preprocess(p)) for p in paths])
        ok = np.array([not e for e in errors], dtype=bool)
        probs = self.plan.predict(self.bundle, crops, ok)  # (N, K) float32, NaN rows for errors
        return {"path": np.array(paths, dtype=object), "probs": probs, "error": np.array(errors, dtype=object)}


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise UserError(f"--ray-address needs Ray Data ({exc}); install the extra: pip install "
                        "'shipclassifier[ray]' (or 'ray[data]'), or leave out --ray-address to run on this "
                        "machine") from None
    return ray


def connect(address: str):
    """ray.init for --ray-address (a driver that is already connected keeps its connection); returns
    (ray, whether this call started the connection and so must shut it down)."""
    ray = _import_ray()
    if ray.is_initialized():
        log.info("batch: using the Ray connection this process already has")
        return ray, False
    if address == "local":
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)
    return ray, True


def run_ray(opts, identity, pending: list[str], sink) -> None:
    ray, started = connect(opts.ray_address)
    try:
        cuda = opts.device.startswith("cuda")
        resources = ray.cluster_resources()
        per_actor = "GPU" if cuda else "CPU"
        available = int(resources.get(per_actor, 0))
        if available < 1:
            raise UserError(f"--ray-address {opts.ray_address}: the cluster has no {per_actor} "
                            f"({', '.join(f'{k}={v:g}' for k, v in sorted(resources.items()) if k in ('CPU', 'GPU'))})")
        actors = opts.ray_workers or available
        threads = opts.threads or 1  # each actor holds one CPU: one model thread each
        log.info("batch: %d images to classify on Ray (%d actors, %s each), batches of %d", len(pending), actors,
                 f"1 {per_actor}", opts.batch_size)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts committed rows, resumed ones included
        blocks = max(actors * 4, -(-len(pending) // (opts.batch_size * 4)))
        ds = ray.data.from_items([{"path": p} for p in pending], override_num_blocks=min(blocks, len(pending)))
        ds = ds.map_batches(BundlePredictor, fn_constructor_kwargs={"opts": opts, "identity": identity,
                                                                    "threads": threads},
                            batch_size=opts.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=0 if cuda else 1, num_gpus=1 if cuda else 0)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            sink.add([str(p) for p in batch["path"]], batch["probs"], [str(e) for e in batch["error"]])
    finally:
        if started:
            ray.shutdown()
