"""server.images / server.image_fetch: every kind of bad image gets its own typed error and message (and the API's
status for it); odd but valid images decode to RGB. Remote fetching is exercised against a real local HTTP
server."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import zlib

import pytest
from PIL import Image

from server.api.errors import describe_exception
from server.image_errors import ImageError, ImageTooLargeError, RemoteImageRefusedError
from server.images import ImageLimits, decode_image_bytes, load_image
from server.settings import Settings

SETTINGS = Settings(api_key=None, ops_token=None)


def http_of(exc: BaseException) -> tuple[int, str]:
    """(status, error type) the API answers for `exc`; the image code itself knows nothing of HTTP."""
    status, error_type, _, _ = describe_exception(exc)
    return status, error_type


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_with_header(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit RGB) followed by the given IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def real_png_bomb(side: int) -> bytes:
    """A VALID side x side all-black PNG: tens of KB that decompress to side*side*3 bytes."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + side * 3)  # filter byte 0 + black pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return png_with_header(side, side, idat)


def test_valid_png_base64_and_data_uri_decode_to_rgb():
    raw = _encode(Image.new("RGB", (16, 12), (255, 0, 0)), "PNG")
    for reference in (_b64(raw), "data:image/png;base64," + _b64(raw), "data:;base64," + _b64(raw)):
        image = load_image(reference, SETTINGS)
        assert image.mode == "RGB" and image.size == (16, 12)
        assert image.getpixel((0, 0)) == (255, 0, 0)


def test_base64_with_line_breaks_and_urlsafe_alphabet_is_accepted():
    raw = _encode(Image.new("RGB", (40, 40), (1, 2, 3)), "PNG")
    wrapped = "\n".join(_b64(raw)[i : i + 76] for i in range(0, len(_b64(raw)), 76))
    assert load_image(wrapped, SETTINGS).size == (40, 40)
    assert load_image(base64.urlsafe_b64encode(raw).decode(), SETTINGS).size == (40, 40)


@pytest.mark.parametrize(
    "reference, fragment",
    [
        ("", "image is empty"),
        ("   ", "image is empty"),
        ("not base64 !!", "not valid base64"),
        ("QUJ", "not valid base64"),  # missing padding
        ("data:image/png;base64", "no ','"),
        ("data:text/plain;base64,aGVsbG8=", "is not an image"),
        ("data:image/png,rawbytes", "not base64-encoded"),
        ("file:///etc/passwd", "scheme 'file:'"),
        ("ftp://example.com/x.png", "scheme 'ftp:'"),
    ],
)
def test_malformed_references_are_invalid_image(reference, fragment):
    with pytest.raises(ImageError) as info:
        load_image(reference, SETTINGS)
    assert http_of(info.value) == (400, "invalid_image")
    assert fragment in str(info.value)


def test_non_image_bytes_and_disallowed_formats_are_refused():
    for raw in (
        b"hello, I am plain text and not an image at all",
        _encode(Image.new("RGB", (8, 8)), "BMP"),
        _encode(Image.new("RGB", (8, 8)), "TIFF"),
    ):
        with pytest.raises(ImageError) as info:
            load_image(_b64(raw), SETTINGS)
        assert http_of(info.value)[0] == 400
        assert "not a PNG, JPEG, WebP or GIF image" in str(info.value)


