"""Shared service fixtures: each starts a real server on a free port and stops it afterwards."""

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (what s3fs's own suite uses); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
