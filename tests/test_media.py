"""Images in: references checked at the edge, one-line errors, and sizing identical to
qwen-vl-utils 0.0.14 (the reference pipeline of the Qwen2-VL README)."""

from __future__ import annotations

import http.server
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from media_fixtures import data_uri, make_image, png_header

from qwenvl_cli import settings
from qwenvl_cli.media import sizing
from qwenvl_cli.errors import EXIT_USAGE, MediaError
from qwenvl_cli.media.sources import MediaPolicy, resolve_image, resolve_video
from qwenvl_cli.engine.vision import prepare_vision
from qwenvl_cli.media.vision import REFERENCE_DEFAULTS, VisionDefaults, image_plan

np = pytest.importorskip("numpy")
vp = pytest.importorskip("qwen_vl_utils.vision_process")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    make_image(root / "photo.png", 640, 480)
    make_image(root / "wide.jpg", 1000, 300, fmt="JPEG")
    make_image(root / "alpha.png", 90, 70, mode="RGBA")
    make_image(root / "palette.gif", 80, 60, mode="P")
    make_image(root / "pic.webp", 120, 90, fmt="WEBP")
    return root


# --- a loopback HTTP server ------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, dict[str, str], float]] = {}

    def do_GET(self):  # noqa: N802 - http.server's API
        status, body, headers, delay = self.routes.get(self.path, (404, b"not found", {}, 0.0))
        if delay:
            time.sleep(delay)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers and not headers.get("X-No-Length"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler.routes
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- accepted references -----------------------------------------------------------------


def test_image_references_resolve_to_sources(media_dir, http_server):
    from PIL import Image

    base, routes = http_server
    png = (media_dir / "photo.png").read_bytes()
    routes["/photo.png"] = (200, png, {"Content-Type": "image/png"}, 0.0)
    path = media_dir / "photo.png"
    cases = {
        "path": str(path),
        "file": path.as_uri(),
        "data": data_uri(png),
        "url": f"{base}/photo.png",
        "pil": Image.open(path),
    }
    for kind, ref in cases.items():
        source = resolve_image(ref)
        assert (source.kind, source.width, source.height, source.format) == (
            "path" if kind == "file" else kind, 640, 480, "PNG"), kind
        assert np.array_equal(np.asarray(source.open().convert("RGB")), np.asarray(Image.open(path).convert("RGB")))
    assert resolve_image(path).path == path  # a pathlib.Path works too
    assert resolve_image({"url": str(path)}).kind == "path"  # OpenAI's image_url object


def _reference_image(ele):
    return np.asarray(vp.fetch_image(dict(ele)))


@pytest.mark.parametrize("name,opts", [
    ("photo.png", {}),
    ("photo.png", {"max_pixels": 1280 * 28 * 28}),
    ("photo.png", {"max_pixels": 64 * 28 * 28, "min_pixels": 16 * 28 * 28}),
    ("photo.png", {"min_pixels": 1024 * 28 * 28}),
    ("wide.jpg", {}),
    ("wide.jpg", {"max_pixels": 100_000}),
    ("wide.jpg", {"resized_height": 123, "resized_width": 321}),
    ("alpha.png", {}),
    ("palette.gif", {"min_pixels": 256 * 28 * 28}),
    ("pic.webp", {"max_pixels": 5000}),
])
def test_images_equal_reference_fetch_image(media_dir, name, opts):
    ele = {"type": "image", "image": str(media_dir / name), **opts}
    images, videos, kwargs, infos = prepare_vision([{"role": "user", "content": [ele]}], REFERENCE_DEFAULTS)
    expected = _reference_image(ele)
    assert videos is None and kwargs == {"do_sample_frames": False, "fps": []}
    got = np.asarray(images[0])
    assert got.shape == expected.shape and np.array_equal(got, expected)
    info = infos[0]
    assert (info.resized_height, info.resized_width) == expected.shape[:2]
    assert info.tokens == expected.shape[0] * expected.shape[1] // (28 * 28)


def test_data_uri_and_http_images_equal_reference(media_dir, http_server):
    base, routes = http_server
    jpg = (media_dir / "wide.jpg").read_bytes()
    routes["/wide.jpg"] = (200, jpg, {"Content-Type": "image/jpeg"}, 0.0)
    for ref in (data_uri(jpg, "image/jpeg"), f"{base}/wide.jpg"):
        ele = {"type": "image", "image": ref, "max_pixels": 200_000}
        images, *_ = prepare_vision([{"role": "user", "content": [ele]}], REFERENCE_DEFAULTS)
        assert np.array_equal(np.asarray(images[0]), _reference_image(ele))


def test_qvl_default_max_pixels_caps_a_large_photo(tmp_path):
    from PIL import Image, ImageDraw

    photo = Image.new("RGB", (4032, 3024), (30, 90, 160))
    ImageDraw.Draw(photo).ellipse((500, 400, 3000, 2500), fill=(240, 200, 20))
    photo.save(tmp_path / "big.jpg", quality=80)
    ele = {"type": "image", "image": str(tmp_path / "big.jpg")}
    images, _, _, infos = prepare_vision([{"role": "user", "content": [ele]}])
    assert infos[0].tokens == 1230 <= settings.DEFAULT_MAX_PIXELS // (28 * 28)
    expected = _reference_image({**ele, "max_pixels": settings.DEFAULT_MAX_PIXELS})
    assert np.array_equal(np.asarray(images[0]), expected)
    # without qvl's default, the reference's own bound (16384 tokens) applies
    plan = image_plan(resolve_image(ele["image"]), REFERENCE_DEFAULTS)
    assert (plan.resized_width, plan.resized_height, plan.tokens) == (4032, 3024, 15552)
    assert image_plan(resolve_image(ele["image"])).tokens == infos[0].tokens


def test_smart_resize_matches_reference_on_random_sizes():
    rng = random.Random(4)
    for _ in range(3000):
        height, width = rng.randint(1, 5000), rng.randint(1, 5000)
        low = rng.choice([None, 4 * 784, 256 * 784, rng.randint(784, 10**6)])
        high = rng.choice([None, 1280 * 784, 16384 * 784, rng.randint(784, 10**7)])
        try:
            expected = vp.smart_resize(height, width, 28, low, high)
        except (ValueError, AssertionError):
            with pytest.raises(MediaError):
                sizing.smart_resize(height, width, 28, low, high)
            continue
        assert sizing.smart_resize(height, width, 28, low, high) == expected


def test_sampling_arithmetic_matches_reference():
    rng = random.Random(7)
    for _ in range(3000):
        total, fps = rng.randint(1, 3000), rng.choice([24.0, 25.0, 29.97, 30.0, 60.0, 7.5])
        start = rng.choice([None, rng.uniform(0, total / fps * 1.2)])
        end = rng.choice([None, rng.uniform(0, total / fps * 1.2)])
        ele = {k: v for k, v in {"video_start": start, "video_end": end}.items() if v is not None}
        ele.update(rng.choice([{}, {"fps": rng.choice([0.5, 1.0, 2.0, 3.3])}, {"nframes": rng.randint(1, 40)},
                               {"max_frames": rng.randint(2, 64)}, {"min_frames": rng.randint(1, 16)}]))
        try:
            first, last, count = vp.calculate_video_frame_range(ele, total, fps)
            expected = (first, last, count, vp.smart_nframes(ele, count, fps))
        except (ValueError, AssertionError):
            with pytest.raises(MediaError):
                first, last, count = sizing.frame_range(total, fps, start, end)
                sizing.sample_count(count, fps, ele)
            continue
        first, last, count = sizing.frame_range(total, fps, start, end)
        assert (first, last, count, sizing.sample_count(count, fps, ele)) == expected


def test_visual_tokens_match_the_processor_grid():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    processor = transformers.Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 12845056})
    for height, width in ((476, 644), (112, 392), (28, 5600)):
        image = np.zeros((height, width, 3), np.uint8)
        grid = processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        assert sizing.visual_tokens(height, width) == int(grid.prod()) // 4
    video_processor = transformers.Qwen2VLVideoProcessor(size={"shortest_edge": 3136, "longest_edge": 12845056})
    for frames in (2, 6, 12):
        clip = torch.zeros((frames, 3, 280, 392), dtype=torch.float32)
        grid = video_processor(videos=[clip], do_sample_frames=False, return_tensors="pt")["video_grid_thw"][0]
        assert sizing.visual_tokens(280, 392, frames) == int(grid.prod()) // 4