def test_truncated_png_is_refused_not_half_decoded():
    noise = Image.frombytes("RGB", (64, 64), bytes((i * 7919) % 251 for i in range(64 * 64 * 3)))
    raw = _encode(noise, "PNG")
    with pytest.raises(ImageError) as info:
        load_image(_b64(raw[: len(raw) // 2]), SETTINGS)
    assert http_of(info.value)[0] == 400 and "truncated or corrupt" in str(info.value)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # IDAT is garbage: decoding would fail with "truncated or corrupt", so a size error proves no decode
    # happened
    bomb = png_with_header(5000, 5000, b"not deflate data at all")
    with pytest.raises(ImageTooLargeError) as info:
        load_image(_b64(bomb), SETTINGS)
    assert http_of(info.value) == (413, "image_too_large")
    assert "5000x5000" in str(info.value) and "16000000 pixels" in str(info.value)


def test_real_decompression_bomb_is_refused():
    bomb = real_png_bomb(4200)  # ~17.6 MP, a few tens of KB on the wire
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLargeError) as info:
        load_image(_b64(bomb), SETTINGS)
    assert "4200x4200" in str(info.value)


def test_pillow_bomb_error_becomes_our_413():
    with pytest.raises(ImageTooLargeError) as info:  # 400 MP: Pillow itself raises at open
        decode_image_bytes(
            png_with_header(20000, 20000, b"x"), ImageLimits(max_pixels=10**12, max_side=10**6)
        )
    assert "decompression bomb" in str(info.value)


def test_side_and_aspect_limits():
    with pytest.raises(ImageTooLargeError):
        decode_image_bytes(png_with_header(5000, 10, b"x"), ImageLimits(max_side=4096, max_aspect_ratio=1000))
    with pytest.raises(ImageError) as info:
        decode_image_bytes(_encode(Image.new("RGB", (100, 2)), "PNG"), ImageLimits())
    assert "aspect ratio" in str(info.value)


@pytest.mark.parametrize(
    "image, fmt",
    [
        (Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        (Image.new("RGB", (1, 3)), "PNG"),
        (Image.new("L", (5, 5), 128), "PNG"),
        (Image.new("LA", (5, 5), (128, 0)), "PNG"),
        (Image.new("RGBA", (5, 5), (0, 0, 0, 0)), "PNG"),
        (Image.new("I;16", (5, 5), 1000), "PNG"),
        (Image.new("CMYK", (5, 5), (0, 0, 0, 0)), "JPEG"),
        (Image.new("P", (5, 5), 3), "GIF"),
        (Image.new("RGB", (5, 5), (0, 0, 255)), "WEBP"),
    ],
)
def test_odd_but_valid_images_become_rgb(image, fmt):
    decoded = load_image(_b64(_encode(image, fmt)), SETTINGS)
    assert decoded.mode == "RGB" and decoded.size == image.size


def test_transparency_is_flattened_on_white_and_exif_rotation_applied():
    clear = load_image(_b64(_encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG")), SETTINGS)
    assert clear.getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    rotated = load_image(_b64(_encode(Image.new("RGB", (30, 10)), "JPEG", exif=exif)), SETTINGS)
    assert rotated.size == (10, 30)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("P", (6, 6), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(_b64(buf.getvalue()), SETTINGS).size == (6, 6)


def test_remote_urls_are_refused_by_default():
    for url in (
        "http://169.254.169.254/latest/meta-data/",
        "https://example.com/cat.png",
        "HTTP://127.0.0.1/x",
    ):
        with pytest.raises(RemoteImageRefusedError) as info:
            load_image(url, SETTINGS)
        assert http_of(info.value) == (400, "remote_image_refused")
        assert "allow_remote_images is off" in str(info.value)


def test_remote_fetch_needs_an_allowlist():
    with pytest.raises(ValueError, match="remote_image_domains"):
        Settings(allow_remote_images=True, api_key=None, ops_token=None)


# ------------------------------------------------------------------------------------------ remote fetching,
# real
PNG = _encode(Image.new("RGB", (20, 10), (0, 255, 0)), "PNG")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/ok.png":
            self._send(200, PNG, {"Content-Length": str(len(PNG))})
        elif self.path == "/redirect":
            self._send(302, b"", {"Location": "http://169.254.169.254/", "Content-Length": "0"})
        elif self.path == "/huge":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
        else:
            self._send(404, b"nope", {"Content-Length": "4"})

    def _send(self, status, body, headers):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _remote_settings(**overrides):
    values = dict(
        allow_remote_images=True,
        remote_image_domains=("127.0.0.1",),
        remote_image_allow_private=True,
        remote_image_max_bytes=1024 * 1024,
        api_key=None,
        ops_token=None,
    )
    return Settings(**{**values, **overrides})


def test_remote_fetch_works_within_limits(image_host):
    assert load_image(f"{image_host}/ok.png", _remote_settings()).size == (20, 10)


@pytest.mark.parametrize(
    "path, overrides, error, fragment",
    [
        ("/ok.png", {"remote_image_allow_private": False}, RemoteImageRefusedError, "non-public address"),
        (
            "/ok.png",
            {"remote_image_domains": ("images.example.com",)},
            RemoteImageRefusedError,
            "not in this",
        ),
        ("/redirect", {}, RemoteImageRefusedError, "redirects are not followed"),
        ("/missing", {}, RemoteImageRefusedError, "HTTP 404"),
        ("/huge", {}, ImageTooLargeError, "over the limit of 1048576 bytes"),
        ("/ok.png", {"remote_image_max_bytes": 10}, ImageTooLargeError, "over the limit of 10 bytes"),
    ],
)
def test_remote_fetch_refusals(image_host, path, overrides, error, fragment):
    with pytest.raises(error) as info:
        load_image(f"{image_host}{path}", _remote_settings(**overrides))
    assert fragment in str(info.value)
