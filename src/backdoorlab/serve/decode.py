"""Request bodies to images: JSON nested lists, PNG / JPEG / npz uploads. Every malformed kind is
a :class:`RequestError` with a 4xx status and a message naming the problem and the fix."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
import torch

from backdoorlab.errors import BackdoorLabError


class RequestError(Exception):
    """A request the service cannot answer: ``status`` (4xx or 503) and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def to_batch(arr: Any, shape: tuple[int, int, int], what: str, max_images: int) -> torch.Tensor:
    """An array of images (N, H, W) or (N, H, W, C) checked against the model's ``shape`` (C, H, W)
    and returned as uint8 (N, C, H, W)."""
    from backdoorlab.validate import images_array

    try:
        a = np.asarray(arr)
    except (ValueError, TypeError) as exc:
        raise RequestError(422, f"{what}: images must be a rectangular nested list of integers 0..255 ({exc})") from None
    if a.dtype == object:
        raise RequestError(422, f"{what}: images must be a rectangular nested list of integers 0..255 "
                                "(the rows or images have different lengths)")
    if a.ndim >= 1 and a.shape[0] == 0:
        raise RequestError(422, f"{what}: empty batch: send at least one image")
    if a.ndim >= 1 and a.shape[0] > max_images:
        raise RequestError(413, f"{what}: {a.shape[0]} images in one request; the limit is {max_images}: split the batch")
    if a.dtype.kind in "iu" and a.size and int(a.min()) >= 0 and int(a.max()) <= 255:
        a = a.astype(np.uint8)
    try:
        a = images_array(a, what)  # (N, H, W, C) uint8
    except BackdoorLabError as exc:
        raise RequestError(422, str(exc)) from None
    c, h, w = shape
    if a.shape[1:3] != (h, w):
        raise RequestError(422, f"{what}: images are {a.shape[1]}x{a.shape[2]} but the model takes {h}x{w}: resize them")
    if a.shape[3] != c:
        kinds = {1: "grey (1 channel)", 3: "RGB (3 channels)"}
        raise RequestError(422, f"{what}: images are {kinds.get(a.shape[3], a.shape[3])} but the model takes "
                                f"{kinds.get(c, c)}: convert them")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def decode_json(body: bytes, shape: tuple[int, int, int], max_images: int) -> torch.Tensor:
    """``{"images": [...]}`` (nested uint8 lists, N x H x W or N x H x W x C)."""
    if not body.strip():
        raise RequestError(422, 'empty body: send {"images": [...]} with at least one image')
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "images" not in doc:
        raise RequestError(422, 'the JSON body must be an object {"images": [...]} (N x H x W or N x H x W x C uint8)')
    images = doc["images"]
    if not isinstance(images, list):
        raise RequestError(422, f'"images" must be a list of images; got {type(images).__name__}')
    return to_batch(images, shape, '"images"', max_images)


def decode_file(data: bytes, shape: tuple[int, int, int], max_images: int, name: str = "file") -> torch.Tensor:
    """An uploaded PNG or JPEG (one image) or an .npz with ``x`` (N images); told apart by content."""
    if not data:
        raise RequestError(422, f"{name}: the upload is empty: send a PNG, JPEG or .npz with x")
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff":
        return to_batch(_decode_image(data, shape, name)[None], shape, name, max_images)
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        return _decode_npz(data, shape, max_images, name)
    raise RequestError(415, f"{name}: not a PNG, JPEG or .npz file (unknown content); send one of those")


def _decode_image(data: bytes, shape: tuple[int, int, int], name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > 64 * 1024 * 1024:
                raise RequestError(413, f"{name}: image of {im.width}x{im.height} pixels is too large")
            mode = im.mode
            if mode in ("L", "RGB"):
                a = np.asarray(im.convert(mode))
            elif mode in ("1", "I;16", "I", "F"):
                a = np.asarray(im.convert("L"))
            elif mode in ("LA",):
                a = np.asarray(im.convert("L"))
            else:  # P, RGBA, CMYK, YCbCr: colour
                a = np.asarray(im.convert("RGB"))
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RequestError(422, f"{name}: the image cannot be decoded ({exc}); send a valid PNG or JPEG") from None
    if a.ndim == 3 and shape[0] == 1 and a.shape[2] == 3 and (a[..., :1] == a).all():
        a = a[..., 0]  # an RGB file holding a grey image
    return a


def _decode_npz(data: bytes, shape: tuple[int, int, int], max_images: int, name: str) -> torch.Tensor:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if "x" not in z.files:
                raise RequestError(422, f"{name}: the .npz has no key x (found {sorted(z.files)}); put the images in x")
            x = z["x"]
    except RequestError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise RequestError(422, f"{name}: the .npz cannot be read ({exc}); write it with numpy.savez(x=images)") from None
    return to_batch(x, shape, f"{name} x", max_images)
