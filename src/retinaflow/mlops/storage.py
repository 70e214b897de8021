"""``s3://bucket/prefix`` wherever a path is accepted: cached, verified downloads and multipart uploads.

Credentials and endpoint come from the standard AWS sources (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``...); a custom
S3-compatible endpoint from ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL``
(MinIO, Ceph, rclone...). Requests are retried by botocore (``standard`` mode, 5 attempts); files above
``multipart_threshold`` go in parallel parts through boto3's transfer manager.

Cache: ``resolve_input`` mirrors objects to ``<cache>/data/<bucket>/<key>`` (default cache:
``RETINAFLOW_CACHE`` or ``~/.cache/retinaflow/s3``) and keeps, per object, the ETag and size it was
downloaded with under ``<cache>/meta/``; a later call downloads again only the objects whose ETag or
size changed. Integrity: every download is checked against its size, against the ``sha256`` metadata
that :func:`upload` attaches, and against the ETag when the ETag is a plain MD5 (single-part uploads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from retinaflow.mlops.errors import StorageAuthError, StorageError
from retinaflow.mlops.redact import one_line, redact

log = logging.getLogger(__name__)

_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "403",
}
_MISSING_BUCKET = {"NoSuchBucket"}
_MISSING_OBJECT = {"404", "NoSuchKey"}
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
MiB = 1024 * 1024


@dataclass
class S3Settings:
    """Transfer tuning. Part size and threshold in bytes; ``workers`` parallel parts/files."""

    multipart_threshold: int = 16 * MiB
    multipart_chunksize: int = 16 * MiB
    workers: int = 8
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


def is_s3(uri: str | os.PathLike[str] | None) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def parse(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")`` (key may be empty)."""
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"s3 URI without a bucket: {uri}")
    return bucket, key


