"""Serving the symbol index: `retracer web` against a real `debuginfod -U` on the same packages, and the
worker's extraction from the index, cold and cached.

    python bench/symbols_serve.py [--mib M] [--requests K] [--rounds R]

Packages: the crashing program of retracer.testing.crashes packed by dpkg-deb into a .deb and .ddeb (a small
debug file, ~10 KiB), and a "big" .ddeb whose debug file is that program's unstripped build with an M MiB
section of random bytes added by objcopy (default 64 MiB; gzip -1, as random bytes do not compress). Both are
imported into a fresh SQLite file with `retracer symbols import`, served by `retracer web` on a loopback port,
and indexed by ``debuginfod -U -t0 -g0 -d :memory:`` in ``unshare --net`` (queried from inside its namespace
by a Python client like ours, so both are timed the same way).

  1. small     K GET /buildid/ID/debuginfo of the small debug file (default 200), one at a time on a fresh
               connection each: p50 and p95 latency in ms, for retracer and debuginfod.
  2. big       R downloads (default 3) of the big debug file, read in 1 MiB chunks: MiB/s of the first and the
               median of all, for both (debuginfod keeps extracted files in its fdcache after the first).
               The bytes of the two are compared. retracer web's peak RSS (VmHWM) before and after the
               downloads: it streams, so the growth stays far below the file's size.
  3. worker    ``IndexSymbols.provide`` (what an embedded worker runs before gdb) for the big file: cold (the
               cache empty: extracted from the .ddeb, checked, renamed into the cache, linked) and warm (the
               cached copy linked), R rounds each, median seconds.

Progress goes to stderr; the figures to stdout, the last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from retracer import store
from retracer.symbols.index import find
from retracer.testing import crashes
from retracer.testing.packages import debug_member, make_packages
from retracer.worker.index_source import IndexSymbols, debug_path

RETRACER = [sys.executable, "-m", "retracer"]
#: Run inside debuginfod's network namespace: times K small requests, or R big downloads, of one URL.
CLIENT = """
import json, sys, time, urllib.request
url, count, chunk = sys.argv[1], int(sys.argv[2]), 1 << 20
times = []
size = 0
for _ in range(count):
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as response:
        size = 0
        while data := response.read(chunk):
            size += len(data)
    times.append(time.perf_counter() - started)
