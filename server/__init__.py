"""HTTP inference service: Flask front, embedded or Redis Streams batching workers, client.

    python -m server --bundle bundles/digits                 # embedded mode, one process
    python -m server --bundle bundles/digits --redis-url redis://127.0.0.1:6379/0
    python -m server.worker --bundle bundles/digits --redis-url redis://127.0.0.1:6379/0
    python -m server.client --url http://127.0.0.1:8000 photo.jpg
"""
from __future__ import annotations


def create_app(*args, **kwargs):
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