def endpoint_url() -> str | None:
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def client(settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client on the configured endpoint, with retries and timeouts. Clients are thread-safe
    and costly to build, so one is kept per (endpoint, region, credentials, settings)."""
    s = settings or S3Settings()
    endpoint = endpoint_url()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    secret_state = hashlib.sha256(
        "\0".join(os.environ.get(v, "") for v in _CREDENTIAL_VARS).encode()
    ).hexdigest()
    key = (endpoint, region, secret_state, s.max_attempts, s.connect_timeout, s.read_timeout, s.workers)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = _new_client(s, endpoint, region)
        return _CLIENTS[key]


def _new_client(s: S3Settings, endpoint: str | None, region: str) -> Any:
    config = BotoConfig(
        retries={"max_attempts": s.max_attempts, "mode": "standard"},
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        max_pool_connections=max(10, s.workers * 2),
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _code(exc: ClientError) -> str:
    """The S3 error code of a failed request (``""`` when the reply has none)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def _error(exc: Exception, uri: str, action: str) -> StorageError:
    """One clear, secret-free line for a boto failure."""
    where = f" (endpoint {endpoint_url()})" if endpoint_url() else ""
    if isinstance(exc, NoCredentialsError):
        return StorageAuthError(
            f"no AWS credentials found to {action} {uri}: "
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(exc, ClientError):
        code = _code(exc)
        if code in _AUTH_CODES:
            return StorageAuthError(
                f"S3 refused the credentials to {action} {uri}{where} ({code}): check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and the permissions of that key"
            )
        if code in _MISSING_BUCKET:
            return StorageError(f"S3 bucket {parse(uri)[0]!r} does not exist{where}: cannot {action} {uri}")
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        return StorageError(redact(f"S3 error {code} while trying to {action} {uri}{where}: {message}"))
    return StorageError(f"cannot {action} {uri}{where}: {one_line(exc)}")


def _transfer(s: S3Settings) -> TransferConfig:
    return TransferConfig(
        multipart_threshold=s.multipart_threshold,
        multipart_chunksize=s.multipart_chunksize,
        max_concurrency=s.workers,
    )


def _check_bucket(s3: Any, bucket: str, uri: str, action: str) -> None:
    """Fail early and precisely: wrong credentials vs missing bucket (HEAD replies carry no error code,
    so a failing HEAD is followed by a listing whose error body says which)."""
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        first = exc
    except BotoCoreError as exc:
        raise _error(exc, uri, action) from exc
    try:
        s3.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except (ClientError, BotoCoreError) as exc:
        raise _error(exc, uri, action) from exc
    if _code(first) == "404":
        raise StorageError(f"S3 bucket {bucket!r} does not exist: cannot {action} {uri}") from first
    raise _error(first, uri, action) from first


def _hexdigest(path: Path, h: Any) -> str:
    """``h`` (a fresh :mod:`hashlib` object) fed the file in 1 MiB chunks."""
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return str(h.hexdigest())


def _sha256(path: Path) -> str:
    return _hexdigest(path, hashlib.sha256())


def _md5(path: Path) -> str:
    return _hexdigest(path, hashlib.md5(usedforsecurity=False))


def default_cache() -> Path:
    return Path(os.environ.get("RETINAFLOW_CACHE") or Path.home() / ".cache" / "retinaflow" / "s3")


def _objects(s3: Any, bucket: str, key: str, uri: str) -> tuple[bool, list[dict[str, Any]]]:
    """(is_single_object, [{Key, Size, ETag}...]) for ``key`` as an object, else as a prefix.
    Bucket, credential and request failures raise :class:`StorageError`."""
    _check_bucket(s3, bucket, uri, "read")
    try:
        return _list(s3, bucket, key)
    except (ClientError, BotoCoreError) as exc:
        raise _error(exc, uri, "read") from exc


def _list(s3: Any, bucket: str, key: str) -> tuple[bool, list[dict[str, Any]]]:
    """:func:`_objects` without the bucket check; boto errors propagate."""
    if key and not key.endswith("/"):
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
            return True, [{"Key": key, "Size": head["ContentLength"], "ETag": head["ETag"]}]
        except ClientError as exc:
            if _code(exc) not in _MISSING_OBJECT:
                raise
    prefix = key if (not key or key.endswith("/")) else key + "/"
    found: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.extend(o for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    return False, found


def resolve_input(uri: str, cache_dir: str | Path | None = None, settings: S3Settings | None = None) -> Path:
    """A local path for ``uri``: local paths are returned unchanged; ``s3://`` objects are downloaded
    (an object -> that file, a prefix -> a folder mirroring it) into the cache, reusing cached copies
    whose ETag and size still match. Raises :class:`StorageError` / :class:`StorageAuthError`."""
    if not is_s3(uri):
        return Path(uri)
    s = settings or S3Settings()
    bucket, key = parse(uri)
    root = Path(cache_dir) if cache_dir else default_cache()
    s3 = client(s)
    single, objects = _objects(s3, bucket, key, uri)
    if not objects:
        raise StorageError(f"no object or prefix at {uri}")
    transfer = _transfer(s)

    def fetch(obj: dict[str, Any]) -> bool:
        return _fetch(s3, bucket, obj, root, transfer)

    with ThreadPoolExecutor(max_workers=min(s.workers, len(objects))) as pool:
        downloaded = sum(pool.map(fetch, objects))
    log.info(
        "%s: %d object(s), %d downloaded, %d from cache",
        uri,
        len(objects),
        downloaded,
        len(objects) - downloaded,
    )
    local = root / "data" / bucket / key.rstrip("/")
    if not single:  # objects deleted from the prefix since the last download leave the mirror too
        expected = {root / "data" / bucket / o["Key"] for o in objects}
        for stale in [
            p for p in local.rglob("*") if p.is_file() and p not in expected and ".part-" not in p.name
        ]:
            stale.unlink()
    return local


def _fetch(s3: Any, bucket: str, obj: dict[str, Any], root: Path, transfer: TransferConfig) -> bool:
    """Download one object unless the cached copy matches; True when downloaded."""
    key, size, etag = obj["Key"], int(obj["Size"]), str(obj["ETag"]).strip('"')
    target = root / "data" / bucket / key
    meta_file = root / "meta" / bucket / (key + ".json")
    if target.is_file() and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("etag") == etag and meta.get("size") == size and target.stat().st_size == size:
            return False
    _download(s3, bucket, key, size, etag, target, transfer)
    meta_file.parent.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps({"etag": etag, "size": size}))
    return True


def download(uri: str, destination: str | Path, settings: S3Settings | None = None) -> Path:
    """Download the single object ``uri`` to exactly ``destination`` (verified, atomic); no cache."""
    s = settings or S3Settings()
    bucket, key = parse(uri)
    s3 = client(s)
    _check_bucket(s3, bucket, uri, "read")
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as exc:
        raise _error(exc, uri, "read") from exc
    transfer = _transfer(s)
    target = Path(destination)
    _download(s3, bucket, key, int(head["ContentLength"]), str(head["ETag"]).strip('"'), target, transfer)
    return target


def download_if_exists(uri: str, destination: str | Path, settings: S3Settings | None = None) -> bool:
    """Download the object ``uri`` to ``destination`` when it exists (True), else leave it (False).
    Bucket and credential problems still raise."""
    bucket, key = parse(uri)
    s3 = client(settings)
    _check_bucket(s3, bucket, uri, "read")
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _code(exc) in _MISSING_OBJECT:
            return False
        raise _error(exc, uri, "read") from exc
    except BotoCoreError as exc:
        raise _error(exc, uri, "read") from exc
    download(uri, destination, settings)
    return True


def local_output_path(uri: str, cache_dir: str | Path | None = None) -> Path:
    """The local file standing for the output ``uri`` before :func:`upload`: a fixed place under the cache
    (``<cache>/outputs/<bucket>/<key>``), so that companions written next to it (the MLflow sidecar of a
    checkpoint) are found again by later commands on this machine."""
    bucket, key = parse(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"an output file needs a key, not a prefix: {uri}")
    path = (Path(cache_dir) if cache_dir else default_cache()) / "outputs" / bucket / key
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _download(
    s3: Any, bucket: str, key: str, size: int, etag: str, target: Path, transfer: TransferConfig
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.part-")
    os.close(fd)
    tmp = Path(name)
    obj_uri = f"s3://{bucket}/{key}"
    try:
        try:
            s3.download_file(bucket, key, str(tmp), Config=transfer)
            head = s3.head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise _error(exc, obj_uri, "download") from exc
        _verify(tmp, size, etag, {k.lower(): v for k, v in head.get("Metadata", {}).items()}, obj_uri)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _verify(path: Path, size: int, etag: str, metadata: dict[str, str], uri: str) -> None:
    problem = None
    if path.stat().st_size != size:
        problem = f"size {path.stat().st_size} != {size}"
    elif metadata.get("sha256") and _sha256(path) != metadata["sha256"]:
        problem = "sha256 differs from the uploaded one"
    elif _PLAIN_MD5.match(etag) and _md5(path) != etag:
        problem = "MD5 differs from the ETag"
    if problem:
        raise StorageError(f"integrity check failed for {uri}: {problem}")


def upload(local_path: str | Path, uri: str, settings: S3Settings | None = None) -> list[str]:
    """Upload a file (to ``uri``, or into it when ``uri`` ends with ``/``) or a folder (under the prefix
    ``uri``); multipart above the threshold, sha256 attached as metadata, each object's size checked
    afterwards. Returns the object URIs written."""
    src = Path(local_path)
    if not src.exists():
        raise StorageError(f"nothing to upload: {src} does not exist")
    s = settings or S3Settings()
    bucket, key = parse(uri)
    s3 = client(s)
    _check_bucket(s3, bucket, uri, "write to")
    if src.is_file():
        items = [(src, key + src.name if (not key or key.endswith("/")) else key)]
    else:
        base = key.rstrip("/")
        items = [
            (p, f"{base}/{p.relative_to(src).as_posix()}".lstrip("/"))
            for p in sorted(src.rglob("*"))
            if p.is_file()
        ]
    transfer = _transfer(s)

    def put(item: tuple[Path, str]) -> str:
        path, object_key = item
        target = f"s3://{bucket}/{object_key}"
        try:
            s3.upload_file(
                str(path),
                bucket,
                object_key,
                Config=transfer,
                ExtraArgs={"Metadata": {"sha256": _sha256(path)}},
            )
            head = s3.head_object(Bucket=bucket, Key=object_key)
        except (ClientError, BotoCoreError) as exc:
            raise _error(exc, target, "upload to") from exc
        except boto3.exceptions.S3UploadFailedError as exc:
            raise StorageError(f"upload to {target} failed: {one_line(exc)}") from exc
        if int(head["ContentLength"]) != path.stat().st_size:
            raise StorageError(
                f"integrity check failed for {target}: size {head['ContentLength']} != {path.stat().st_size}"
            )
        return target

    with ThreadPoolExecutor(max_workers=max(1, min(s.workers, len(items)))) as pool:
        written = list(pool.map(put, items))
    log.info("uploaded %d file(s) to %s", len(written), uri)
    return written


def exists(uri: str, settings: S3Settings | None = None) -> bool:
    """True when ``uri`` names an object or a non-empty prefix (bucket errors raise)."""
    bucket, key = parse(uri)
    _, objects = _objects(client(settings), bucket, key, uri)
    return bool(objects)
