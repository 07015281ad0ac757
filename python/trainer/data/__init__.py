"""Data: layouts on disk, decoding, transforms and datasets."""
from .dataset import EvalShardSampler, ImageSamples, SeededShuffleSampler
from .images import ImageDecodeError, decode_image, find_bad_images
from .layout import DataError, DatasetSplits, discover_dataset, load_eval_samples
from .transforms import AugmentConfig, Normalize, PreprocessSpec, build_train_transform, eval_transform

__all__ = [
    "AugmentConfig", "DataError", "DatasetSplits", "EvalShardSampler", "ImageDecodeError", "ImageSamples",
    "Normalize", "PreprocessSpec", "SeededShuffleSampler", "build_train_transform", "decode_image",
    "discover_dataset", "eval_transform", "find_bad_images", "load_eval_samples",
]
