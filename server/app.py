"""Flask app factory: ``create_app(config)``; nothing connects or loads at import time."""
from __future__ import annotations

import time

from flask import Flask, g, request

from .config import ServerConfig
from .errors import register_error_handlers
from .fastpath import RawPredictPath
from .front import DrainState, FrontLayer
from .metrics import ServerMetrics
from .models import ModelSet, ServedModel, load_served_model


def create_app(config: ServerConfig | dict | None = None, models: list[ServedModel] | None = None,
               dispatcher=None, drain: DrainState | None = None) -> Flask:
    """Build the app. ``models``/``dispatcher`` may be injected (tests); otherwise bundles are loaded
    from ``config.bundles`` (weights only in embedded mode) and the dispatcher follows ``redis_url``.
    ``drain``: the requests-in-flight counter the serving process waits on at SIGTERM (shared memory
    when another process receives the signal); ``app.extensions["drain"]`` holds it."""
    from . import api_kserve, api_ops, api_page, api_predict
    from .service import EmbeddedDispatcher, InferenceService

    cfg = config if isinstance(config, ServerConfig) else ServerConfig(**(config or {}))
    if models is None:
        cfg.validate()
        embedded = cfg.redis_url is None
        models = [load_served_model(b, cfg.backend, with_weights=embedded, layout=cfg.layout_request(),
                                    device=cfg.device, trust=(cfg.trusted_keys, cfg.require_signature),
                                    precision=cfg.precision)
                  for b in cfg.bundles]
    model_set = ModelSet(models)
    metrics = ServerMetrics()
    if dispatcher is None:
        if cfg.redis_url:
            from .redis_front import RedisDispatcher
            dispatcher = RedisDispatcher(cfg.redis_url, cfg.prefix, cfg.max_queue, max_queue_rows=cfg.max_queue_rows,
                                         models=list(model_set), timeout_s=cfg.timeout_s,
                                         reply_ttl_s=cfg.reply_ttl_s)
        else:
            dispatcher = EmbeddedDispatcher(model_set, cfg)

    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config.update(MAX_CONTENT_LENGTH=cfg.max_request_bytes, JSON_SORT_KEYS=False, DEBUG=False,
                      PROPAGATE_EXCEPTIONS=False)
    app.extensions["inference"] = InferenceService(cfg, model_set, dispatcher, metrics)
    register_error_handlers(app)
    for mod in (api_predict, api_kserve, api_ops, api_page):
        app.register_blueprint(mod.bp)

    @app.before_request
    def _start_timer():
        g.t0 = time.perf_counter()
        g.arrival = time.time()   # the request deadline (--timeout-s) starts here and covers decoding

    @app.after_request
    def _count(resp):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint, str(resp.status_code)).inc()
        if "t0" in g:
            metrics.request_latency.labels(endpoint).observe(time.perf_counter() - g.t0)
        return resp

    app.wsgi_app = RawPredictPath(app, app.wsgi_app)   # raw-body POST /predict without Flask's per-request work
    # outermost, so request ids, API keys and the drain cover the fast path as well as Flask
    drain = drain or DrainState()
    app.extensions["drain"] = drain
    metrics.watch_in_flight(lambda: drain.in_flight)
    app.wsgi_app = FrontLayer(app.wsgi_app, tuple(cfg.api_keys), drain, metrics)
    return app
