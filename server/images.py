"""Turn a client's image reference (base64, a `data:` URI, or an http(s) URL when allowed) into a PIL RGB
image, safely.

Contract:
- Input is untrusted text. Output is a fully decoded `PIL.Image.Image` in mode RGB, or an `ImageError`
  (`server.image_errors`: `ImageTooLargeError`, `RemoteImageRefusedError`) whose message says what to send
  instead. The HTTP layer maps them to statuses; this module knows nothing of HTTP.
- Only PNG, JPEG, WebP and GIF are opened (never EPS, PDF, FITS, TIFF...); only the first frame is decoded.
- Dimensions are checked from the header (after `Image.open`, BEFORE `load()`) against the pixel, side and
  aspect limits, so a decompression bomb is refused without being decompressed. Pillow's own bomb
  warning/error becomes our `ImageTooLargeError` too. Truncated or corrupt data is an error, never a partly
  decoded image.
- Library exception text is logged, never returned to the client.
- http(s) URLs are refused unless `allow_remote_images` is on; then `server.image_fetch` fetches them under
  its limits. Other URL schemes (file:, ftp:, ...) are always refused.

This module is CPU-bound and synchronous: call it from a worker thread (the routes do), not on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from server.image_errors import ImageError, ImageTooLargeError, RemoteImageRefusedError

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]{0,15}):")  # base64 never contains ':', so this is a URL
_HOW_TO_SEND = "send the image inline as base64 or as a data:image/png;base64,... URI"


@dataclass(frozen=True)
class ImageLimits:
    """Caps applied to every image. Built from `server.settings.Settings` by `from_settings`."""

    max_pixels: int = 16_000_000
    max_side: int = 4096
    max_aspect_ratio: float = 20.0

    @classmethod
    def from_settings(cls, settings) -> ImageLimits:
        return cls(settings.max_image_pixels, settings.max_image_side, settings.max_image_aspect_ratio)


def load_image(reference: str, settings) -> Image.Image:
    """Decode `reference` (base64, data: URI or URL) under the limits of `settings` (module contract)."""
    text = reference.strip()
    if not text:
        raise ImageError(f"image is empty; {_HOW_TO_SEND}")
    scheme = _SCHEME.match(text)
    if scheme is None:
        raw = decode_base64(text)
    else:
        kind = scheme.group(1).lower()
        if kind == "data":
            raw = decode_data_uri(text)
        elif kind in ("http", "https"):
            raw = _fetch_remote(text, settings)
        else:
            raise ImageError(f"image URLs with scheme '{kind}:' are not accepted; {_HOW_TO_SEND}")
    return decode_image_bytes(raw, ImageLimits.from_settings(settings))


def _fetch_remote(url: str, settings) -> bytes:
    if not settings.allow_remote_images:
        raise RemoteImageRefusedError(
            "remote image URLs are disabled on this server (allow_remote_images is off); " + _HOW_TO_SEND
        )
    from server.image_fetch import fetch_image_bytes

    return fetch_image_bytes(url, settings)


def decode_base64(text: str) -> bytes:
    """Standard-alphabet base64 (padding required; whitespace and line breaks are ignored); url-safe is
    accepted."""
    compact = "".join(text.split())
    if not compact:
        raise ImageError(f"image is empty; {_HOW_TO_SEND}")
    try:
        if "-" in compact or "_" in compact:
            return base64.b64decode(compact, altchars=b"-_", validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(
            "image is not valid base64 (standard or URL-safe alphabet, with '=' padding); " + _HOW_TO_SEND
        ) from None


def decode_data_uri(text: str) -> bytes:
    """`data:[image/<type>][;base64],<payload>`: only base64 payloads of an image media type."""
    header, comma, payload = text.partition(",")
    if not comma:
        raise ImageError("data: URI has no ',' before its payload; expected data:image/png;base64,<base64>")
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    media_type = params[0]
    if media_type and not media_type.startswith("image/"):
        raise ImageError(
            f"data: URI media type '{media_type[:40]}' is not an image; use image/png or image/jpeg"
        )
    if "base64" not in params[1:]:
        raise ImageError("data: URI is not base64-encoded; expected data:image/png;base64,<base64>")
    return decode_base64(payload)


def decode_image_bytes(raw: bytes, limits: ImageLimits) -> Image.Image:
    """Open (header only), check dimensions, then decode the first frame and convert to RGB."""
    if not raw:
        raise ImageError(f"image is empty; {_HOW_TO_SEND}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open_header(raw, limits)
        check_dimensions(image.size, limits)
        try:
            image.load()  # first frame only; never seek()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _too_large(image.size, limits) from None
        except Exception as exc:  # truncated streams, corrupt chunks, decoder errors
            log.info("image decode failed: %s: %s", type(exc).__name__, exc)
            raise ImageError(
                f"image data is truncated or corrupt ({image.format}); send the complete file"
            ) from None
    return to_rgb(image)


def _open_header(raw: bytes, limits: ImageLimits) -> Image.Image:
    try:
        return Image.open(io.BytesIO(raw), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(
            f"image is a decompression bomb (over {limits.max_pixels} pixels); send a smaller image"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"image bytes are not a PNG, JPEG, WebP or GIF image; {_HOW_TO_SEND}") from None
    except Exception as exc:
        log.info("image header unreadable: %s: %s", type(exc).__name__, exc)
        raise ImageError("image header is corrupt; send a complete PNG, JPEG, WebP or GIF file") from None


def check_dimensions(size: tuple[int, int], limits: ImageLimits) -> None:
    """Refuse empty, oversized (pixels or side) or extremely thin images, from the header's size."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise _too_large(size, limits)
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise ImageError(
            f"image aspect ratio {width}x{height} is more extreme than {limits.max_aspect_ratio:g}:1; "
            "crop or pad it"
        )


def _too_large(size: tuple[int, int], limits: ImageLimits) -> ImageTooLargeError:
    width, height = size
    return ImageTooLargeError(
        f"image is {width}x{height} pixels, over the limit of {limits.max_pixels} pixels and "
        f"{limits.max_side} pixels per side; resize it before sending"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation, flatten transparency onto white, and return a new RGB image."""
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception as exc:  # a broken EXIF block is not worth refusing the image for
        log.info("ignoring unreadable EXIF orientation: %s", exc)
    try:
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
        if has_alpha:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return image.convert("RGB")
    except Exception as exc:
        log.info("image mode conversion failed: %s: %s", type(exc).__name__, exc)
        raise ImageError(
            f"image pixel mode '{image.mode}' cannot be converted to RGB; send an RGB PNG or JPEG"
        ) from None
