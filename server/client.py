"""Python client and command line for the inference service (standard library only).

    python -m server.client --url http://127.0.0.1:8000 photo.jpg [more.png ...] [--model NAME] [--tta hflip] [--topk 5] [--json]

    from server.client import Client
    Client("http://127.0.0.1:8000").predict(["photo.jpg"], tta="hflip")["predictions"][0]["labels"]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class ServerError(RuntimeError):
    """The server answered with an error; ``status`` is the HTTP code, the message is the server's."""

    def __init__(self, status: int, message: str, retry_after: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


class Client:
    """``api_key``: sent as ``Authorization: Bearer KEY`` (default: the SERVER_API_KEY environment
    variable's first key, as the server reads it; None there: no header)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 30.0, retries: int = 2,
                 api_key: str | None = None):
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
        if api_key is None:
            api_key = os.environ.get("SERVER_API_KEY", "").split(",")[0].strip() or None
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> dict:
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=body, method=method, headers={**self._auth, **(headers or {})})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                raw = exc.read()
                try:
                    msg = json.loads(raw).get("error", raw.decode(errors="replace"))
                except ValueError:
                    msg = raw.decode(errors="replace")[:500]
                retry_after = exc.headers.get("Retry-After")
                if exc.code == 503 and retry_after and attempt < self.retries:   # backpressure: wait and retry
                    time.sleep(float(retry_after))
                    continue
                raise ServerError(exc.code, msg, retry_after) from None
            except urllib.error.URLError as exc:
                raise ConnectionError(f"cannot reach {self.url} ({exc.reason}); is `python -m server` running?") from None
        raise AssertionError("unreachable")

    def predict(self, images, model: str | None = None, tta: str | None = None, topk: int = 5) -> dict:
        """images: paths or bytes (one or a list). Returns the server's JSON answer. One image goes as a
        raw body (the server's fast path), several as one multipart request."""
        if isinstance(images, (str, Path, bytes)):
            images = [images]
        named = [(f"image{i}", img) if isinstance(img, bytes) else (Path(img).name, Path(img).read_bytes())
                 for i, img in enumerate(images)]
        options = [(k, v) for k, v in (("model", model), ("tta", tta), ("topk", topk)) if v is not None]
        if len(named) == 1:   # one image: a raw body, the server's cheapest path; the name is ours to fill in
            name, data = named[0]
            query = f"?{urllib.parse.urlencode(options)}" if options else ""
            out = self._request("POST", f"/predict{query}", data, {"Content-Type": "application/octet-stream"})
            for pred in out.get("predictions", []):
                pred["file"] = name
            return out
        boundary = uuid.uuid4().hex
        parts = []
        for name, data in named:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        for key, value in options:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self._request("POST", "/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def models(self) -> dict:
        return self._request("GET", "/models")

    def ready(self) -> bool:
        try:
            self._request("GET", "/v2/health/ready")
            return True
        except (ServerError, ConnectionError):
            return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.client", description="Classify images with a running server")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None)
    p.add_argument("--tta", default=None, help="none, hflip, five-crop, ... (default: the bundle's)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.add_argument("--api-key", default=None,
                   help="the server's API key (default: the SERVER_API_KEY environment variable, which keeps it out of `ps`)")
    a = p.parse_args(argv)
    missing = [f for f in a.images if not Path(f).is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        out = Client(a.url, a.timeout, api_key=a.api_key).predict(a.images, a.model, a.tta, a.topk)
    except (ServerError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    for pred in out["predictions"]:
        best = ", ".join(f"{lab} {pr:.3f}" for lab, pr in zip(pred["labels"], pred["probabilities"]))
        print(f"{pred['file']}: {best}")
    t = out["timings_ms"]
    print(f"model {out['model']} {out['version']}, tta {out['tta']}, batch {out['batch_size']}, "
          f"{t['total']:.1f} ms (decode {t['decode']:.1f}, queue {t['queue']:.1f}, inference {t['inference']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
