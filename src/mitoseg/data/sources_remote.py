"""Remote inputs of ``mitoseg data fetch``: resumable HTTP(S) downloads and S3 objects.

HTTP downloads go to a cache directory (``$MITOSEG_CACHE_DIR``, else
``$XDG_CACHE_HOME/mitoseg/downloads``, else ``~/.cache/mitoseg/downloads``) as
``<key>-<name>.part`` and are renamed to ``<key>-<name>`` when complete, so an
interrupted download resumes with an HTTP ``Range`` request on the next run and a
finished one is not downloaded again.

S3 objects are read with boto3. The endpoint comes from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` (any S3-compatible store: SeaweedFS, MinIO, ...), credentials and
region from the usual AWS environment variables / config files.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mitoseg.io import DataError
from mitoseg.progress import progress_iter

__all__ = [
    "CHUNK_SIZE",
    "default_cache_dir",
    "download_s3",
    "download_url",
    "is_s3_url",
    "is_url",
    "list_s3",
    "s3_client",
    "sha256_file",
    "split_s3_url",
]

#: Bytes per streamed download chunk (and per progress-bar step). An interrupted
#: download keeps every complete chunk in its ``.part`` file.
CHUNK_SIZE = 1 << 16
_HASH_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def is_url(text: str) -> bool:
    """True for ``http://`` and ``https://`` URLs."""
    return text.startswith(("http://", "https://"))


def is_s3_url(text: str) -> bool:
    """True for ``s3://`` URLs."""
    return text.startswith("s3://")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Download cache: ``$MITOSEG_CACHE_DIR`` or ``<XDG cache>/mitoseg/downloads``."""
    env = os.environ.get("MITOSEG_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mitoseg" / "downloads"


def _cache_name(url: str) -> str:
    name = Path(unquote(urlparse(url).path)).name or "download"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return f"{key}-{name}"


def download_url(
    url: str,
    cache_dir: str | Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = _TIMEOUT_S,
) -> Path:
    """Download ``url`` into ``cache_dir``, resuming a partial download.

    A complete earlier download in the cache is reused (after checking ``sha256``
    when given). A ``.part`` file left by an interrupted run is continued with an HTTP
    ``Range: bytes=<size>-`` request; a server that ignores ranges (``200``) or rejects
    them (``416``) makes the download restart from the beginning.

    Args:
        url: ``http(s)://`` URL of one file.
        cache_dir: directory for the cached file (created if needed).
        sha256: expected lowercase hex SHA-256, or ``None`` to skip verification.
        progress: show a progress bar (steps of :data:`CHUNK_SIZE` bytes).
        timeout: connect/read timeout in seconds.

    Returns:
        Path of the complete file in the cache.

    Raises:
        DataError: HTTP error status (e.g. 404), connection failure, a response shorter
            than its ``Content-Length`` (the ``.part`` file is kept for resuming), or a
            SHA-256 mismatch (the bad file is deleted). The message names the URL.
    """
    import requests

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / _cache_name(url)
    part = final.with_name(final.name + ".part")
    name = final.name.split("-", 1)[1]

    if final.is_file():
        if sha256 is None or sha256_file(final) == sha256.lower():
            return final
        final.unlink()

    offset = part.stat().st_size if part.is_file() else 0
    try:
        with requests.Session() as session:
            resp = _get(session, url, offset, timeout)
            if resp.status_code == 416:
                resp.close()
                offset = 0
                resp = _get(session, url, 0, timeout)
            with resp:
                if resp.status_code >= 400:
                    raise DataError(f"{url}: HTTP {resp.status_code} {resp.reason}")
                if offset and resp.status_code == 206:
                    start = _content_range_start(resp.headers.get("Content-Range", ""))
                    if start != offset:
                        raise DataError(f"{url}: server resumed at byte {start}, expected {offset}")
                else:
                    offset = 0
                length = resp.headers.get("Content-Length")
                remaining = int(length) if length is not None else None
                total = offset + remaining if remaining is not None else None
                chunks = resp.iter_content(chunk_size=CHUNK_SIZE)
                steps = math.ceil(remaining / CHUNK_SIZE) if remaining is not None else None
                with open(part, "ab" if offset else "wb") as fh:
                    for chunk in progress_iter(chunks, steps, f"download {name}", progress):
                        fh.write(chunk)
    except requests.RequestException as exc:
        raise DataError(f"{url}: download failed ({type(exc).__name__}: {exc})") from None

    size = part.stat().st_size
    if total is not None and size != total:
        raise DataError(
            f"{url}: download incomplete ({size} of {total} bytes); run again to resume"
        )
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256.lower():
            part.unlink()
            raise DataError(f"{url}: sha256 mismatch for {name}: expected {sha256}, got {got}")
    os.replace(part, final)
    return final


def _get(session: Any, url: str, offset: int, timeout: float) -> Any:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    return session.get(url, headers=headers, stream=True, timeout=timeout)


def _content_range_start(header: str) -> int:
    # "bytes 100-999/1000"
    try:
        return int(header.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def split_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix")``.

    Raises:
        DataError: not an ``s3://`` URL or no bucket name.
    """
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise DataError(f"{url}: not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_client() -> Any:
    """A boto3 S3 client using ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` if set."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    # A fresh session, not boto3's module-level default one, which caches the credentials
    # it resolved first and would ignore later changes of the AWS_* variables.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint or None, region_name=region or "us-east-1")


def _s3_error(url: str, exc: Exception) -> DataError:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "?")
        return DataError(f"{url}: S3 error {code} ({err.get('Message') or exc})")
    return DataError(f"{url}: S3 request failed ({type(exc).__name__}: {exc})")


def list_s3(url: str, client: Any | None = None) -> list[str]:
    """List object keys under an ``s3://bucket/prefix``, relative to the prefix.

    Returns:
        Sorted keys relative to ``prefix/`` (e.g. ``["train/images.tif", ...]``).

    Raises:
        DataError: S3 errors (missing bucket, bad credentials, unreachable endpoint).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_url(url)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = client or s3_client()
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(url, exc) from None
    return sorted(k for k in keys if k and not k.endswith("/"))


def download_s3(url: str, dest: str | Path, client: Any | None = None) -> Path:
    """Download one object ``s3://bucket/key`` to ``dest``.

    Raises:
        DataError: missing object (``S3 error 404``/``NoSuchKey``) or other S3 errors;
            the message names the URL.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(url)
    if not key or key.endswith("/"):
        raise DataError(f"{url}: not an s3://bucket/key URL of one object")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    client = client or s3_client()
    try:
        client.download_file(bucket, key, str(dest))
    except (BotoCoreError, ClientError) as exc:
        if dest.exists():
            dest.unlink()
        raise _s3_error(url, exc) from None
    return dest
