"""What a bundle directory must satisfy before anything in it is read, and the manifest signature.

An attack run found ``POST /admin/reload`` to be a file-read primitive: any path was read as a
manifest and the validation error quoted its first and last bytes (``/etc/passwd``,
``/proc/self/environ``), a 256 MB file was read whole into memory, and a named pipe hung the reload
(and every reload queued behind it). Here, before the loader sees a byte:

- the bundle must be a directory **under the bundle root** (``PAM_BUNDLE_ROOT``; default: the parent
  of the bundle served at start-up), after resolving symlinks; its ``manifest.json`` and program
  must resolve inside the bundle directory;
- both must be **regular files** (``os.stat`` then ``fstat`` of a descriptor opened with
  ``O_NONBLOCK | O_NOFOLLOW``: a FIFO never blocks an open, and is refused before any read);
- the manifest's size is capped (``PAM_MAX_MANIFEST_BYTES``) *before* reading, and reading stops at
  the cap anyway;
- a refusal's message names the rule that failed, never the file's contents (pydantic's errors
  are rendered without their ``input_value``);
- with ``PAM_MANIFEST_PUBLIC_KEY`` set, ``manifest.sig`` must hold a valid **Ed25519 signature**
  of the exact manifest bytes. The manifest carries the program's sha256, so the signature covers
  the program too: recomputing the sha256 of a tampered program is no longer enough.

The caller bounds the time of all this (``read_timeout_s``); see ``RuntimePool.reload``.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobile_export.errors import ExportError
from mobile_export.manifest import MANIFEST_FILE, Manifest

SIGNATURE_FILE = "manifest.sig"  # base64 of the 64-byte Ed25519 signature of manifest.json's bytes
MAX_SIGNATURE_BYTES = 4096


class BundleRefused(ExportError):
    """A bundle the guard refuses; ``status`` is the HTTP status a reload answers with."""

    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(code, message)
        self.status = status


@dataclass(frozen=True)
class VerifiedManifest:
    manifest: Manifest
    raw: bytes  # the exact bytes validated (and, with a key, signed)
    signed: bool


def _inside(path: Path, parent: Path) -> bool:
    return path != parent and path.is_relative_to(parent)


def bundle_root(configured: Path | str | None, served: Path | str | None) -> Path | None:
    """The directory reloads must stay under: the setting, else the served bundle's parent."""
    if configured is not None:
        return Path(os.path.realpath(configured))
    if served is not None:
        return Path(os.path.realpath(served)).parent
    return None


def resolve_bundle_dir(requested: Path | str, root: Path | None) -> Path:
    """``requested`` (relative paths are taken under ``root``) resolved, checked to be a directory
    under ``root``. Refusals never say more about the path than which rule it broke."""
    raw = str(requested)
    if not raw or "\x00" in raw or len(raw) > 4096:
        raise BundleRefused("invalid_request", "bundle_dir must be a path without NUL bytes, at most 4096 chars")
    p = Path(raw)
    if not p.is_absolute() and root is not None:
        p = root / p
    real = Path(os.path.realpath(p))
    if root is not None and not _inside(real, root):
        raise BundleRefused("outside_bundle_root", "bundle_dir must be a directory under the bundle root "
                                                   "(PAM_BUNDLE_ROOT; default: the served bundle's parent)", 403)
    try:
        st = os.stat(real)
    except OSError:
        raise BundleRefused("not_a_bundle", "bundle_dir does not exist or cannot be read") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BundleRefused("not_a_bundle", "bundle_dir is not a directory")
    return real


