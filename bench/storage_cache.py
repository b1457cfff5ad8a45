#!/usr/bin/env python3
"""Repository cache: a warm hit against a cold download (issue 5: warm must cost < 10% of cold).

A 50 MB model repository (random, incompressible bytes in 4 models and 12 files) is uploaded to
moto's S3 server on 127.0.0.1 (the test endpoint). Then, each ``--runs`` times:

* cold: a new, empty cache folder and a new :class:`RepositoryCache` (new boto3 client): list +
  download + verify + publish — what the first engine on a machine pays;
* warm: the same cache folder, again a new cache object and client — what a restart or a second
  instance on the machine pays (list + compare, nothing downloaded);
* poll: the same cache object again (client reused) — what each poll-mode tick pays;
* fresh process: cold and warm once more, each in a new Python process (the sync call timed
  inside it, after ``import elastiserve.storage.s3``, whose import time is reported apart).

Medians are reported, and warm/cold as the figure of merit.

  python bench/storage_cache.py [--size-mb 50] [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from elastiserve.storage import RepositoryCache  # noqa: E402
from tests.storage.moto_support import moto_server  # noqa: E402

BUCKET = "bench-models"


def make_repository(root: Path, size_mb: int) -> int:
    """4 models: one holds half the bytes, three share the rest; a config per model. Returns bytes."""
    total = size_mb * 1_000_000
    shares = [total // 2] + [total // 6] * 3
    written = 0
    for index, size in enumerate(shares):
        model = root / f"model_{index}"
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt").write_text(f'name: "model_{index}"\nbackend: "onnxruntime"\n')
        (model / "1" / "weights.bin").write_bytes(os.urandom(size))
        (model / "1" / "labels.txt").write_text("\n".join(str(i) for i in range(100)))
        written += size
    return written


CHILD = """
import json, sys, time
t0 = time.perf_counter()
import elastiserve.storage.s3
from elastiserve.storage import RepositoryCache
t1 = time.perf_counter()
result = RepositoryCache(sys.argv[1]).sync(sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "sync_s": t2 - t1, "downloaded": result.downloaded_bytes}))
"""


def in_fresh_process(cache_dir: Path, uri: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(cache_dir), uri],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, moto_server() as moto:
        os.environ.update(moto.env())
        repo = Path(tmp) / "repo"
        size = make_repository(repo, args.size_mb)
        files = moto.upload_dir(BUCKET, "models", repo)
        uri = f"s3://{BUCKET}/models"
        cold, warm, poll = [], [], []
        warm_dir = Path(tmp) / "warm-cache"
        RepositoryCache(warm_dir).sync(uri)  # fill the warm cache once
        for run in range(args.runs):
            cold_dir = Path(tmp) / f"cold-{run}"

            def cold_sync(cold_dir: Path = cold_dir) -> None:
                result = RepositoryCache(cold_dir).sync(uri)
                assert result.downloaded_bytes >= size

            cold.append(timed(cold_sync))

            def warm_sync() -> None:
                result = RepositoryCache(warm_dir).sync(uri)
                assert result.downloaded_bytes == 0 and not result.changed

            warm.append(timed(warm_sync))
        cache = RepositoryCache(warm_dir)
        cache.sync(uri)
        for _ in range(args.runs):
            poll.append(timed(lambda: cache.sync(uri)))
        fresh_cold, fresh_warm, imports = [], [], []
        for run in range(args.runs):
            child = in_fresh_process(Path(tmp) / f"fresh-cold-{run}", uri)
            assert child["downloaded"] >= size
            fresh_cold.append(child["sync_s"])
            imports.append(child["import_s"])
            child = in_fresh_process(warm_dir, uri)
            assert child["downloaded"] == 0
            fresh_warm.append(child["sync_s"])
            imports.append(child["import_s"])
    results = {
        "repository_mb": size / 1e6,
        "files": files,
        "runs": args.runs,
        "cold_s": statistics.median(cold),
        "warm_s": statistics.median(warm),
        "poll_s": statistics.median(poll),
        "fresh_process_cold_s": statistics.median(fresh_cold),
        "fresh_process_warm_s": statistics.median(fresh_warm),
        "import_s": statistics.median(imports),
        "cold_all_s": [round(x, 4) for x in cold],
        "warm_all_s": [round(x, 4) for x in warm],
    }
    results["warm_over_cold"] = results["warm_s"] / results["cold_s"]
    print(f"repository: {results['repository_mb']:.1f} MB in {files} objects on moto S3 (127.0.0.1)")
    print(f"cold download (new cache, new client):   median {results['cold_s'] * 1000:8.1f} ms")
    print(f"warm hit (same cache, new client):       median {results['warm_s'] * 1000:8.1f} ms")
    print(f"poll tick (same cache, client reused):   median {results['poll_s'] * 1000:8.1f} ms")
    print(
        f"fresh process: cold {results['fresh_process_cold_s'] * 1000:.1f} ms, warm "
        f"{results['fresh_process_warm_s'] * 1000:.1f} ms "
        f"({100 * results['fresh_process_warm_s'] / results['fresh_process_cold_s']:.1f}%), "
        f"plus {results['import_s'] * 1000:.0f} ms to import the storage modules in either case"
    )
    verdict = "ok" if results["warm_over_cold"] < 0.10 else "OVER the 10% budget"
    print(f"warm / cold = {100 * results['warm_over_cold']:.1f}% ({verdict})")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
