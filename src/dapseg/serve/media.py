"""Reading a task's image: from Label Studio over HTTP, or from the operator's local-files root.

A task names its image by a URL. Two kinds are read, nothing else:
- Label Studio's local-files URL, ``/data/local-files/?d=<path>``, with ``--local-files-root`` set: the
  file ``<root>/<path>`` (``files.resolve_inside``: no ``..``, absolute name or symlink out of the root),
  the same file Label Studio serves from its ``LOCAL_FILES_DOCUMENT_ROOT``;
- any other path on Label Studio's own server (``/data/upload/...``, or local files where no root is
  set), or a full URL on the host of ``LABEL_STUDIO_URL``: fetched from ``LABEL_STUDIO_URL`` with
  ``LABEL_STUDIO_API_KEY``, as Label Studio's official ML backends do. A personal access token (a JWT
  refresh token) is exchanged for an access token at ``/api/token/refresh/`` and sent as ``Bearer``;
  a legacy token is sent as ``Token``.
URLs on other hosts, cloud URIs (``s3://``), ``data:`` URIs and file paths are refused: the server
never reads a place a task's author chooses. Downloads are capped in bytes, images in pixels (checked
from the header, before decoding), redirects are not followed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
from PIL import Image, UnidentifiedImageError

from dapseg.files import resolve_inside
from dapseg.images import load_image

LOCAL_FILES_PATHS = ("/data/local-files", "/data/local-files/")


class MediaError(ValueError):
    """A task's image cannot be read; the message names the task and the reason."""


@dataclass(frozen=True)
class MediaLimits:
    max_pixels: int | None  # width * height, checked from the image header before decoding (None: no limit)
    max_bytes: int  # per downloaded or local image file
    timeout_s: float  # per download


def is_jwt(token: str) -> bool:
    """A JWT (three base64url parts, the first a JSON header with "alg"): Label Studio's personal
    access tokens are JWT refresh tokens; legacy tokens are 40 hex digits."""
    parts = token.split(".")
    if len(parts) != 3:
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False
    return isinstance(header, dict) and "alg" in header


