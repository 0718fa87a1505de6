"""Item images for vision-language models: load, orient, bound the pixel budget, encode.

Qwen2-VL/Qwen2.5-VL (and GME, built on Qwen2-VL) cut images into 28x28-pixel patches, one visual
token each; `max_pixels` therefore bounds the visual tokens a request costs. Images above the
budget are scaled down here (keeping the aspect ratio, sides rounded to multiples of 28) so the
request is small and the server does not resize again; smaller images are sent as they are and
the server's own `min_pixels` applies.

Every failure is an `ImageError` with the reason: the caller records it as a per-item error.
"""

from __future__ import annotations

import base64
import io
import math

from PIL import Image, ImageOps, UnidentifiedImageError

PATCH = 28
Image.MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs early


class ImageError(ValueError):
    """An item image that cannot be used (missing, too large, not decodable, not allowed)."""


def read_image_bytes(uri: str, max_bytes: int, allow_http: bool, timeout: float = 30.0) -> bytes:
    """Raw bytes of a local, s3:// or (when allowed) http(s):// image, at most `max_bytes`."""
    if uri.startswith(("http://", "https://")):
        if not allow_http:
            raise ImageError(f"http(s) images are disabled: {uri}")
        import httpx

        try:
            with httpx.stream("GET", uri, timeout=timeout, follow_redirects=True) as response:
                response.raise_for_status()
                data = bytearray()
                for chunk in response.iter_bytes():
                    data.extend(chunk)
                    if len(data) > max_bytes:
                        raise ImageError(f"image larger than {max_bytes:,} bytes: {uri}")
                return bytes(data)
        except httpx.HTTPError as exc:
            raise ImageError(f"cannot download {uri}: {exc}") from exc
    from sidpipe.storage.store import open_filesystem

    try:
        fs, path = open_filesystem(uri)
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise ImageError(f"image larger than {max_bytes:,} bytes ({size:,}): {uri}")
        with fs.open(path, "rb") as handle:
            return handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageError(f"image not found: {uri}") from None
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any storage error is this item's error
        raise ImageError(f"cannot read {uri}: {exc}") from exc


def decode_image(data: bytes, uri: str = "image") -> Image.Image:
    """An RGB image with its EXIF orientation applied."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as exc:
        raise ImageError(f"cannot decode {uri}: {exc}") from exc
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def fit_pixel_budget(image: Image.Image, max_pixels: int) -> Image.Image:
    """Scale down to at most `max_pixels`, sides multiples of 28; smaller images unchanged."""
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    new_w = max(PATCH, math.floor(width * scale / PATCH) * PATCH)
    new_h = max(PATCH, math.floor(height * scale / PATCH) * PATCH)
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def to_data_url(image: Image.Image, quality: int = 90) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_url_for(
    uri: str, transport: str, max_bytes: int, max_pixels: int, allow_http: bool
) -> str:
    """The `image_url.url` to send: a base64 data URL, or a file:// URL for servers started
    with --allowed-local-media-path that can read the same path."""
    if transport == "file_url":
        if "://" in uri:
            raise ImageError(f"file_url transport needs a local path, got {uri}")
        return f"file://{uri}"
    data = read_image_bytes(uri, max_bytes, allow_http)
    return to_data_url(fit_pixel_budget(decode_image(data, uri), max_pixels))
