"""The record inside one image sdbatch wrote (`sdbatch inspect`).

`read_image_info` returns the A1111 infotext and the sdbatch record embedded in a PNG
(text chunks) or a JPEG/WebP (EXIF), read from a local path, an S3 URI or a WebDataset
shard member. `read_tar_members` is how the gallery reads shard members too. Nothing
here prints.
"""

from __future__ import annotations

import io
import json
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from .errors import UserError
from .store import read_uri

# EXIF tags sdbatch writes into JPEG/WebP (see write.encode_image).
_EXIF_IFD, _USER_COMMENT, _IMAGE_DESCRIPTION = 0x8769, 0x9286, 0x010E


def read_image_info(
    uri: str, storage: dict[str, Any] | None = None
) -> tuple[str | None, dict[str, Any]]:
    """(A1111 `parameters` infotext, sdbatch record) of an image sdbatch wrote.

    `uri` is a local path, an S3 URI, or a WebDataset sample as metadata `image_uri`s
    name it (`.../shards/RUN-00000.tar#SAMPLE.png`).
    """
    from PIL import Image, UnidentifiedImageError

    if "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    data = _image_bytes(uri, storage)
    try:
        with Image.open(io.BytesIO(data)) as im:
            parameters, text = _embedded_texts(im)
            fmt = im.format
    except (UnidentifiedImageError, OSError):
        raise UserError(f"{uri}: not an image (expected a PNG written by sdbatch)") from None
    if text is None:
        extra = " (it has A1111 'parameters' only)" if parameters else ""
        raise UserError(
            f"{uri}: no sdbatch record in this {fmt or 'image'}{extra}; sdbatch writes a "
            "'parameters' and an 'sdbatch' text chunk into every PNG (EXIF in JPEG/WebP)"
        )
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{uri}: the sdbatch record is not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise UserError(f"{uri}: the sdbatch record is not a JSON object")
    return parameters, record


def read_tar_members(data: bytes, names: AbstractSet[str], where: str) -> dict[str, bytes]:
    """name → bytes of each of `names` in the tar shard `data` (read from `where`).

    FileNotFoundError names a missing member; UserError a shard tar cannot read.
    """
    import tarfile

    found = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for info in tar:
                if info.name in names and info.isfile():
                    f = tar.extractfile(info)
                    if f is not None:
                        found[info.name] = f.read()
    except tarfile.TarError as err:
        raise UserError(f"{where}: not a readable tar shard ({err})") from None
    missing = sorted(set(names) - set(found))
    if missing:
        raise FileNotFoundError(f"{where}: no member {missing[0]!r} in this shard")
    return found


def _image_bytes(uri: str, storage: dict[str, Any] | None) -> bytes:
    """The bytes at `uri`; FileNotFoundError / StoreError name it."""
    shard, hashmark, member = uri.partition("#")
    if not (hashmark and shard.endswith(".tar")):
        return read_uri(uri, storage)
    return read_tar_members(read_uri(shard, storage), {member}, shard)[member]


def _embedded_texts(im: Any) -> tuple[str | None, str | None]:
    """(infotext, record JSON text) from PNG text chunks, else from EXIF."""
    # `.text` also reads PNG text chunks stored after the image data.
    chunks = {k: v for k, v in (getattr(im, "text", None) or {}).items() if isinstance(v, str)}
    chunks.update({k: v for k, v in im.info.items() if isinstance(v, str)})
    if "parameters" in chunks or "sdbatch" in chunks:
        return chunks.get("parameters"), chunks.get("sdbatch")
    exif = im.getexif()
    comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes):  # "UNICODE\0" + UTF-16BE, as A1111 writes it
        if comment.startswith(b"UNICODE\0"):
            comment = comment[8:].decode("utf-16-be", "replace")
        else:
            comment = comment.removeprefix(b"ASCII\0\0\0").decode("utf-8", "replace")
    record = exif.get(_IMAGE_DESCRIPTION)
    return comment, record if isinstance(record, str) and record.startswith("{") else None
