"""Batch prediction over many images with a bundle: Parquet parts, resumable, on one machine or Ray.

    python -m batch --bundle bundles/digits --images data/photos --out preds/
    python -m batch --bundle bundles/digits --images index.parquet --out preds/ --ray-address auto

    from batch import BatchOptions, run_batch, read_output
    run_batch(BatchOptions(bundle="bundles/digits", images="data/photos", out="preds/"))
    table = read_output("preds/")       # pyarrow.Table: path, label, topk_labels, topk_probs, error, ...

docs/batch.md has the output schema, the resume rules and the figures.
"""
from .job import BatchOptions, BatchSummary, run_batch
from .output import read_output

__all__ = ["BatchOptions", "BatchSummary", "read_output", "run_batch"]
