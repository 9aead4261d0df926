"""Signed artifacts: who published it, on top of what the manifest proves (that nothing changed since).

A manifest's hashes prove integrity, not origin: whoever changes an artifact can recompute them. A
signature made with the publisher's private key, checked with their public key, proves origin. Signing
is OpenSSF's ``model-signing`` (the maintained library for signing ML models; its signature is a
sigstore bundle over every file's hash): key-based here, which works offline. The signature lies inside
the artifact as ``model.sig``, so ``dvc push`` / ``dvc artifacts get`` carry it; it is outside the
manifest and the artifact id (it signs them)."""

from __future__ import annotations

from pathlib import Path

from pipeline.consumer import untrusted
from pipeline.consumer.manifest import SIGNATURE
from pipeline.errors import PipelineError, first_line

MAX_SIGNATURE_BYTES = 1 << 20  # a key-based bundle over a dozen files is ~3 KB


def _hashing():
    import model_signing.hashing as hashing

    # every file of the artifact but the signature itself (names relative to the artifact)
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def _read_key(path: str | Path, what: str) -> Path:
    path = Path(path)
    untrusted.read_bytes(path, what, limit=1 << 16)  # a regular file of a key's size, before any parser sees it
    return path


def sign(directory: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Sign the artifact at ``directory`` (verified first) with an elliptic-curve private key (PEM);
    returns the signature's path."""
    from model_signing import signing

    directory = Path(directory)
    key = _read_key(private_key, "private key")
    target = directory / SIGNATURE
    tmp = directory / f".{SIGNATURE}.tmp"
    try:
        signing.Config().use_elliptic_key_signer(private_key=key, password=password).set_hashing_config(
            _hashing()).sign(directory, tmp)
        tmp.replace(target)
    except (ValueError, TypeError) as exc:  # cryptography's and model-signing's way of saying "not that key"
        raise PipelineError(f"cannot sign with {private_key}: {first_line(exc)} (an EC private key in PEM: "
                            f"openssl ecparam -name prime256v1 -genkey -noout -out key.pem)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def check_signature(directory: str | Path, public_key: str | Path) -> None:
    """Refuse the artifact unless ``model.sig`` is there and was made by ``public_key``'s private key over
    exactly these files."""
    from model_signing import verifying

    directory = Path(directory)
    key = _read_key(public_key, "public key")
    sig = directory / SIGNATURE
    if not sig.exists():
        raise PipelineError(f"{directory} is not signed (no {SIGNATURE}): refused; its publisher signs it with "
                            f"`pipeline sign {directory} --key KEY.pem`")
    untrusted.load_json(sig, "signature", limit=MAX_SIGNATURE_BYTES)  # bounded and well-formed before the library
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(_hashing()).verify(
            directory, sig)
    except Exception as exc:  # model-signing reports a bad bundle, key or hash as ValueError, KeyError, ...
        raise PipelineError(f"{directory}: the signature does not verify with {public_key}: {first_line(exc)}; "
                            f"refused") from None

