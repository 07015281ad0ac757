"""WSGI entry for gunicorn; flags come from the SERVER_ARGS environment variable.

    SERVER_ARGS="--bundle bundles/digits --redis-url redis://127.0.0.1:6379/0" \
        gunicorn -w 2 -k gthread --threads 16 -b 127.0.0.1:8000 'server.wsgi:app'

With several gunicorn workers use Redis mode (each process in embedded mode would hold its own
model copy and batch only its own requests), and set PROMETHEUS_MULTIPROC_DIR to an empty directory
so that /metrics sums every process (server.metrics). API keys: SERVER_API_KEY, as for `python -m server`.
"""
import os

from .__main__ import app_from_env_args

app = app_from_env_args(os.environ.get("SERVER_ARGS", ""))
