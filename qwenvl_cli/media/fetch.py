"""GET one http(s) URL within a total deadline, a byte limit, a redirect limit and an address rule.

- The deadline covers the whole fetch (DNS, connecting, every redirect, every byte), not one
  read: a server that trickles one byte a second is cut when the time is up.
- With ``policy.block_private`` (the server's policy), every address a host resolves to is
  checked before connecting, on the first URL and on every redirect: loopback, private,
  link-local (169.254.169.254, the cloud metadata service), multicast, reserved,
  unspecified and other non-global addresses are refused, unless the host is in ``policy.allow_domains``. The
  connection goes to the address that was checked, so a second DNS answer cannot differ.
- At most :data:`MAX_REDIRECTS` redirects, only to http(s).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

from qwenvl_cli.errors import MediaError, one_line

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


def fetch(url: str, policy: Any, label: str) -> bytes:
    """The body of ``url`` under ``policy`` (a MediaPolicy); MediaError on any failure."""
    deadline = time.monotonic() + policy.timeout
    for _ in range(MAX_REDIRECTS + 1):
        response, conn = _get(url, policy, label, deadline)
        try:
            if response.status in _REDIRECTS and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status >= 400:
                raise MediaError(f"{label} answered HTTP {response.status} {response.reason}",
                                 "check the URL, or download the file and pass the path")
            return _read(response, policy, label, deadline)
        finally:
            conn.qvl_watchdog.cancel()
            conn.close()
    raise MediaError(f"{label} redirects more than {MAX_REDIRECTS} times", "pass the final URL directly")


def address_refused(address: str) -> str | None:
    """Why a request may not reach ``address`` ('loopback', 'private', ...), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "multicast", "private", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"  # e.g. 100.64.0.0/10, shared by carriers


def _get(url: str, policy: Any, label: str, deadline: float) -> tuple[Any, Any]:
    import http.client

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise MediaError(f"{label} redirects to a non-HTTP URL ({one_line(url, 80)})",
                         "pass the final URL directly")
    host = parts.hostname
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise MediaError(f"{label} has a bad port", "check the URL") from None
    address = _resolve(host, port, policy, label, deadline)
    conn = _connection(scheme, host, port, address, _left(deadline, policy, label))
    watchdog = threading.Timer(_left(deadline, policy, label), _cut, args=(conn,))
    watchdog.daemon = True
    watchdog.start()
    conn.qvl_watchdog = watchdog
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        from qwenvl_cli import __version__

        conn.request("GET", path, headers={"User-Agent": f"qvl/{__version__}", "Accept": "*/*"})
        return conn.getresponse(), conn
    except MediaError:
        watchdog.cancel()
        conn.close()
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        watchdog.cancel()
        conn.close()
        if time.monotonic() >= deadline or isinstance(exc, TimeoutError):
            raise _timed_out(label, policy) from None
        raise MediaError(f"cannot reach {label}: {one_line(exc, 100)}", "check the URL and your network") from None


def _resolve(host: str, port: int, policy: Any, label: str, deadline: float) -> str:
    """One address of ``host`` that the policy lets us connect to (DNS bounded by the deadline)."""
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            found.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(_left(deadline, policy, label))
    if not found:
        raise _timed_out(label, policy)
    if isinstance(found[0], BaseException):
        raise MediaError(f"cannot resolve the host {host!r} of {label}", "check the URL") from None
    addresses = [info[4][0] for info in found[0]]
    if getattr(policy, "block_private", False) and host.lower().rstrip(".") not in _allowed(policy):
        for address in addresses:
            why = address_refused(address)
            if why:
                raise MediaError(f"{label}: the host {host} resolves to a {why} address ({address}); "
                                 "the server does not fetch from its own network",
                                 f"host the media publicly, send it inline as a data: URI, or start the "
                                 f"server with --allow-media-domains {host}")
    return addresses[0]


def _allowed(policy: Any) -> set[str]:
    return {d.lower().rstrip(".") for d in getattr(policy, "allow_domains", ())}


def _connection(scheme: str, host: str, port: int, address: str, timeout: float) -> Any:
    import http.client

    class Pinned(http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection):
        """Connects to the checked address; Host, SNI and the certificate check use ``host``."""

        def connect(self) -> None:
            sock = socket.create_connection((address, port), self.timeout)
            if scheme == "https":
                sock = self._context.wrap_socket(sock, server_hostname=host)
            self.sock = sock

    return Pinned(host, port, timeout=timeout)


def _cut(conn: Any) -> None:
    """The deadline passed: wake the read blocked on this connection's socket."""
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read(response: Any, policy: Any, label: str, deadline: float) -> bytes:
    import http.client

    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > policy.max_bytes:
        raise _too_large(label, policy, int(length))
    chunks, size = [], 0
    try:
        while chunk := response.read1(1 << 16):
            size += len(chunk)
            if size > policy.max_bytes:
                raise _too_large(label, policy)
            if time.monotonic() >= deadline:
                raise _timed_out(label, policy)
            chunks.append(chunk)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if time.monotonic() >= deadline - 0.05 or isinstance(exc, TimeoutError):
            raise _timed_out(label, policy) from None
        raise MediaError(f"cannot fetch {label}: {one_line(exc, 100)}", "check the URL and your network") from None
    if time.monotonic() >= deadline:  # the watchdog ended the body early: it is not whole
        raise _timed_out(label, policy)
    return b"".join(chunks)


def _left(deadline: float, policy: Any, label: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(label, policy)
    return left


def _too_large(label: str, policy: Any, length: int | None = None) -> MediaError:
    size = f" ({length} bytes)" if length else ""
    return MediaError(f"{label} is larger than the {policy.max_bytes} byte limit{size}", "pass a smaller file")


def _timed_out(label: str, policy: Any) -> MediaError:
    return MediaError(f"timed out after {policy.timeout:g} s fetching {label}",
                      "check the URL, or download the file and pass the path")
