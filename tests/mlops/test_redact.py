"""Secrets never leave the process: text, mappings and log records are redacted."""

from __future__ import annotations

import logging

import pytest

from retinaflow.mlops.redact import (
    MASK,
    install_log_redaction,
    is_secret_key,
    one_line,
    redact,
    redact_mapping,
)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("http://alice:hunter2-pw@mlflow.local:5000/api", "hunter2-pw"),
        ("postgresql://bob:s3cr3t@db/mlflow", "s3cr3t"),
        ("https://tok3n-value@github.com/x.git", "tok3n-value"),
        ("GET /b/k?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F2024&X-Amz-Signature=deadbeef01", "deadbeef01"),
        ("GET /b/k?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F2024", "AKIAABCDEFGHIJKLMNOP"),
        ("Authorization: Bearer eyJhbGciOi.payload.sig", "eyJhbGciOi"),
        ('{"aws_secret_access_key": "wJalrXUtnFEMI"}', "wJalrXUtnFEMI"),
        ("password=letmein123 next", "letmein123"),
        ("key id AKIAIOSFODNN7EXAMPLE in a message", "AKIAIOSFODNN7EXAMPLE"),
    ],
)
def test_redact_masks_secrets(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert MASK in out


def test_redact_keeps_ordinary_text() -> None:
    text = "iteration 20: loss=0.53 lr=0.01 s3://bucket/data/images design=ok http://127.0.0.1:5000/api"
    assert redact(text) == text


def test_redact_masks_secret_env_values_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "Zq9plainSecretValue")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "abc")  # too short to mask literally
    assert redact("failed with Zq9plainSecretValue in it") == f"failed with {MASK} in it"
    assert redact("abc def") == "abc def"


def test_secret_keys_and_mappings() -> None:
    assert is_secret_key("aws.secret_access_key")
    assert is_secret_key("AWS_ACCESS_KEY_ID")
    assert is_secret_key("mlflow_tracking_password")
    assert is_secret_key("api_key")
    assert not is_secret_key("train.lr")
    assert not is_secret_key("data.images")
    assert not is_secret_key("model.tokenizer_free_name")
    out = redact_mapping({"train.lr": 0.01, "db.password": "pw", "uri": "http://u:p4ss@h", "none": None})
    assert out == {"train.lr": "0.01", "db.password": MASK, "uri": f"http://{MASK}@h", "none": ""}


def test_one_line() -> None:
    assert one_line(ValueError("first http://a:b@h\nsecond")) == f"first http://{MASK}@h"
    assert one_line(KeyError()) == "KeyError"


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction()
    install_log_redaction()  # idempotent
    logger = logging.getLogger("some.library")
    with caplog.at_level(logging.INFO):
        logger.info("connecting to %s", "http://admin:topsecret99@server:5000")
        try:
            raise RuntimeError("token=abcdef123456")
        except RuntimeError:
            logger.exception("failed")
    text = caplog.text
    assert "topsecret99" not in text and "abcdef123456" not in text
    assert f"http://{MASK}@server:5000" in text
