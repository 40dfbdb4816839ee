"""Remote media fetches: one total deadline, bounded redirects, and no way into the server's
own network (loopback servers only; 169.254.169.254 is refused before any connection)."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from media_fixtures import make_image
from qwenvl_cli.errors import MediaError
from qwenvl_cli.media.fetch import address_refused
from qwenvl_cli.media.sources import MediaPolicy, fetch_url, resolve_image


class Handler(http.server.BaseHTTPRequestHandler):
    png = b""
    hits: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.hits.append(self.path)
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
        elif self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/"):].replace("_", "/").replace("http:/", "http://", 1))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(Handler.png)))
            self.end_headers()
            self.wfile.write(Handler.png)


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    Handler.png = make_image(tmp_path_factory.mktemp("img") / "a.png", 64, 48).read_bytes()

    class Quiet(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass

    server = Quiet(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def server_policy(**kw) -> MediaPolicy:
    return MediaPolicy(allow_local=False, allow_remote=True, block_private=True, **kw)


def test_a_trickling_server_is_cut_at_the_total_deadline(origin):
    started = time.monotonic()
    with pytest.raises(MediaError, match="timed out after 1 s"):
        fetch_url(f"http://127.0.0.1:{origin}/slow", server_policy(timeout=1.0, allow_domains=("127.0.0.1",)))
    assert time.monotonic() - started < 3  # one deadline, not 15 s per read


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_urls_resolving_to_loopback_are_refused_without_connecting(origin, host):
    Handler.hits.clear()
    with pytest.raises(MediaError, match="resolves to a loopback address") as err:
        fetch_url(f"http://{host}:{origin}/a.png", server_policy())
    assert f"--allow-media-domains {host}" in err.value.hint
    assert Handler.hits == []


def test_the_metadata_address_is_refused_before_any_connection():
    started = time.monotonic()
    with pytest.raises(MediaError, match=r"link-local address \(169\.254\.169\.254\)"):
        fetch_url("http://169.254.169.254/latest/meta-data/", server_policy(timeout=30))
    assert time.monotonic() - started < 1


def test_allow_media_domains_lets_a_named_host_through_but_not_its_redirects(origin):
    source = resolve_image(f"http://localhost:{origin}/a.png", server_policy(allow_domains=("localhost",)))
    assert (source.width, source.height) == (64, 48)
    Handler.hits.clear()
    target = f"http:_127.0.0.1:{origin}_a.png"
    with pytest.raises(MediaError, match="127.0.0.1 resolves to a loopback"):
        fetch_url(f"http://localhost:{origin}/to/{target}", server_policy(allow_domains=("localhost",)))
    assert Handler.hits == [f"/to/{target}"]  # the redirect's target was never asked


def test_redirects_are_bounded(origin):
    with pytest.raises(MediaError, match="redirects more than 5 times"):
        fetch_url(f"http://127.0.0.1:{origin}/loop", server_policy(allow_domains=("127.0.0.1",)))


def test_the_chat_cli_policy_still_fetches_from_loopback(origin):
    assert fetch_url(f"http://127.0.0.1:{origin}/a.png", MediaPolicy()) == Handler.png


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.0.1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "private"), ("240.0.0.1", "private"), ("100.64.0.1", "non-public"),
    ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_address_rule(address, why):
    assert address_refused(address) == why
