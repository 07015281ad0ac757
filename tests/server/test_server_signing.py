"""`--trusted-key PUB --require-signature`: the embedded server, the Redis front and the Redis worker
load only bundles signed by a trusted key (docs/BUNDLE.md, Trust), and the front checks a signed
ensemble's members against their pinned sha256; without the flags unsigned bundles still load."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, signed_copy
from export.signing import SignatureError
from server.__main__ import main as server_main
from server.app import create_app
from server.config import ServerConfig
from server_fixtures import (digit_images, digits_bundle, ensemble_bundle, redis_proc, redis_url,  # noqa: F401
                             start_worker, wait_ready)

pytestmark = pytest.mark.slow


@pytest.fixture
def signed(digits_bundle, keys, tmp_path):
    return signed_copy(digits_bundle, keys[0], tmp_path / "signed")


def test_embedded_server_serves_a_signed_bundle(signed, keys, tiny_digits):
    cfg = ServerConfig(bundles=[str(signed)], trusted_keys=(str(keys[1]),), require_signature=True, threads=1,
                       runners=1, solo_threads=0)
    app = create_app(cfg)
    try:
        r = app.test_client().post("/predict", data=digit_images(tiny_digits, 1)[0].read_bytes(),
                                   content_type="image/png")
        assert r.status_code == 200, r.get_json()
    finally:
        app.extensions["inference"].dispatcher.close()


def test_start_up_refuses_unsigned_and_wrongly_signed_bundles(digits_bundle, signed, keys, capsys):
    assert server_main(["--bundle", str(digits_bundle), "--trusted-key", str(keys[1]), "--require-signature"]) == 2
    assert "unsigned bundle" in capsys.readouterr().err
    assert server_main(["--bundle", str(signed), "--trusted-key", str(keys[2]), "--require-signature"]) == 2
    assert "not a trusted key" in capsys.readouterr().err
    assert server_main(["--bundle", str(signed), "--require-signature"]) == 2
    assert "--trusted-key" in capsys.readouterr().err


def test_the_redis_front_refuses_an_unsigned_bundle(digits_bundle, keys):
    cfg = ServerConfig(bundles=[str(digits_bundle)], redis_url="redis://127.0.0.1:1/0", trusted_keys=(str(keys[1]),),
                       require_signature=True)
    with pytest.raises(SignatureError, match="unsigned bundle"):
        create_app(cfg)   # before any connection to Redis


def test_redis_worker_checks_signatures(redis_url, signed, keys):
    bad = subprocess.run([sys.executable, "-m", "server.worker", "--redis-url", redis_url, "--bundle", str(signed),
                          "--trusted-key", str(keys[2]), "--require-signature"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "not a trusted key" in bad.stderr, bad.stderr[-2000:]
    worker = start_worker(redis_url, signed, "--trusted-key", str(keys[1]), "--require-signature")
    try:
        wait_ready(worker)
    finally:
        worker.kill()
        worker.wait()


def test_the_redis_front_checks_a_signed_ensembles_members(ensemble_bundle, keys, tmp_path):
    ens = signed_copy(ensemble_bundle, keys[0], tmp_path / "ens")
    cfg = ServerConfig(bundles=[str(ens)], redis_url="redis://127.0.0.1:1/0", trusted_keys=(str(keys[1]),),
                       require_signature=True)
    member = next((ens / "members").iterdir()) / "manifest.json"
    member.write_bytes(member.read_bytes() + b"\n")   # the ensemble's signature still holds; the pin does not
    with pytest.raises(ValueError, match="sha256 differs from the ensemble manifest's"):
        create_app(cfg)
