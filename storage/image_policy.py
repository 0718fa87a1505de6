"""Which image references a run may read: files under the image roots, http(s) images from
public addresses (docs/security.md).

A catalog is input from outside. Its `image` column must not make sidpipe read the worker's own
files (`../../home/me/.aws/credentials`, a symlink to /etc) or reach what only the worker can
reach (cloud metadata at 169.254.169.254, localhost, the private network). Ingest quarantines
such rows (`unsafe_image:<why>`); `models.images` checks an http(s) host again when it downloads,
because a DNS answer can change in between.

This module decides; it never reads an image.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import socket
from collections.abc import Sequence

from sidpipe.redact import redact_urls

UNSAFE = "unsafe_image:"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- roots: local folders and s3://bucket/prefix ------------------------------------------------
def catalog_image_root(catalog_uri: str) -> str:
    """The root every catalog may read images from: its own folder (s3: its prefix)."""
    if "://" in catalog_uri and not catalog_uri.startswith("file://"):
        scheme, rest = catalog_uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(catalog_uri.removeprefix("file://")))


def _location(uri: str) -> tuple[str, str]:
    """(scheme, path) with `..` removed; local paths are real paths (symlinks followed)."""
    if "://" in uri and not uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        return scheme, posixpath.normpath("/" + rest).lstrip("/")
    return "file", os.path.realpath(uri.removeprefix("file://"))


def within_roots(uri: str, roots: Sequence[str]) -> bool:
    """Whether a local or object-store image lies inside one of `roots` once resolved."""
    scheme, path = _location(uri)
    for root in roots:
        root_scheme, root_path = _location(root)
        if root_scheme != scheme:
            continue
        prefix = root_path.rstrip("/") + "/"
        if path == root_path or path.startswith(prefix):
            return True
    return False


# -- hosts: no loopback, link-local, private, unspecified or multicast addresses ----------------
def address_problem(address: IPAddress) -> str | None:
    """What kind of non-public address this is (None: a public one)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    return None if address.is_global else "not a public address"


def allow_listed(host: str, allowed: Sequence[str], address: IPAddress | None = None) -> bool:
    """Whether `allowed` names this host, or (given its `address`) a network holding it."""
    host = host.strip("[]").lower().rstrip(".")
    for entry in allowed:
        entry = entry.strip().lower().rstrip(".")
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if entry == host:
                return True
            continue
        if address is not None and address in network:
            return True
    return False


def resolve_host(host: str) -> list[IPAddress]:
    """The addresses of a host name or IP literal (socket.gaierror when it does not resolve)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


def host_problem(
    host: str, allowed: Sequence[str], addresses: Sequence[IPAddress] | None = None
) -> str | None:
    """Why an http(s) host must not be fetched, or None. `addresses`: what it resolved to
    (default: resolve now; a name that does not resolve has no problem here, and its download
    fails later). A host on the allow-list, by name or by an address in an allowed network,
    is fetched whatever its addresses."""
    host = host.strip("[]").lower().rstrip(".")
    if allow_listed(host, allowed):
        return None
    if addresses is None:
        try:
            addresses = resolve_host(host)
        except (OSError, UnicodeError):
            return None
    for address in addresses:
        problem = address_problem(address)
        if problem and not allow_listed(host, allowed, address):
            where = f"{host} is" if host == str(address) else f"{host} resolves to {address},"
            return f"host {where} {problem} (allow it with catalog.allowed_image_hosts)"
    return None


def url_host(url: str) -> str:
    """The host of an http(s) URL (no userinfo, no port)."""
    netloc = url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    netloc = netloc.rsplit("@", 1)[-1]
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


class ImageRefPolicy:
    """The ingest-time check of resolved image references against the roots and hosts of one
    catalog config; host answers are cached (one DNS lookup per host, not per row)."""

    def __init__(self, roots: Sequence[str], allowed_hosts: Sequence[str]) -> None:
        self.roots = list(roots)
        self.allowed_hosts = list(allowed_hosts)
        self._hosts: dict[str, str | None] = {}

    def problem(self, uri: str) -> str | None:
        """`unsafe_image:<why>` for a reference that must not be read, else None. Only local,
        file:// and s3:// references and http(s) URLs are judged (other schemes are refused
        by ingest as unsupported)."""
        if uri.startswith(("http://", "https://")):
            host = url_host(uri).lower()
            if host not in self._hosts:
                self._hosts[host] = host_problem(host, self.allowed_hosts)
            found = self._hosts[host]
            return f"{UNSAFE}{found}" if found else None
        if "://" in uri and not uri.startswith(("s3://", "file://")):
            return None
        if within_roots(uri, self.roots):
            return None
        return (
            f"{UNSAFE}outside image root: {redact_urls(uri)} is not under "
            f"{', '.join(self.roots)} (add its folder to catalog.image_roots to allow it)"
        )
