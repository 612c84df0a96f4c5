"""
The ``[[listen]]`` and ``[[redirect]]`` tables: endpoint strings, PROXY protocol, and a listener's
TLS (its default certificate, minimum version, cipher string and certificates chosen by SNI name).
Files are checked with :mod:`wsgate.config.files`; no Twisted object is built here.
"""

from __future__ import annotations

import re

from wsgate.config.files import certificate_problems, readable_file
from wsgate.config.schema import TLS_VERSIONS, CertificateFiles, Listener, ListenerTLS, Redirect
from wsgate.config.syntax import check_endpoint
from wsgate.config.table import Table
from wsgate.config.units import choice, port_number, typed

__all__ = ["read_listener", "read_redirect"]


def _certificate_files(table: Table) -> CertificateFiles | None:
    """``cert``, ``key`` and optional ``chain`` of a table, checked; None when unusable."""
    path = readable_file(table.reader)
    files = CertificateFiles(
        cert=table.required("cert", path, ""),
        key=table.required("key", path, ""),
        chain=table.field(CertificateFiles, "chain", path),
    )
    if not files.cert or not files.key:
        return None
    problems = certificate_problems(files.cert, files.key, files.chain)
    for name, reason in problems:
        table.reader.problem(table.key(name), reason)
    return None if problems else files


def _sni_name(value: str) -> str | None:
    name = value.lower().rstrip(".")
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if not labels:
            return None
    if not all(re.fullmatch(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?", label) for label in labels):
        return None
    return name


def _listener_tls(table: Table) -> ListenerTLS | None:
    default = _certificate_files(table)
    min_version = table.field(ListenerTLS, "min_version", choice(*TLS_VERSIONS))
    ciphers = table.field(ListenerTLS, "ciphers", _cipher_string)
    sni: dict[str, CertificateFiles] = {}
    for name, sub in table.subtables("sni"):
        normal = _sni_name(name)
        if normal is None:
            table.reader.problem(
                sub.path, "not a host name or *.wildcard name (like *.example.com)"
            )
        files = _certificate_files(sub)
        sub.done()
        if normal is not None and files is not None:
            sni[normal] = files
    table.done()
    if default is None:
        return None
    return ListenerTLS(default=default, min_version=min_version, ciphers=ciphers, sni=sni)


def _cipher_string(value: object) -> str:
    """An OpenSSL cipher string that selects at least one TLS 1.2 cipher suite."""
    from OpenSSL import SSL

    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected an OpenSSL cipher string such as ECDHE+AESGCM")
    try:
        SSL.Context(SSL.TLS_METHOD).set_cipher_list(value.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise ValueError(f"{value!r}: selects no TLS 1.2 cipher suite OpenSSL knows") from None
    return value


def read_listener(table: Table) -> Listener:
    """One ``[[listen]]`` table."""
    endpoint = table.required("endpoint", check_endpoint, "")
    tls_table = table.subtable("tls")
    tls = _listener_tls(tls_table) if tls_table is not None else None
    if tls is not None and endpoint.lower().startswith("ssl:"):
        table.reader.problem(table.key("tls"), "give tls = {...} with a tcp: endpoint, not ssl:")
    proxy_protocol = table.field(Listener, "proxy_protocol", typed(bool, "true or false"))
    table.done()
    return Listener(endpoint=endpoint, tls=tls, proxy_protocol=proxy_protocol)


def read_redirect(table: Table) -> Redirect:
    """One ``[[redirect]]`` table."""
    redirect = Redirect(
        endpoint=table.required("endpoint", check_endpoint, ""),
        https_port=table.field(Redirect, "https_port", port_number),
    )
    table.done()
    return redirect
