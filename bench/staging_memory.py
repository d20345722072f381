"""Peak memory of staging a large object through dptr's code, against moto's S3.

Starts moto's S3 in server mode on loopback, uploads an object of ``--size-mb`` (1 GiB
by default) of pseudo-random bytes, then in a fresh subprocess each:

* ``stage-in``: ``dptr_sidecar.staging.stage_in`` downloads it into INPUT1_STAGING_DIR
  (what the ``dptr-stage-in`` init container does);
* ``stage-out``: ``dptr_sidecar.staging.stage_out`` uploads the staged file back as an
  output (what the sidecar does after the task exits 0);

and prints each subprocess's peak resident memory (``VmHWM`` from /proc/self/status),
after checking the bytes arrived intact.  The sidecar's bar is 60 MB.

    .venv/bin/python bench/staging_memory.py [--size-mb 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BAR_MB = 60
CHILD = r"""
import json, os, sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from dptr_common.staging_plan import StagingPlan
from dptr_sidecar.s3 import S3Client
from dptr_sidecar.staging import stage_in, stage_out
mode, plan_json = sys.argv[1], sys.argv[2]
plan = StagingPlan.from_json(plan_json)
with S3Client() as s3:
    if mode == "stage-in":
        stage_in(plan, s3, log=lambda line: None)
    else:
        stage_out(plan, s3, log=lambda line: None)
status = Path("/proc/self/status").read_text()
hwm = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
print(json.dumps({"vmhwm_kb": int(hwm)}))
"""


def _chunks(size: int, digest: Any) -> Iterator[bytes]:
    """``size`` pseudo-random bytes in 1 MiB pieces, fed to ``digest`` as they go."""
    block = hashlib.sha256(b"dptr").digest() * (1024 * 1024 // 32)
    sent = counter = 0
    while sent < size:
        piece = (counter.to_bytes(8, "big") + block[8:])[: size - sent]
        digest.update(piece)
        sent += len(piece)
        counter += 1
        yield piece


def _run_child(mode: str, plan_json: str, env: dict[str, str]) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, plan_json], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["vmhwm_kb"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=1024, help="object size in MiB (default 1024)")
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024

    from moto.server import ThreadedMotoServer

    from dptr_common.staging_plan import StagedNode, StagingPlan
    from dptr_sidecar.s3 import S3Client, S3Uri

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and "proxy" not in k.lower()}
    env.update(
        {
            "AWS_ACCESS_KEY_ID": "AKIDBENCH",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
            "NO_PROXY": "127.0.0.1",
        }
    )
    try:
        with tempfile.TemporaryDirectory(prefix="dptr-bench-") as tmp, S3Client(env=env) as s3:
            s3._client.create_bucket(Bucket="bench")
            digest = hashlib.sha256()
            started = time.monotonic()
            s3.upload_stream(_chunks(size, digest), S3Uri("bench", "in/big.bin"))
            print(f"uploaded {args.size_mb} MiB to moto in {time.monotonic() - started:.1f}s")
            expected = digest.hexdigest()
            root = Path(tmp)
            plan = StagingPlan(
                pipeline_id="df-BENCH",
                nodes=(
                    StagedNode("input", 1, "In", str(root / "input1"), "s3://bench/in/big.bin", "file"),
                    StagedNode("output", 1, "Out", str(root / "input1"), "s3://bench/out", "directory"),
                ),
            )
            results: dict[str, int] = {}
            for mode in ("stage-in", "stage-out"):
                started = time.monotonic()
                results[mode] = _run_child(mode, plan.to_json(), env)
                print(f"{mode}: {time.monotonic() - started:.1f}s")
            staged = root / "input1" / "big.bin"
            got = hashlib.sha256()
            with staged.open("rb") as handle:
                for block in iter(lambda: handle.read(1024 * 1024), b""):
                    got.update(block)
            assert got.hexdigest() == expected, "staged file differs from the object"
            body = s3._client.get_object(Bucket="bench", Key="out/big.bin")["Body"]
            back = hashlib.sha256()
            for block in body.iter_chunks(1024 * 1024):
                back.update(block)
            assert back.hexdigest() == expected, "uploaded output differs from the staged file"
    finally:
        server.stop()
    worst = 0.0
    for mode, kb in results.items():
        mb = kb / 1024
        worst = max(worst, mb)
        print(f"{mode} of a {args.size_mb} MiB object: peak RSS (VmHWM) {mb:.1f} MB")
    verdict = "within" if worst <= BAR_MB else "ABOVE"
    print(f"peak {worst:.1f} MB, {verdict} the sidecar's {BAR_MB} MB bar")
    return 0 if worst <= BAR_MB else 1


if __name__ == "__main__":
    sys.exit(main())
