"""s3:// storage against a real S3-compatible server (rclone serve s3, SigV4)."""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.mlops.conftest import BUCKET, S3Server

from retinaflow.mlops import storage
from retinaflow.mlops.cli import resolve_paths, s3_paths
from retinaflow.mlops.errors import StorageAuthError, StorageError

MiB = 1024 * 1024


def _keys(s3_admin: Any, prefix: str) -> dict[str, int]:
    pages = s3_admin.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _patch_clients(monkeypatch: pytest.MonkeyPatch, customize: Callable[[Any], None]) -> None:
    """Fresh client cache whose new clients go through ``customize`` (the patch ends with the test)."""
    real = storage._new_client

    def wrapped(*args: Any) -> Any:
        c = real(*args)
        customize(c)
        return c

    monkeypatch.setattr(storage, "_CLIENTS", {})
    monkeypatch.setattr(storage, "_new_client", wrapped)


def _counting_client(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Record the name of every S3 operation sent."""
    _patch_clients(
        monkeypatch,
        lambda c: c.meta.events.register("before-call.s3", lambda model, **kw: calls.append(model.name)),
    )


def test_is_s3_and_parse() -> None:
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/data/b") and not storage.is_s3(None)
    assert storage.parse("s3://bucket/a/b.json") == ("bucket", "a/b.json")
    assert storage.parse("s3://bucket") == ("bucket", "")
    with pytest.raises(StorageError):
        storage.parse("s3:///key")


def test_upload_and_resolve_file_roundtrip(s3_env: S3Server, s3_admin: Any, tmp_path: Path) -> None:
    src = tmp_path / "ann.json"
    src.write_bytes(b'{"images": []}')
    written = storage.upload(src, f"s3://{BUCKET}/rt/")
    assert written == [f"s3://{BUCKET}/rt/ann.json"]
    head = s3_admin.head_object(Bucket=BUCKET, Key="rt/ann.json")
    assert {k.lower(): v for k, v in head["Metadata"].items()}["sha256"] == hashlib.sha256(
        src.read_bytes()
    ).hexdigest()
    assert (s3_env.root / BUCKET / "rt" / "ann.json").read_bytes() == src.read_bytes()  # on the server's disk
    local = storage.resolve_input(f"s3://{BUCKET}/rt/ann.json")
    assert local.read_bytes() == src.read_bytes()
    assert str(local).startswith(os.environ["RETINAFLOW_CACHE"])
    assert storage.resolve_input(str(src)) == src  # local paths pass through


def test_multipart_upload_and_download(s3_env: S3Server, s3_admin: Any, tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    _counting_client(monkeypatch, calls)
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(11 * MiB))
    settings = storage.S3Settings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, workers=2)
    storage.upload(big, f"s3://{BUCKET}/big/weights.bin", settings)
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("UploadPart") == 3
    assert _keys(s3_admin, "big/") == {"big/weights.bin": 11 * MiB}
    out = storage.resolve_input(f"s3://{BUCKET}/big/weights.bin", tmp_path / "c", settings)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()


def test_prefix_cache_reuse_update_and_prune(
    s3_env: S3Server, s3_admin: Any, tmp_path: Path, monkeypatch
) -> None:
    data = tmp_path / "images"
    (data / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        (data / name).write_bytes(name.encode() * 100)
    storage.upload(data, f"s3://{BUCKET}/ds/images")
    calls: list[str] = []
    _counting_client(monkeypatch, calls)
    first = storage.resolve_input(f"s3://{BUCKET}/ds/images")
    assert sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()) == [
        "a.png",
        "b.png",
        "sub/c.png",
    ]
    assert calls.count("GetObject") == 3
    calls.clear()
    again = storage.resolve_input(f"s3://{BUCKET}/ds/images")
    assert again == first and calls.count("GetObject") == 0  # served from the cache

    # one object changes, one disappears: only the changed one is fetched, the removed one leaves the mirror
    s3_admin.put_object(Bucket=BUCKET, Key="ds/images/a.png", Body=b"changed")
    s3_admin.delete_object(Bucket=BUCKET, Key="ds/images/b.png")
    calls.clear()
    third = storage.resolve_input(f"s3://{BUCKET}/ds/images")
    assert calls.count("GetObject") == 1
    assert (third / "a.png").read_bytes() == b"changed"
    assert not (third / "b.png").exists() and (third / "sub" / "c.png").exists()


@pytest.mark.parametrize(("with_sha", "expected"), [(True, "sha256"), (False, "MD5")])
def test_integrity_check_catches_corruption(
    s3_env: S3Server, s3_admin: Any, tmp_path: Path, monkeypatch, with_sha: bool, expected: str
) -> None:
    body = b"0123456789" * 1000
    key = f"corrupt/{expected}/model.pth"
    if with_sha:  # our upload attaches a sha256; a plain put has only the MD5 ETag
        (tmp_path / "model.pth").write_bytes(body)
        storage.upload(tmp_path / "model.pth", f"s3://{BUCKET}/{key}")
    else:
        s3_admin.put_object(Bucket=BUCKET, Key=key, Body=body)

    healthy = storage._new_client

    def corrupt_downloads(c: Any) -> None:
        download = c.download_file

        def corrupting_download(bucket: str, k: str, filename: str, **kw: Any) -> None:
            download(bucket, k, filename, **kw)  # a real transfer, then one byte flipped on the way in
            data = bytearray(Path(filename).read_bytes())
            data[0] ^= 0xFF
            Path(filename).write_bytes(bytes(data))

        c.download_file = corrupting_download

    _patch_clients(monkeypatch, corrupt_downloads)
    with pytest.raises(StorageError, match=f"integrity check failed .*{expected}"):
        storage.resolve_input(f"s3://{BUCKET}/{key}")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "model" in p.name]
    monkeypatch.setattr(storage, "_new_client", healthy)  # healthy clients again
    monkeypatch.setattr(storage, "_CLIENTS", {})
    assert storage.resolve_input(f"s3://{BUCKET}/{key}").read_bytes() == body


def test_wrong_credentials_give_one_clear_line(s3_env: S3Server, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-not-the-secret")
    with pytest.raises(StorageAuthError) as err:
        storage.resolve_input(f"s3://{BUCKET}/rt/ann.json")
    message = str(err.value)
    assert "refused the credentials" in message and "SignatureDoesNotMatch" in message
    assert "\n" not in message and "definitely-not-the-secret" not in message
    (tmp_path / "x").write_text("x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "UNKNOWNKEY")
    with pytest.raises(StorageAuthError, match="InvalidAccessKeyId"):
        storage.upload(tmp_path / "x", f"s3://{BUCKET}/x")


def test_missing_bucket_and_object(s3_env: S3Server, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as err:
        storage.resolve_input("s3://no-such-bucket/data")
    assert "\n" not in str(err.value)
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="does not exist"):
        storage.upload(tmp_path / "f", "s3://no-such-bucket/f")
    with pytest.raises(StorageError, match="no object or prefix"):
        storage.resolve_input(f"s3://{BUCKET}/nothing/here")
    assert not storage.exists(f"s3://{BUCKET}/nothing/here")
    assert not storage.download_if_exists(f"s3://{BUCKET}/nothing/here", tmp_path / "d")


def test_resolve_paths_downloads_inputs_and_publishes_outputs(
    s3_env: S3Server, s3_admin: Any, tmp_path: Path
) -> None:
    (tmp_path / "gt.json").write_text("{}")
    storage.upload(tmp_path / "gt.json", f"s3://{BUCKET}/job/gt.json")
    (tmp_path / "old.pth").write_bytes(b"previous checkpoint")
    storage.upload(tmp_path / "old.pth", f"s3://{BUCKET}/job/model.pth")
    (tmp_path / "side.json").write_text('{"run_id": "abc"}')
    storage.upload(tmp_path / "side.json", f"s3://{BUCKET}/job/model.pth.mlflow.json")
    args = argparse.Namespace(
        annotations=f"s3://{BUCKET}/job/gt.json",
        images=str(tmp_path),
        model=f"s3://{BUCKET}/job/model.pth",
        output=f"s3://{BUCKET}/job/out/detections.json",
    )
    paths = resolve_paths(args, inputs=("annotations", "images"), outputs=("output",), resume=("model",))
    assert Path(args.annotations).read_text() == "{}" and args.images == str(tmp_path)
    assert Path(args.model).read_bytes() == b"previous checkpoint"  # resumed from S3, with its sidecar
    assert Path(args.model + ".mlflow.json").read_text() == '{"run_id": "abc"}'
    Path(args.model).write_bytes(b"new checkpoint")
    Path(args.output).write_text("[]")
    written = paths.publish()
    paths.cleanup()
    assert f"s3://{BUCKET}/job/model.pth" in written and f"s3://{BUCKET}/job/out/detections.json" in written
    assert s3_admin.get_object(Bucket=BUCKET, Key="job/model.pth")["Body"].read() == b"new checkpoint"
    assert "job/model.pth.mlflow.json" in _keys(s3_admin, "job/")


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_only_rank_0_publishes_a_resumed_checkpoint(
    s3_env: S3Server, s3_admin: Any, tmp_path: Path, monkeypatch, rank: str
) -> None:
    """Every rank of ``train s3://...`` stages the checkpoint it resumes from, but only rank 0 writes a
    new one: another rank uploading its staged copy on exit would put the old checkpoint back."""
    uri = f"s3://{BUCKET}/ranks{rank}/model.pth"
    (tmp_path / "old.pth").write_bytes(b"resumed from")
    storage.upload(tmp_path / "old.pth", uri)
    monkeypatch.setenv("RANK", rank)
    args = argparse.Namespace(model=uri)
    with s3_paths(args, resume=("model",)):
        assert Path(args.model).read_bytes() == b"resumed from"
        if rank == "0":
            Path(args.model).write_bytes(b"trained further")
        else:  # meanwhile rank 0 (another process) publishes its checkpoint
            (tmp_path / "new.pth").write_bytes(b"trained further")
            storage.upload(tmp_path / "new.pth", uri)
    stored = s3_admin.get_object(Bucket=BUCKET, Key=f"ranks{rank}/model.pth")["Body"].read()
    assert stored == b"trained further"
    assert not Path(args.model).exists()  # staging removed on every rank


def test_sigterm_message_of_an_s3_model_names_the_uri_not_the_staging_file(
    s3_env: S3Server, s3_admin: Any, synth_small: Any, tmp_path: Path, monkeypatch, capsys
) -> None:
    import signal

    from tests.conftest import tiny_config

    from retinaflow.cli import main
    from retinaflow.commands import train as train_command
    from retinaflow.engine.callbacks import Callback

    class SigtermAtFirstStep(Callback):  # as a scheduler does; the loop stops at the next check
        def on_step(self, state: Any, metrics: Any) -> None:
            if state.iteration == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_command, "tracking_callbacks", lambda args, config: [SigtermAtFirstStep()])
    cfg = tiny_config(synth_small, iters=50)
    cfg.dump(tmp_path / "cfg.yaml")
    uri = f"s3://{BUCKET}/sigterm/model.pth"
    assert main(["train", uri, "--config", str(tmp_path / "cfg.yaml")]) == 143
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("retinaflow: error:")]
    assert message == [
        f"retinaflow: error: interrupted at iteration 2; checkpoint saved to {uri}, "
        "run the same command to resume"
    ], err[-2000:]
    assert "sigterm/model.pth" in _keys(s3_admin, "sigterm/")


def test_a_failed_s3_input_leaves_no_temporary_folder(
    s3_env: S3Server, tmp_path: Path, monkeypatch, capsys
) -> None:
    import tempfile

    from retinaflow.cli import main

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code = main(["train", f"s3://{BUCKET}/failed/model.pth", "--images", f"s3://{BUCKET}/failed/none/",
                 "--annotations", f"s3://{BUCKET}/failed/none.json"])  # fmt: skip
    assert code != 0 and "no object or prefix" in capsys.readouterr().err
    assert list(scratch.iterdir()) == []
