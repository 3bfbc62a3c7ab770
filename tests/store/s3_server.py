"""An S3-compatible server on localhost for the object-storage tests (moto's server mode).

:func:`serve` starts ``moto.server.ThreadedMotoServer`` on a free port of 127.0.0.1, points
fsspec's s3 configuration (and so ``s3fs``) at it, in this process and in the environment that
subprocesses inherit, and creates one bucket. Nothing leaves the machine.
"""

import contextlib
import logging
import os

BUCKET = "gradstore-test"
#: moto accepts any credentials; these are never sent anywhere else
CREDENTIALS = {"FSSPEC_S3_KEY": "testing", "FSSPEC_S3_SECRET": "testing", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def serve(monkeypatch):
    """Run the server; yield ``(endpoint, s3fs filesystem)`` with the bucket created."""
    import fsspec
    import fsspec.config
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {**CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": endpoint}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        # fsspec read FSSPEC_S3_* when it was imported: this process needs its configuration set too
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint, "key": "testing",
                                                       "secret": "testing"})
        fs = fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield endpoint, fs
    finally:
        server.stop()


def environment() -> dict:
    """The environment of a subprocess that talks to the server (inherits the test's settings)."""
    return dict(os.environ)
