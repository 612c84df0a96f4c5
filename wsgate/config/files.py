"""
Files a config names, checked when it is read: that each exists and is readable (paths relative to
the config file's directory, made absolute), and what each must hold: certificates and keys (read
with ``cryptography``: PEM, the key matches the certificate, within its validity period), the
SSH host key's path (made on first start), bearer-token files, JWT key files (JWKS or PEM).
It builds no Twisted objects (``wsgate/net/tls.py`` loads the checked files) and keeps no state.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from wsgate.config.table import Reader

__all__ = [
    "certificate_problems",
    "host_key_path",
    "key_file",
    "read_certificates",
    "read_token",
    "readable_file",
    "token_file",
]


def readable_file(reader: Reader) -> Callable[[object], str]:
    """A path to a readable file, relative to the config file's directory; -> absolute path."""

    def convert(value: object) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError("expected a file path")
        path = os.path.abspath(os.path.join(reader.base_dir, os.path.expanduser(value)))
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ValueError(f"{path}: {e.strerror or e}") from None
        return path

    return convert


def read_certificates(path: str) -> list[x509.Certificate]:
    """The PEM certificates in a file; ValueError naming the file when there are none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        certificates = x509.load_pem_x509_certificates(data)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    except ValueError:
        raise ValueError(f"{path}: no PEM certificate in this file") from None
    return certificates


def _read_key(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    except (ValueError, TypeError):
        raise ValueError(f"{path}: not an unencrypted PEM private key") from None


def _public(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_problems(cert: str, key: str, chain: str | None = None) -> list[tuple[str, str]]:
    """
    Check a certificate, its key and optional chain file: ``[(key_name, reason), ...]`` where
    ``key_name`` is ``"cert"``, ``"key"`` or ``"chain"`` and the reason starts with the file name.
    Empty when all is well.
    """
    problems: list[tuple[str, str]] = []
    leaf = private = None
    try:
        leaf = read_certificates(cert)[0]
    except ValueError as e:
        problems.append(("cert", str(e)))
    try:
        private = _read_key(key)
    except ValueError as e:
        problems.append(("key", str(e)))
    if chain is not None:
        try:
            read_certificates(chain)
        except ValueError as e:
            problems.append(("chain", str(e)))
    if leaf is not None:
        now = datetime.datetime.now(datetime.UTC)
        if leaf.not_valid_after_utc < now:
            problems.append(("cert", f"{cert}: certificate expired on {leaf.not_valid_after_utc}"))
        elif leaf.not_valid_before_utc > now:
            problems.append(
                ("cert", f"{cert}: certificate not valid before {leaf.not_valid_before_utc}")
            )
        if private is not None and _public(leaf.public_key()) != _public(private.public_key()):
            problems.append(("key", f"{key}: private key does not match the certificate {cert}"))
    return problems


def host_key_path(reader: Reader) -> Callable[[object], str]:
    """A host key file; it (and its directory) may not exist yet: both are made on first start."""

    def convert(value: object) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError("expected a file path")
        path = os.path.abspath(os.path.join(reader.base_dir, os.path.expanduser(value)))
        if os.path.isdir(path):
            raise ValueError(f"{path}: a directory, not a key file")
        return path

    return convert


def token_file(reader: Reader) -> Callable[[object], str]:
    """A readable file whose content (surrounding blanks stripped) is a bearer token."""
    readable = readable_file(reader)

    def convert(value: object) -> str:
        path = readable(value)
        if read_token(path) == "":
            raise ValueError(f"{path}: empty: it must hold the token")
        return path

    return convert


def read_token(path: str) -> str:
    """The bearer token in ``path`` (surrounding blanks stripped); OSError when unreadable."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace").strip()


def key_file(reader: Reader) -> Callable[[object], str]:
    """A readable JWKS file (a JSON object with a ``keys`` list) or PEM file of public keys or
    certificates; the keys themselves are read by wsgate/core/auth.py."""
    readable = readable_file(reader)

    def convert(value: object) -> str:
        path = readable(value)
        with open(path, "rb") as f:
            data = f.read()
        if data.lstrip().startswith(b"{"):
            try:
                keys = json.loads(data).get("keys")
            except (ValueError, AttributeError):
                keys = None
            if not isinstance(keys, list):
                raise ValueError(f"{path}: not a JWKS file (a JSON object with a keys list)")
        elif (
            b"-----BEGIN PUBLIC KEY-----" not in data and b"-----BEGIN CERTIFICATE-----" not in data
        ):
            raise ValueError(f"{path}: neither a JWKS file nor PEM public keys or certificates")
        return path

    return convert
