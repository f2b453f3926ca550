"""What can be wrong with a client's image: the plain exceptions of `server.images` and `server.image_fetch`.

They carry a message that says what to send instead, and nothing about HTTP: `server.api.errors` maps each to its
status and error type (400 `invalid_image`, 413 `image_too_large`, 400 `remote_image_refused`).
"""

from __future__ import annotations


class ImageError(ValueError):
    """The image cannot be used: empty, not base64, not an allowed format, corrupt, or of an unusable shape."""


class ImageTooLargeError(ImageError):
    """The image is over a size limit: pixels, pixels per side, or downloaded bytes."""


class RemoteImageRefusedError(ImageError):
    """An image URL this server will not fetch: remote images are off, the host is not allowed, or the download
    failed."""
