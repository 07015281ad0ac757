"""Bundles: build (``python -m export``), read, verify and run them.

    from export import load_bundle, read_manifest
"""
from .loader import (EnsembleBundle, ModelBundle, Prediction, list_backends, load_bundle, register_backend)
from .manifest import SCHEMA_VERSION, BundleError, check_artifact, read_manifest, validate_manifest, verify_checksums

__all__ = [
    "SCHEMA_VERSION", "BundleError", "EnsembleBundle", "ModelBundle", "Prediction", "check_artifact",
    "list_backends", "load_bundle", "read_manifest", "register_backend", "validate_manifest", "verify_checksums",
]
