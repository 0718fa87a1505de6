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
from collections.abc import Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from sidpipe.redact import redact_urls
from sidpipe.storage.image_policy import UNSAFE, allow_listed, host_problem, resolve_host

PATCH = 28
Image.MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs early


class ImageError(ValueError):
    """An item image that cannot be used (missing, too large, not decodable, not allowed)."""


MAX_REDIRECTS = 5


def read_image_bytes(
    uri: str,
    max_bytes: int,
    allow_http: bool,
    timeout: float = 30.0,
    allowed_hosts: Sequence[str] = (),
) -> bytes:
    """Raw bytes of a local, s3:// or (when allowed) http(s):// image, at most `max_bytes`.

    An http(s) host is checked here again (ingest did, but a DNS answer can change): one that is
    or resolves to a non-public address is refused unless `allowed_hosts` names it, and so is
    every redirect hop (docs/security.md)."""
    if uri.startswith(("http://", "https://")):
        if not allow_http:
            raise ImageError(f"http(s) images are disabled: {redact_urls(uri)}")
        return _download(uri, max_bytes, timeout, allowed_hosts)
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
    except Exception as exc:  # noqa: BLE001 - any storage error for this item's error
        raise ImageError(f"cannot read {uri}: {exc}") from exc


def _pinned_request(url, allowed_hosts: Sequence[str]) -> tuple[object, dict, dict]:
    """(URL to connect to, headers, extensions) for one hop: the host checked and, unless it is
    allow-listed by name, pinned to the checked address so that no second DNS answer is used
    (the Host header and the TLS server name stay the host's)."""
    host = url.host
    if allow_listed(host, allowed_hosts):
        return url, {}, {}
    try:
        addresses = resolve_host(host)
    except (OSError, UnicodeError, ValueError) as exc:
        raise ImageError(f"cannot resolve {host}: {exc}") from None
    if (problem := host_problem(host, allowed_hosts, addresses)) is not None:
        raise ImageError(f"{UNSAFE}{problem}: {redact_urls(str(url))}")
    if str(addresses[0]) == host:  # an IP address already
        return url, {}, {}
    headers = {"Host": host if url.port is None else f"{host}:{url.port}"}
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return url.copy_with(host=str(addresses[0])), headers, extensions


def _download(uri: str, max_bytes: int, timeout: float, allowed_hosts: Sequence[str]) -> bytes:
    import httpx

    shown = redact_urls(uri)
    try:
        url = httpx.URL(uri)
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                if url.scheme not in ("http", "https"):
                    raise ImageError(f"redirected to a {url.scheme}:// URL: {shown}")
                target, headers, extensions = _pinned_request(url, allowed_hosts)
                with client.stream("GET", target, headers=headers, extensions=extensions) as answer:
                    if answer.is_redirect:
                        url = url.join(answer.headers["location"])
                        continue
                    answer.raise_for_status()
                    data = bytearray()
                    for chunk in answer.iter_bytes():
                        data.extend(chunk)
                        if len(data) > max_bytes:
                            raise ImageError(f"image larger than {max_bytes:,} bytes: {shown}")
                    return bytes(data)
        raise ImageError(f"more than {MAX_REDIRECTS} redirects: {shown}")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ImageError(f"cannot download {shown}: {redact_urls(str(exc))}") from exc


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
    uri: str,
    transport: str,
    max_bytes: int,
    max_pixels: int,
    allow_http: bool,
    allowed_hosts: Sequence[str] = (),
) -> str:
    """The `image_url.url` to send: a base64 data URL, or a file:// URL for servers started
    with --allowed-local-media-path that can read the same path."""
    if transport == "file_url":
        if "://" in uri:
            raise ImageError(f"file_url transport needs a local path, got {uri}")
        return f"file://{uri}"
    data = read_image_bytes(uri, max_bytes, allow_http, allowed_hosts=allowed_hosts)
    return to_data_url(fit_pixel_budget(decode_image(data, uri), max_pixels))