print(json.dumps({"times": times, "size": size}))
"""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed_gets(url: str, count: int, netns: str | None = None) -> tuple[list[float], int]:
    argv = [sys.executable, "-c", CLIENT, url, str(count)]
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", "--", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=True).stdout
    result = json.loads(out)
    return list(result["times"]), int(result["size"])


def fetch(url: str, netns: str | None = None) -> bytes:
    if netns is None:
        with urllib.request.urlopen(url, timeout=300) as response:  # noqa: S310  (our own loopback server)
            return bytes(response.read())
    code = "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())"
    return subprocess.run(["nsenter", f"--net={netns}", "--", sys.executable, "-c", code, url],
                          capture_output=True, timeout=600, check=True).stdout


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def big_ddeb(where: Path, mib: int) -> tuple[Path, str]:
    program = crashes.build(where / "big-build", name="bigdebug")
    pad = where / "pad.bin"
    with open(pad, "wb") as file:
        for _ in range(mib):
            file.write(os.urandom(1 << 20))
    root = where / "big-root"
    member = root / debug_member(program.build_id).lstrip("/")
    member.parent.mkdir(parents=True)
    crashes.run(["objcopy", "--add-section", f".retracer_pad={pad}", "--set-section-flags",
                 ".retracer_pad=readonly", str(program.unstripped), str(member)], where, "objcopy --add-section")
    pad.unlink()
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(
        "Package: bigdebug-dbgsym\nVersion: 1.0-1\nArchitecture: amd64\nMaintainer: Bench <b@example.invalid>\n"
        "Description: a big debug file\n", encoding="utf-8")
    for directory, _, _ in os.walk(root):
        os.chmod(directory, 0o755)  # noqa: S103 - dpkg-deb wants exactly this mode
    out = where / "pool" / "bigdebug-dbgsym_1.0-1_amd64.ddeb"
    crashes.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "-b", str(root), str(out)], where, "dpkg-deb")
    shutil.rmtree(root)
    return out, program.build_id


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_web(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([*RETRACER, "web", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            fetch(url + "/buildids/" + "00" * 20)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"retracer web did not start: {log.read_text()[-2000:]}")


def start_debuginfod(pool: Path, log: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port = 8002
    with open(log, "ab") as out:
        proc = subprocess.Popen(["unshare", "--net", "--", "sh", "-c",
                                 f"ip link set lo up && exec debuginfod -U -t 0 -g 0 -d :memory: -p {port} {pool}"],
                                stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", f"/proc/{proc.pid}/ns/net"


def wait_peer(url: str, netns: str, build_ids: list[str]) -> None:
    deadline = time.monotonic() + 120
    for build_id in build_ids:
        while True:
            try:
                fetch(f"{url}/buildid/{build_id}/debuginfo", netns)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise SystemExit("debuginfod did not index the packages") from None
                time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, Any] = {"big_mib": args.mib}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as temp:
        where = Path(temp)
        pool = where / "pool"
        pool.mkdir()
        say("building packages")
        small = make_packages(pool)
        _, big_id = big_ddeb(where, args.mib)
        data = where / "data"
        env = {**os.environ, "RETRACER__SERVICE__DATA_DIR": str(data),
               "RETRACER__DATABASE__URL": f"sqlite:///{data / 'retracer.db'}"}
        env.pop("RETRACER_CONFIG", None)
        data.mkdir()
        subprocess.run([*RETRACER, "db", "upgrade"], env=env, check=True, capture_output=True)
        subprocess.run([*RETRACER, "symbols", "import", str(pool)], env=env, check=True, capture_output=True)
        web, web_url = start_web(env, where / "web.log")
        peer, peer_url, netns = start_debuginfod(pool, where / "debuginfod.log")
        try:
            wait_peer(peer_url, netns, [small.build_id, big_id])
            say(f"small: {args.requests} requests each")
            for name, url, ns in (("retracer", web_url, None), ("debuginfod", peer_url, netns)):
                times, _ = timed_gets(f"{url}/buildid/{small.build_id}/debuginfo", args.requests, ns)
                figures[f"{name}_small_p50_ms"] = round(percentile(times, 0.5) * 1000, 2)
                figures[f"{name}_small_p95_ms"] = round(percentile(times, 0.95) * 1000, 2)
            say(f"big: {args.rounds} downloads of {args.mib} MiB each")
            rss_before = peak_rss_kib(web.pid)
            for name, url, ns in (("retracer", web_url, None), ("debuginfod", peer_url, netns)):
                times, size = timed_gets(f"{url}/buildid/{big_id}/debuginfo", args.rounds, ns)
                figures["big_bytes"] = size
                figures[f"{name}_big_first_mib_s"] = round(size / 2**20 / times[0], 1)
                figures[f"{name}_big_median_mib_s"] = round(size / 2**20 / statistics.median(times), 1)
            figures["web_peak_rss_growth_mib"] = round((peak_rss_kib(web.pid) - rss_before) / 1024, 1)
            figures["same_bytes"] = (fetch(f"{web_url}/buildid/{big_id}/debuginfo")
                                     == fetch(f"{peer_url}/buildid/{big_id}/debuginfo", netns))
        finally:
            for proc in (web, peer):
                proc.terminate()
                proc.wait(30)
        say("worker: extraction from the index")
        engine = store.make_engine(env["RETRACER__DATABASE__URL"])
        factory = store.session_factory(engine)
        with factory() as session:
            assert find(session, big_id, "debuginfo") is not None
        cold, warm = [], []
        for n in range(args.rounds):
            cache = where / f"cache-{n}"
            index = IndexSymbols(factory, cache, 1 << 40)
            started = time.perf_counter()
            index.provide([big_id], where / f"cold-{n}")
            cold.append(time.perf_counter() - started)
            assert debug_path(where / f"cold-{n}", big_id).stat().st_size > args.mib << 20
            started = time.perf_counter()
            index.provide([big_id], where / f"warm-{n}")
            warm.append(time.perf_counter() - started)
            shutil.rmtree(cache)
        engine.dispose()
        figures["worker_cold_s"] = round(statistics.median(cold), 3)
        figures["worker_warm_s"] = round(statistics.median(warm), 4)
    for key, value in figures.items():
        print(f"{key:32} {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
