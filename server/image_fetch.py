"""Fetch a remote image for a request, only when the operator turned it on (`allow_remote_images`).

Contract (`fetch_image_bytes(url, settings) -> bytes`):
- http and https only, no credentials in the URL, and the host must be one of `remote_image_domains` (exactly,
  or a subdomain of one).
- The host is resolved ONCE; every address must be public (not private, loopback, link-local, multicast or
  reserved) unless `remote_image_allow_private` is on. The connection goes to that pinned address (TLS still
  verifies the certificate against the host name), so DNS rebinding cannot redirect it.
- Redirects are not followed; a non-200 answer is refused.
- The body is read in chunks under `remote_image_max_bytes` (413 beyond, even with a lying or absent
  Content-Length) and the whole fetch under `remote_image_timeout_s`.

Every refusal is a `RemoteImageRefusedError` or an `ImageTooLargeError` (`server.image_errors`) with the reason.

It does not decode images (`server.images` does) and keeps no cache. Blocking: call it from a worker thread.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import httpx

from server.image_errors import ImageTooLargeError, RemoteImageRefusedError

log = logging.getLogger(__name__)


def fetch_image_bytes(url: str, settings) -> bytes:
    """Download the image at `url` under the limits of `settings`; see the module contract."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    if parts.scheme not in ("http", "https") or not host:
        raise RemoteImageRefusedError("image URL must be http(s)://host/path")
    if parts.username or parts.password:
        raise RemoteImageRefusedError("image URLs with credentials are not accepted")
    if not _host_allowed(host, settings.remote_image_domains):
        raise RemoteImageRefusedError(
            f"image host '{host[:100]}' is not in this server's remote_image_domains"
        )
    address = _resolve_pinned(host, parts.port, parts.scheme, settings.remote_image_allow_private)
    netloc = f"[{address}]" if ":" in address else address
    if parts.port:
        netloc += f":{parts.port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    headers = {"Host": parts.netloc.rpartition("@")[2], "Accept": "image/*", "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return _download(pinned, headers, extensions, settings)


def _host_allowed(host: str, domains: tuple[str, ...]) -> bool:
    return any(host == d or host.endswith("." + d) for d in domains)


def _resolve_pinned(host: str, port: int | None, scheme: str, allow_private: bool) -> str:
    try:
        infos = socket.getaddrinfo(host, port or (443 if scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise RemoteImageRefusedError(f"image host '{host[:100]}' does not resolve") from None
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise RemoteImageRefusedError(f"image host '{host[:100]}' does not resolve")
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not allow_private and not ip.is_global:
            raise RemoteImageRefusedError(
                f"image host '{host[:100]}' resolves to a non-public address; "
                "remote images must be on the internet"
            )
        if ip.is_multicast or ip.is_unspecified:
            raise RemoteImageRefusedError(f"image host '{host[:100]}' resolves to an unusable address")
    return addresses[0].split("%")[0]


def _download(url: str, headers: dict[str, str], extensions: dict, settings) -> bytes:
    cap = settings.remote_image_max_bytes
    deadline = time.monotonic() + settings.remote_image_timeout_s
    timeout = httpx.Timeout(settings.remote_image_timeout_s)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            request = client.build_request("GET", url, headers=headers, extensions=extensions)
            response = client.send(request, stream=True)
            try:
                return _read_capped(response, cap, deadline)
            finally:
                response.close()
    except httpx.TimeoutException:
        raise RemoteImageRefusedError(
            f"image download took longer than {settings.remote_image_timeout_s:g} s"
        ) from None
    except httpx.HTTPError as exc:
        log.info("remote image fetch failed: %s: %s", type(exc).__name__, exc)
        raise RemoteImageRefusedError("image download failed (connection error)") from None


def _read_capped(response: httpx.Response, cap: int, deadline: float) -> bytes:
    if response.is_redirect:
        raise RemoteImageRefusedError("image URL answered with a redirect; redirects are not followed")
    if response.status_code != 200:
        raise RemoteImageRefusedError(f"image URL answered HTTP {response.status_code}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise ImageTooLargeError(f"remote image is {declared} bytes, over the limit of {cap} bytes")
    body = bytearray()
    for chunk in response.iter_bytes(64 * 1024):
        body += chunk
        if len(body) > cap:
            raise ImageTooLargeError(f"remote image is over the limit of {cap} bytes")
        if time.monotonic() > deadline:
            raise RemoteImageRefusedError("image download took longer than the time limit")
    return bytes(body)