class LabelStudioAuth:
    """The Authorization header for Label Studio: ``Token <legacy key>``, or ``Bearer <access>`` with an
    access token obtained from a personal access token (refreshed when Label Studio answers 401)."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.personal = is_jwt(api_key)
        self._access: str | None = None
        self._lock = asyncio.Lock()

    async def header(self, client: httpx.AsyncClient, renew: bool = False) -> dict[str, str]:
        if not self.personal:
            return {"Authorization": f"Token {self.api_key}"}
        async with self._lock:
            if self._access is None or renew:
                self._access = await self._refresh(client)
            return {"Authorization": f"Bearer {self._access}"}

    async def _refresh(self, client: httpx.AsyncClient) -> str:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            r = await client.post(url, json={"refresh": self.api_key})
        except httpx.HTTPError as e:
            raise MediaError(f"cannot reach Label Studio at {url} to exchange LABEL_STUDIO_API_KEY: {e}") from e
        access = r.json().get("access") if r.status_code == 200 else None
        if not isinstance(access, str) or not access:
            raise MediaError(f"Label Studio refused LABEL_STUDIO_API_KEY (a personal access token) at {url}: "
                             f"HTTP {r.status_code}")
        return access


class MediaReader:
    """Reads task images into (H, W, 3) uint8 arrays within ``limits``."""

    def __init__(self, limits: MediaLimits, local_files_root: str | os.PathLike[str] | None = None,
                 label_studio_url: str | None = None, api_key: str | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        """``client``: the HTTP client to download with (made on first use when None; it must not
        follow redirects)."""
        self.limits = limits
        self.local_root = Path(local_files_root).resolve() if local_files_root else None
        if self.local_root is not None and not self.local_root.is_dir():
            raise FileNotFoundError(f"--local-files-root {local_files_root} is not a folder")
        self.base_url = (label_studio_url or "").rstrip("/") or None
        if self.base_url is not None:
            parts = urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"LABEL_STUDIO_URL must be an http(s) URL such as http://localhost:8080, "
                                 f"got {label_studio_url!r}")
        self.auth = LabelStudioAuth(self.base_url, api_key) if self.base_url and api_key else None
        self._client = client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def read(self, url: object, what: str) -> np.ndarray:
        """The image at ``url`` (a task's data field), or ``MediaError`` naming ``what`` (e.g. "task 7")."""
        if not isinstance(url, str) or not url:
            raise MediaError(f"{what}: the image field is {url!r}, not a URL")
        parts = urlsplit(url)
        local = parts.path in LOCAL_FILES_PATHS and (not parts.netloc or self._is_label_studio(parts))
        if local and self.local_root is not None:
            values = parse_qs(parts.query, keep_blank_values=True).get("d") or [""]
            # Label Studio reads ?d= relative to its document root, a leading "/" dropped; so do we.
            name = values[-1].lstrip("/")
            try:
                path = resolve_inside(self.local_root, name, what=f"{what}: local file {url!r}")
            except ValueError as e:
                raise MediaError(str(e)) from e
            return await asyncio.to_thread(self._read_file, path, what)
        if parts.scheme in ("http", "https"):
            if not self._is_label_studio(parts):
                host = self.base_url or "LABEL_STUDIO_URL is not set"
                raise MediaError(f"{what}: {url!r} is not on Label Studio's host ({host}); dapseg serve reads "
                                 "images only from Label Studio or --local-files-root")
            target = url
        elif not parts.scheme and not parts.netloc and parts.path.startswith("/"):
            if self.base_url is None:
                hint = " or start dapseg serve with --local-files-root" if local else ""
                raise MediaError(f"{what}: {url!r} is served by Label Studio: set LABEL_STUDIO_URL and "
                                 f"LABEL_STUDIO_API_KEY{hint}")
            target = self.base_url + url
        else:
            raise MediaError(f"{what}: {url!r} is neither a Label Studio URL nor a local-files URL; dapseg serve "
                             "reads images only from Label Studio or --local-files-root")
        data = await self._download(target, what)
        return await asyncio.to_thread(self._decode, io.BytesIO(data), f"{what}: {url}")

    def _is_label_studio(self, parts) -> bool:
        if self.base_url is None:
            return False
        base = urlsplit(self.base_url)
        return (parts.scheme, parts.netloc) == (base.scheme, base.netloc)

    async def _download(self, url: str, what: str) -> bytes:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.limits.timeout_s, follow_redirects=False)
        client = self._client
        for attempt in range(2):
            headers = await self.auth.header(client, renew=attempt > 0) if self.auth else {}
            try:
                async with client.stream("GET", url, headers=headers) as r:
                    if r.status_code == 401 and attempt == 0 and self.auth is not None and self.auth.personal:
                        continue  # the access token expired: exchange the personal token again
                    if r.status_code != 200:
                        hint = " (check LABEL_STUDIO_API_KEY)" if r.status_code in (401, 403) else ""
                        raise MediaError(f"{what}: Label Studio answered HTTP {r.status_code} for {url}{hint}")
                    declared = int(r.headers.get("content-length") or 0)
                    if declared > self.limits.max_bytes:
                        raise MediaError(self._too_big(what, url, declared))
                    chunks, size = [], 0
                    async for chunk in r.aiter_bytes():
                        size += len(chunk)
                        if size > self.limits.max_bytes:
                            raise MediaError(self._too_big(what, url, size))
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.HTTPError as e:
                raise MediaError(f"{what}: cannot download {url}: {type(e).__name__}: {e}") from e
        raise MediaError(f"{what}: Label Studio refused the access token for {url} twice")

    def _too_big(self, what: str, source: str, size: int) -> str:
        return (f"{what}: {source} is more than {self.limits.max_bytes:,} bytes ({size:,} read); the server's "
                "limit is --max-image-mb")

    def _read_file(self, path: Path, what: str) -> np.ndarray:
        try:
            size = path.stat().st_size
        except FileNotFoundError as e:
            raise MediaError(f"{what}: image not found under --local-files-root: {path}") from e
        except OSError as e:
            raise MediaError(f"{what}: cannot read {path}: {e.strerror or e}") from e
        if not path.is_file():
            raise MediaError(f"{what}: {path} is not a file")
        if size > self.limits.max_bytes:
            raise MediaError(self._too_big(what, str(path), size))
        try:
            with open(path, "rb") as f:
                return self._decode(f, f"{what}: {path}")
        except PermissionError as e:
            raise MediaError(f"{what}: cannot read {path}: permission denied") from e

    def _decode(self, stream: io.BufferedIOBase | io.BytesIO, source: str) -> np.ndarray:
        """Header first: an image declaring more than ``max_pixels`` is refused before it is decoded."""
        try:
            with Image.open(stream) as img:
                w, h = img.size
                if self.limits.max_pixels is not None and w * h > self.limits.max_pixels:
                    raise MediaError(f"{source}: {w}x{h} = {w * h:,} pixels, more than the server's limit of "
                                     f"{self.limits.max_pixels:,} (--max-pixels); not decoded")
                return load_image(img)
        except Image.DecompressionBombError as e:
            raise MediaError(f"{source}: {e}; not decoded") from e
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise MediaError(f"{source}: corrupt or not an image ({e})") from e
