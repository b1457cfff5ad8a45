"""A real S3 endpoint for tests: moto's server as a subprocess on 127.0.0.1, with IAM enforced.

moto authenticates requests once ``INITIAL_NO_AUTH_ACTION_COUNT`` requests have been served: the
first three create an IAM user, its access key and an allow-all policy; every request after that
must be signed with that key, so wrong credentials really fail (SignatureDoesNotMatch).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MotoServer:
    url: str
    process: subprocess.Popen[bytes]
    access_key: str
    secret_key: str

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
        )

    def env(self, secret_key: str | None = None) -> dict[str, str]:
        """What an engine needs to read s3:// from this endpoint (nothing read from ~/.aws)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def oss_env(self) -> dict[str, str]:
        return {
            "OSS_ENDPOINT": self.url,
            "OSS_ACCESS_KEY_ID": self.access_key,
            "OSS_ACCESS_KEY_SECRET": self.secret_key,
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def upload_dir(self, bucket: str, prefix: str, folder: Path) -> int:
        """Create ``bucket`` if needed and upload every file under ``folder`` to ``prefix/``."""
        s3 = self.client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
        count = 0
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                key = (
                    f"{prefix}/{path.relative_to(folder).as_posix()}"
                    if prefix
                    else path.relative_to(folder).as_posix()
                )
                s3.upload_file(str(path), bucket, key)
                count += 1
        return count

    def delete_bucket(self, bucket: str) -> None:
        s3 = self.client()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=item["Key"])
        s3.delete_bucket(Bucket=bucket)


@contextlib.contextmanager
def moto_server() -> Iterator[MotoServer]:
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with {process.returncode}")
            try:
                httpx.get(f"{url}/moto-api/", timeout=0.5)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start in 30 s") from None
                time.sleep(0.05)
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="elastiserve-tests")
        key = iam.create_access_key(UserName="elastiserve-tests")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="elastiserve-tests", PolicyName="all", PolicyDocument=json.dumps(policy))
        yield MotoServer(url, process, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def file_server(
    folder: Path, handler: type[http.server.BaseHTTPRequestHandler] | None = None
) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 in a thread; yields the base URL."""

    def make(*args: Any, **kwargs: Any) -> http.server.BaseHTTPRequestHandler:
        return (handler or _QuietHandler)(*args, directory=str(folder), **kwargs)  # type: ignore[call-arg]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