def read_regular(path: Path, limit: int, what: str, within: Path | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, or a refusal naming ``what`` (never
    the contents). Opened without following a final symlink and without blocking (a FIFO opens at
    once and is refused on ``fstat``); the size is checked before reading and again while reading."""
    real = Path(os.path.realpath(path))
    if within is not None and not _inside(real, within):
        raise BundleRefused("outside_bundle", f"{what} must be a file inside the bundle directory")
    try:
        st = os.stat(real)
    except OSError:
        raise BundleRefused("missing_file", f"no readable {what} in the bundle") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleRefused("not_a_regular_file", f"{what} is not a regular file")
    if st.st_size > limit:
        raise BundleRefused("file_too_large", f"{what} is {st.st_size} bytes; at most {limit} are read")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError:
        raise BundleRefused("missing_file", f"cannot open {what}") from None
    try:
        st = os.fstat(fd)  # the file actually opened (it may have been swapped since the stat)
        if not stat.S_ISREG(st.st_mode):
            raise BundleRefused("not_a_regular_file", f"{what} is not a regular file")
        if st.st_size > limit:
            raise BundleRefused("file_too_large", f"{what} is {st.st_size} bytes; at most {limit} are read")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise BundleRefused("file_too_large", f"{what} grew past {limit} bytes while being read")
            chunks.append(chunk)
        return b"".join(chunks)
    except BlockingIOError:
        raise BundleRefused("not_a_regular_file", f"{what} would block on read") from None
    finally:
        os.close(fd)


def _validation_summary(e: Any) -> str:
    """A pydantic ValidationError without the offending input (which would quote the file)."""
    try:
        errs = e.errors(include_input=False, include_url=False, include_context=False)
    except TypeError:  # pragma: no cover - older pydantic
        errs = e.errors()
    parts = [f"{'.'.join(str(p) for p in er.get('loc', ())) or '(root)'}: {er.get('msg', '')[:120]}"
             for er in errs[:3]]
    more = f" (+{len(errs) - 3} more)" if len(errs) > 3 else ""
    return "; ".join(parts) + more


def load_public_key(value: str) -> Any:
    """An Ed25519 public key from the setting: PEM, or base64 / hex of its 32 raw bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    v = value.strip()
    if v.startswith("-----BEGIN"):
        key = load_pem_public_key(v.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the PEM public key is not an Ed25519 key")
        return key
    raw: bytes | None = None
    if len(v) == 64:
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the public key is neither PEM nor base64/hex of 32 bytes") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signature(bundle_dir: Path, raw_manifest: bytes, public_key: Any) -> None:
    from cryptography.exceptions import InvalidSignature

    sig_text = read_regular(bundle_dir / SIGNATURE_FILE, MAX_SIGNATURE_BYTES, SIGNATURE_FILE, bundle_dir)
    try:
        sig = base64.b64decode(sig_text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BundleRefused("bad_signature", f"{SIGNATURE_FILE} is not base64") from None
    try:
        public_key.verify(sig, raw_manifest)
    except InvalidSignature:
        raise BundleRefused("bad_signature", f"{SIGNATURE_FILE} is not a valid Ed25519 signature of "
                                             f"{MANIFEST_FILE} under the configured public key") from None


def _stat_as(path: Path, is_kind: Callable[[int], bool], missing: tuple[str, str],
             wrong_kind: tuple[str, str]) -> os.stat_result:
    """``os.stat(path)`` if it exists and is of the kind asked; otherwise the refusal (code, reason) given."""
    try:
        st = os.stat(path)
    except OSError:
        raise BundleRefused(*missing) from None
    if not is_kind(st.st_mode):
        raise BundleRefused(*wrong_kind)
    return st


def verify_manifest(bundle_dir: Path, *, max_manifest_bytes: int, max_program_bytes: int,
                    public_key: Any | None = None) -> VerifiedManifest:
    """Read, validate (and with a key, authenticate) the manifest of ``bundle_dir``, and check that its
    program is a regular file inside the bundle of at most ``max_program_bytes``."""
    bundle_dir = Path(os.path.realpath(bundle_dir))
    _stat_as(bundle_dir, stat.S_ISDIR, ("missing_manifest", f"no bundle directory at {bundle_dir}"),
             ("not_a_bundle", "the bundle is not a directory"))
    if not os.path.lexists(bundle_dir / MANIFEST_FILE):
        raise BundleRefused("missing_manifest", f"no manifest at {bundle_dir / MANIFEST_FILE}")
    raw = read_regular(bundle_dir / MANIFEST_FILE, max_manifest_bytes, MANIFEST_FILE, bundle_dir)
    if public_key is not None:
        verify_signature(bundle_dir, raw, public_key)
    from pydantic import ValidationError

    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as e:
        raise BundleRefused("bad_manifest", f"{MANIFEST_FILE} does not follow the manifest schema: "
                                            f"{_validation_summary(e)}") from None
    program = bundle_dir / manifest.program
    real = Path(os.path.realpath(program))
    if not _inside(real, bundle_dir):
        raise BundleRefused("outside_bundle", "the manifest's program must be a file inside the bundle directory")
    pst = _stat_as(real, stat.S_ISREG, ("missing_program", f"no program file at {program}"),
                   ("not_a_regular_file", "the program is not a regular file"))
    if pst.st_size > max_program_bytes:
        raise BundleRefused("file_too_large", f"the program is {pst.st_size} bytes; at most {max_program_bytes}")
    return VerifiedManifest(manifest, raw, public_key is not None)


# ------------------------------------------------------------------------------------------ signing
def generate_keypair() -> tuple[str, str]:
    """(private key PEM, public key as base64 of its 32 raw bytes) of a new Ed25519 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, base64.b64encode(pub).decode()


def sign_bundle(bundle_dir: Path | str, private_key_pem: str | bytes) -> Path:
    """Write ``manifest.sig``: the Ed25519 signature of the bundle's manifest bytes (atomically)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from pam_common.atomic import atomic_write_bytes

    pem = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem
    key = load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the private key is not an Ed25519 key")
    d = Path(bundle_dir)
    raw = (d / MANIFEST_FILE).read_bytes()
    out = d / SIGNATURE_FILE
    atomic_write_bytes(out, base64.b64encode(key.sign(raw)) + b"\n")
    return out
