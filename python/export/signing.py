"""Ed25519 signatures over a bundle's manifest.json: ``python -m export keygen`` / ``sign`` / ``verify``.

    python -m export keygen --out keys/                      # keys/bundle-signing.key (0600) + .pub
    python -m export sign bundles/digits --key keys/bundle-signing.key
    python -m export verify bundles/digits --trusted-key keys/bundle-signing.pub
    load_bundle("bundles/digits", trusted_keys=["keys/bundle-signing.pub"], require_signature=True)

The signature (BUNDLE/signature.json) covers the exact bytes of manifest.json, which hold the sha256
of every artifact file and, for an ensemble, of every member's manifest.json: checking it and then
those hashes (which every reader does before loading) covers the whole bundle. Keys are PEM files
(PKCS#8 private key, SubjectPublicKeyInfo public key), which OpenSSL, and so the C++ runtime, reads
as they are. signature.json's format is bundle.signature.schema.json (docs/BUNDLE.md, "Trust"). A
signature proves who published the manifest, not that the model is safe or good.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .manifest import MANIFEST_NAME, BundleError, manifest_path

SIGNATURE_NAME = "signature.json"
SIGNATURE_SCHEMA_FILE = Path(__file__).with_name("bundle.signature.schema.json")  # docs/BUNDLE.md, "Trust"
SIGNATURE_VERSION = 1
PRIVATE_KEY_NAME, PUBLIC_KEY_NAME = "bundle-signing.key", "bundle-signing.pub"
_FIX_UNSIGNED = "sign it with 'python -m export sign BUNDLE --key PRIVATE_KEY' (or drop --require-signature)"


class SignatureError(BundleError):
    """A bundle's signature is missing, malformed, made by an untrusted key or does not match its manifest."""

    def __init__(self, message: str):
        super().__init__(message, "signature")


@dataclass(frozen=True)
class TrustPolicy:
    """Which signatures a loader accepts. Keys given: a signature that is present is always checked;
    require_signature: an unsigned bundle is refused too."""
    trusted_keys: tuple = ()       # Ed25519PublicKey objects
    require_signature: bool = False

    @property
    def active(self) -> bool:
        return bool(self.trusted_keys) or self.require_signature


def key_id(public_key) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key (names a key in messages)."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """Write an Ed25519 key pair: OUT/bundle-signing.key (PKCS#8 PEM, mode 0600) and .pub (PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    if not force and (priv_path.exists() or pub_path.exists()):
        raise BundleError(f"{priv_path}: a key pair already exists there; pass --force to replace it (bundles "
                          "signed with the old key then no longer verify with the new public key)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    priv_path.unlink(missing_ok=True)
    # created 0600 from the start: no moment where another user could read the private key
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: not a readable PEM private key ({exc}); make one with 'python -m export keygen "
                          "--out KEYDIR'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: not an Ed25519 private key; make one with 'python -m export keygen --out KEYDIR'")
    return key


def load_public_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable PEM public key ({exc}); pass the .pub file written by "
                             "'python -m export keygen'") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key; pass the .pub file written by 'python -m export "
                             "keygen'")
    return key


def trust_policy(trusted_keys: Iterable = (), require_signature: bool = False) -> TrustPolicy:
    """Key files (or already loaded public keys) -> TrustPolicy; require_signature needs at least one key."""
    keys = tuple(k if hasattr(k, "verify") else load_public_key(k) for k in trusted_keys or ())
    if require_signature and not keys:
        raise SignatureError("require_signature needs at least one trusted public key (--trusted-key PUB, the .pub "
                             "file written by 'python -m export keygen')")
    return TrustPolicy(keys, require_signature)


def sign_bundle(bundle: str | os.PathLike, private_key_path: str | os.PathLike) -> Path:
    """Sign BUNDLE/manifest.json's exact bytes; writes BUNDLE/signature.json and returns its path."""
    from .manifest import parse_manifest

    key = load_private_key(private_key_path)
    path = manifest_path(bundle)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"'{bundle}' is not a bundle: {path} cannot be read ({exc.strerror})") from None
    # never sign something no reader would accept; the schema requires every member's manifest_sha256,
    # which is how the signature covers the members
    parse_manifest(raw, str(path))
    doc = {"signature_version": SIGNATURE_VERSION, "algorithm": "ed25519", "signed_file": MANIFEST_NAME,
           "manifest_sha256": hashlib.sha256(raw).hexdigest(), "key_id": key_id(key.public_key()),
           "signature": base64.b64encode(key.sign(raw)).decode("ascii")}
    out = path.parent / SIGNATURE_NAME
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return out


def signature_doc_problem(doc) -> str | None:
    """What breaks bundle.signature.schema.json in a parsed signature.json (None when nothing does)."""
    from jsonschema.exceptions import relevance

    from .manifest import schema_validator

    errors = sorted(schema_validator(SIGNATURE_SCHEMA_FILE).iter_errors(doc), key=relevance, reverse=True)
    if not errors:
        return None
    return f"{errors[0].json_path.replace('$', 'signature', 1)}: {errors[0].message} ({SIGNATURE_SCHEMA_FILE.name})"


def check_signature(folder: Path, manifest_bytes: bytes, policy: TrustPolicy) -> str | None:
    """Check FOLDER/signature.json against the manifest bytes the caller parsed (not a second read of
    the file). Returns the signing key's id, None when unsigned and allowed; raises SignatureError."""
    if not policy.active:
        return None
    sig_path = folder / SIGNATURE_NAME
    if not sig_path.is_file():
        if policy.require_signature:
            raise SignatureError(f"{folder}: unsigned bundle ({SIGNATURE_NAME} not found) and a signature is "
                                 f"required; {_FIX_UNSIGNED}")
        return None
    try:
        doc = json.loads(sig_path.read_bytes())
        problem = signature_doc_problem(doc)
        if problem:
            raise ValueError(problem)
        signature = base64.b64decode(doc["signature"], validate=True)
        if len(signature) != 64:
            raise ValueError(f"an Ed25519 signature has 64 bytes, this one {len(signature)}")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SignatureError(f"{sig_path}: malformed signature file ({exc}); it was damaged or edited: copy the "
                             "bundle again or re-sign it with 'python -m export sign'") from None
    from cryptography.exceptions import InvalidSignature

    for key in policy.trusted_keys:
        try:
            key.verify(signature, manifest_bytes)
            return key_id(key)
        except InvalidSignature:
            continue
    trusted = {key_id(k) for k in policy.trusted_keys}
    if doc.get("key_id") in trusted:   # the claimed key is trusted, so the manifest or the signature changed
        changed = hashlib.sha256(manifest_bytes).hexdigest() != doc.get("manifest_sha256")
        what = f"{MANIFEST_NAME} was modified after signing" if changed else "the signature was modified"
        raise SignatureError(f"{folder}: signature check failed: {what}; do not load this bundle: copy it again from "
                             "its publisher or re-sign it with 'python -m export sign'")
    raise SignatureError(f"{folder}: signed by key {doc.get('key_id')!r}, which is not a trusted key (trusted: "
                         f"{', '.join(sorted(trusted))}), or the manifest was modified; pass the publisher's public "
                         "key with --trusted-key, or re-sign the bundle with a trusted key")