# --- bad input -----------------------------------------------------------------------------


def _error(ref, policy=MediaPolicy(), fn=resolve_image) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn(ref, policy)
    error = info.value
    assert error.hint and "\n" not in error.message and error.exit_code == EXIT_USAGE
    return error


def test_bad_local_images_give_one_line_errors(media_dir, tmp_path):
    assert "no such file" in _error(str(tmp_path / "nope.png")).message
    assert "did you mean" in _error(str(media_dir / "phot.png")).hint
    assert "is a directory" in _error(str(tmp_path)).message
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty (0 bytes)" in _error(str(tmp_path / "empty.png")).message
    (tmp_path / "notes.png").write_text("hello\nthis is not a picture\n")
    assert "not an image (it is a text file)" in _error(str(tmp_path / "notes.png")).message
    jpg = (media_dir / "wide.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpg[: len(jpg) * 2 // 3])
    assert "truncated" in _error(str(tmp_path / "cut.jpg")).message
    png = (media_dir / "photo.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    assert "truncated" in _error(str(tmp_path / "cut.png")).message


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(60_000, 60_000))  # 3,600 MP: PIL will not open it
    bomb = _error(str(tmp_path / "bomb.png"))
    assert bomb.message == f"{tmp_path / 'bomb.png'} is 3,600 megapixels, above the limit of 89 megapixels " \
        "(decompression bomb?)"  # qvl's words, not Pillow's "could be decompression bomb DOS attack"
    assert bomb.hint == "downscale the image before passing it"
    (tmp_path / "big.png").write_bytes(png_header(10_000, 10_000))  # above qvl's limit only
    error = _error(str(tmp_path / "big.png"))
    assert "10000x10000 = 100 megapixels, above the limit of 89 megapixels" in error.message
    small = make_image(tmp_path / "small.png", 64, 48)
    assert "above the limit" in _error(str(small), MediaPolicy(max_image_pixels=1000)).message


def test_aspect_ratio_above_200_is_refused(tmp_path):
    make_image(tmp_path / "strip.png", 4100, 20)
    ele = {"type": "image", "image": str(tmp_path / "strip.png")}
    with pytest.raises(MediaError, match="aspect ratio 205:1"):
        prepare_vision([{"role": "user", "content": [ele]}])


def test_bad_urls_and_data_uris(http_server):
    base, routes = http_server
    assert "unsupported URL scheme 'ftp:'" in _error("ftp://example.com/a.png").message
    assert "no such file: a:b.png" in _error("a:b.png").message  # a colon alone is no scheme
    assert "only base64 images" in _error("data:text/plain,hello").message
    assert "not valid base64" in _error("data:image/png;base64,abc").message
    assert "not an image" in _error(data_uri(b"plain text, not pixels")).message
    assert "HTTP 404" in _error(f"{base}/missing.png").message
    assert "cannot reach" in _error(f"http://127.0.0.1:{_closed_port()}/a.png").message
    routes["/slow.png"] = (200, make_image(None, 8, 8), {}, 1.5)
    started = time.monotonic()
    assert "timed out after 0.3 s" in _error(f"{base}/slow.png", MediaPolicy(timeout=0.3)).message
    assert time.monotonic() - started < 1.4
    routes["/big.png"] = (200, b"x" * 5000, {}, 0.0)
    assert "larger than the 1000 byte limit (5000 bytes)" in _error(f"{base}/big.png", MediaPolicy(max_bytes=1000)).message
    routes["/stream.png"] = (200, b"x" * 200_000, {"X-No-Length": "1", "Connection": "close"}, 0.0)
    assert "larger than the 1000 byte limit" in _error(f"{base}/stream.png", MediaPolicy(max_bytes=1000)).message
    routes["/hop.png"] = (302, b"", {"Location": "ftp://127.0.0.1/a.png"}, 0.0)
    assert "redirects to a non-HTTP URL" in _error(f"{base}/hop.png").message


def test_policy_confines_local_files(media_dir, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    inside = make_image(root / "ok.png", 32, 32)
    outside = make_image(tmp_path / "secret.png", 32, 32)
    (root / "link.png").symlink_to(outside)
    confined = MediaPolicy(local_root=root)
    assert resolve_image(str(inside), confined).width == 32
    assert "outside the allowed media folder" in _error(str(root / ".." / "secret.png"), confined).message
    assert "outside the allowed media folder" in _error(str(root / "link.png"), confined).message
    assert "outside the allowed media folder" in _error(outside.as_uri(), confined).message
    no_local = MediaPolicy(allow_local=False)
    assert "local files are not allowed" in _error(str(inside), no_local).message
    assert "local files are not allowed" in _error(inside.as_uri(), no_local).message
    assert "local files are not allowed" in _error(str(media_dir), no_local, resolve_video).message
    assert "remote URLs are not allowed" in _error("http://127.0.0.1:9/a.png", MediaPolicy(allow_remote=False)).message
    assert resolve_image(data_uri(inside.read_bytes()), no_local).kind == "data"


def test_media_flags_are_checked():
    assert VisionDefaults.from_flags().image_opts() == {"min_pixels": 3136, "max_pixels": 1280 * 784}
    defaults = VisionDefaults.from_flags(min_pixels=256 * 784, max_pixels=512 * 784, fps=1.0, max_frames=8)
    assert defaults.video_opts({}) == {"min_pixels": 256 * 784, "max_pixels": 512 * 784, "fps": 1.0, "max_frames": 8}
    assert "fps" not in defaults.video_opts({"nframes": 4})
    assert VisionDefaults.from_flags(max_pixels=1000).image_opts() == {"min_pixels": 1000, "max_pixels": 1000}
    for kwargs, text in (({"min_pixels": 2000 * 784, "max_pixels": 1000 * 784}, "is above --max-pixels"),
                         ({"min_pixels": 100}, "below one visual token"),
                         ({"min_pixels": 2000 * 784}, "above the default --max-pixels"),
                         ({"fps": 0}, "--fps must be positive"),
                         ({"max_frames": 1}, "--max-frames must be at least 2"),
                         ({"video_start": 5, "video_end": 2}, "is not before --video-end")):
        with pytest.raises(MediaError, match=text):
            VisionDefaults.from_flags(**kwargs)


def test_media_modules_import_nothing_heavy():
    code = ("import sys, qwenvl_cli.media.sources, qwenvl_cli.media.vision, qwenvl_cli.media.video, qwenvl_cli.media.sizing; "
            "print(sorted(m for m in ('PIL', 'av', 'torch', 'torchvision', 'numpy', 'decord', "
            "'transformers', 'qwen_vl_utils', 'urllib.request') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_cap_note_says_what_the_pixel_budget_did():
    from qwenvl_cli.media.vision import VisionInfo

    capped = VisionInfo("image", "photo.jpg", 4032, 3024, 1148, 840, 1230)
    assert capped.cap_note() == ("this 12.2 MP image is 15,552 visual tokens at full size; capped to 1,230 by "
                                 "--max-pixels (1148x840); raise --max-pixels for finer detail")
    assert VisionInfo("image", "small.png", 300, 200, 308, 196, 77).cap_note() is None
    assert VisionInfo("video", "c.mp4", 640, 480, 644, 476, 800, frames=4).cap_note() is None
