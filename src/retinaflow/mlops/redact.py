"""Keep secrets (AWS keys, tokens, passwords in URIs) out of logs, MLflow params, tags and error messages.

Three layers:

- :func:`redact` masks secrets inside free text: the user-info part of URIs (``https://user:pw@host``),
  ``key=value`` pairs whose key names a secret (``X-Amz-Signature=``, ``password=``, ``token=`` ...),
  ``Authorization:`` headers, AWS access-key ids, and the literal values of the secret environment
  variables of :data:`SECRET_ENV_VARS` wherever they appear.
- :func:`redact_mapping` also masks whole values whose *key* names a secret (``aws_secret_access_key``).
- :func:`install_log_redaction` routes every log record of the process (ours, mlflow's, botocore's)
  through :func:`redact` before any handler sees it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

#: Environment variables whose values are secrets: masked wherever their literal value shows up.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "DATABRICKS_TOKEN",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "HF_TOKEN",
)
_MIN_LITERAL = 6  # shorter env values are not masked literally: they would garble ordinary words

_SECRET_WORDS = (
    r"secret|passwd|password|pwd|token|credential|api[_-]?key|apikey|access[_-]?key(?:[_-]?id)?"
    r"|private[_-]?key|session[_-]?key|signature|x-amz-signature|x-amz-credential|x-amz-security-token"
    r"|awsaccesskeyid"
)
_SECRET_KEY_RE = re.compile(rf"(?i)(?:^|[._\-/])(?:{_SECRET_WORDS}|auth|authorization)(?:$|[._\-/])")
_URI_USERINFO_RE = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<info>[^/\s@]+)@")
_KV_RE = re.compile(
    rf"(?i)(?P<key>\b[\w.\-]*(?:{_SECRET_WORDS})[\w.\-]*)(?P<sep>\"?'?\s*[:=]\s*\"?'?)(?P<value>[^\s\"',;&)}}\]]+)"
)
_AUTH_HEADER_RE = re.compile(
    r"(?i)(?P<key>authorization[\"']?\s*[:=]\s*[\"']?)(?P<value>(?:bearer |basic )?[^\s\"',]+)"
)
_AWS_KEY_ID_RE = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b")


def _literal_secrets() -> list[str]:
    values = [os.environ.get(name, "") for name in SECRET_ENV_VARS]
    return sorted({v for v in values if len(v) >= _MIN_LITERAL}, key=len, reverse=True)


def redact(text: str) -> str:
    """Return ``text`` with every recognisable secret replaced by ``***``.

    >>> redact("http://bob:hunter22@mlflow:5000/api?token=abc&x=1")
    'http://***@mlflow:5000/api?token=***&x=1'
    """
    if not text:
        return text
    for literal in _literal_secrets():
        text = text.replace(literal, MASK)
    text = _URI_USERINFO_RE.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _AUTH_HEADER_RE.sub(lambda m: f"{m.group('key')}{MASK}", text)
    text = _KV_RE.sub(lambda m: f"{m.group('key')}{m.group('sep')}{MASK}", text)
    return _AWS_KEY_ID_RE.sub(MASK, text)


def is_secret_key(key: str) -> bool:
    """True when a parameter/tag/config key names a secret (``aws.secret_access_key``, ``api_key``...)."""
    return bool(_SECRET_KEY_RE.search(f".{key}."))


def redact_mapping(values: Mapping[str, Any]) -> dict[str, str]:
    """Stringify and redact a flat mapping: secret-named keys get ``***``, other values go through
    :func:`redact`. Use it on every dict of params or tags before it leaves the process."""
    out: dict[str, str] = {}
    for key, value in values.items():
        text = "" if value is None else str(value)
        out[key] = MASK if (text and is_secret_key(key)) else redact(text)
    return out


class _RedactingFactory:
    """LogRecord factory wrapper: formats each record once, redacted, before handlers see it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it for logging's own error handling
            return record
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record


def install_log_redaction() -> None:
    """Redact every log record of this process (idempotent). Call once at CLI/component start-up."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(factory))


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), redacted."""
    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__)
