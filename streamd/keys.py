"""CURVE key files in ZeroMQ's certificate format: read, check and write them (no sockets).

A keypair is two files written by :func:`zmq.auth.create_certificates`: ``NAME.key`` holds the
public key (hand it out freely) and ``NAME.key_secret`` both keys (keep it private, mode 0600).
An authorized-keys directory holds one ``*.key`` public certificate per client; other files
in it are ignored, as czmq and pyzmq do.

Every function raises :class:`KeyFileError` with a one-line reason; the configuration adds the
key's name in front of it.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import zmq.auth
from zmq.utils import z85

KEY_BYTES = 32
_Z85_LENGTH = 40


class KeyFileError(ValueError):
    """A key file or directory is missing, unreadable or not a CURVE certificate; the message says which."""


def _checked_key(text: bytes, what: str, path: Path) -> bytes:
    """``text`` if it is a Z85-encoded 32-byte CURVE key, else a KeyFileError saying which file is bad."""
    try:
        valid = len(text) == _Z85_LENGTH and len(z85.decode(text)) == KEY_BYTES
    except (ValueError, KeyError, struct.error):
        valid = False
    if not valid:
        msg = f"{path}: the {what} is not a Z85-encoded 32-byte CURVE key"
        raise KeyFileError(msg)
    return text


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        msg = f"{path}: no such file" if not path.exists() else f"{path}: not a file"
        raise KeyFileError(msg)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        msg = f"{path}: cannot read: {exc.strerror or exc}"
        raise KeyFileError(msg) from None
    except ValueError:
        msg = f"{path}: not a ZeroMQ certificate (no public-key line); make one with 'streamd keygen'"
        raise KeyFileError(msg) from None
    return _checked_key(public, "public key", path), None if secret is None else _checked_key(
        secret, "secret key", path
    )


def read_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` certificate."""
    file = Path(path)
    public, secret = _read_certificate(file)
    if secret is None:
        msg = f"{file}: holds no secret key (give the .key_secret file, not the public .key)"
        raise KeyFileError(msg)
    return public, secret


def read_public_key(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key of a certificate (``.key``; a ``.key_secret`` also works)."""
    return _read_certificate(Path(path))[0]


def read_authorized_keys(directory: str | os.PathLike[str]) -> frozenset[bytes]:
    """The Z85 public keys of every ``*.key`` file in ``directory``.

    A secret certificate among them is refused: it was copied there by mistake and must not
    sit in a directory whose files are world-readable.
    """
    folder = Path(directory)
    if not folder.is_dir():
        msg = f"{folder}: no such directory" if not folder.exists() else f"{folder}: not a directory"
        raise KeyFileError(msg)
    keys = set()
    for file in sorted(folder.glob("*.key")):
        public, secret = _read_certificate(file)
        if secret is not None:
            msg = f"{file}: holds a secret key; only public certificates belong in the authorized directory"
            raise KeyFileError(msg)
        keys.add(public)
    return frozenset(keys)


def write_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) into ``directory``; never overwrite.

    The files are created under a 0077 umask, so the secret is never readable by others, not
    even for a moment.
    """
    folder = Path(directory)
    if not name or "/" in name or name.startswith("."):
        msg = f"bad key name {name!r} (a plain file name such as 'server' or 'client-host1')"
        raise KeyFileError(msg)
    if not folder.is_dir():
        msg = f"{folder}: no such directory" if not folder.exists() else f"{folder}: not a directory"
        raise KeyFileError(msg)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for file in (public, secret):
        if file.exists():
            msg = f"{file}: already exists; remove it first or choose another --name"
            raise KeyFileError(msg)
    previous = os.umask(0o077)
    try:
        zmq.auth.create_certificates(folder, name)
    except OSError as exc:
        msg = f"cannot write keys in {folder}: {exc.strerror or exc}"
        raise KeyFileError(msg) from None
    finally:
        os.umask(previous)
    public.chmod(0o644)
    return public, secret
