"""Import and export against ``docker load`` and ``docker save`` of the same image, side by side.

    .venv/bin/python -m bench.image [--gib 2] [--runs 3] [--out docs/bench/image.md]

As root: starts a private dockerd (own containerd, data root and sockets
in a temporary directory), builds an image of one multi-GiB layer (a few
large files and thousands of small ones) with ``docker import``, saves it,
then times, run by run and with the page cache dropped before each step:

- ``docker load`` of the archive (dockerd's peak RSS growth, VmHWM) against
  ``ovlfuse import`` of it into a fresh store (the process's peak RSS);
- ``docker save`` of the image against ``ovlfuse export --tag`` of it
  from dockerd's own store.

Writes its own section, docs/bench/image.md (linked from docs/benchmarks.md).
Every daemon is ended by its PID and every directory removed, even on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "bench" / "image.md"
DOCKERD, CONTAINERD, DOCKER = "/usr/sbin/dockerd", "/usr/bin/containerd", "/usr/bin/docker"
OVLFUSE = [sys.executable, "-m", "ovlfuse"]


def log(msg: str) -> None:
    print(f"[bench.image {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Dockerd:
    """A private containerd and dockerd (overlay2) in ``base``, ended by PID."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        sock = base / "containerd.sock"
        config = base / "containerd.toml"
        config.write_text(f'version = 2\nroot = "{base}/ctr-root"\nstate = "{base}/ctr-state"\n'
                          'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                          f'[grpc]\n  address = "{sock}"\n'
                          f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{base}/ctr-opt"\n')
        (base / "daemon.json").write_text(json.dumps({"deprecated-key-path": f"{base}/key.json"}))
        self.env = {"PATH": os.environ["PATH"], "HOME": str(base), "DOCKER_HOST": f"unix://{base}/docker.sock",
                    "DOCKER_CONFIG": str(base / "client")}
        self.procs: list[subprocess.Popen] = []
        log_file = open(base / "daemons.log", "w")
        self.procs.append(subprocess.Popen([CONTAINERD, "--config", str(config)], stdout=log_file,
                                           stderr=log_file, start_new_session=True))
        self._wait(lambda: sock.exists())
        self.procs.append(subprocess.Popen(
            [DOCKERD, "--storage-driver=overlay2", "--iptables=false", "--ip-masq=false", "--bridge=none",
             f"--data-root={self.data}", f"--exec-root={base}/exec", f"--pidfile={base}/docker.pid",
             f"--containerd={sock}", "-H", self.env["DOCKER_HOST"], f"--config-file={base}/daemon.json"],
            stdout=log_file, stderr=log_file, start_new_session=True))
        self._wait(lambda: subprocess.run([DOCKER, "version"], capture_output=True, env=self.env).returncode == 0)

    def _wait(self, ready) -> None:
        deadline = time.monotonic() + 60
        while not ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"daemons did not start: {(self.base / 'daemons.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def __call__(self, *args: str) -> str:
        done = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=self.env, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    @property
    def pid(self) -> int:
        return self.procs[1].pid

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _hwm_reset(pid: int) -> int:
    """Reset a process's peak RSS (VmHWM) to its current RSS; returns the current RSS in bytes."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5\n")
    return _status(pid, "VmRSS")


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def _timed_child(argv: list[str]) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of one command."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
    return elapsed, usage.ru_maxrss * 1024


def _timed_docker(docker: Dockerd, *args: str) -> tuple[float, int]:
    """Seconds of a docker command and dockerd's peak RSS growth during it (the work is dockerd's)."""
    base = _hwm_reset(docker.pid)
    start = time.monotonic()
    docker(*args)
    elapsed = time.monotonic() - start
    return elapsed, max(0, _status(docker.pid, "VmHWM") - base)


def _rootfs(path: Path, gib: float) -> int:
    """A tarball of a few large files (``gib`` GiB together) and 20,000 small ones; returns its content bytes."""
    rng = random.Random(1)
    big = int(gib * (1 << 30))
    files = 4
    chunk = rng.randbytes(1 << 20)
    total = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for i in range(files):
            size = big // files
            info = tarfile.TarInfo(f"data/big{i}")
            info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
            t.addfile(info, _Repeat(chunk, size, i))
            total += size
        for i in range(20_000):
            data = rng.randbytes(rng.randint(100, 8000))
            info = tarfile.TarInfo(f"usr/share/d{i // 500}/f{i}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            t.addfile(info, _Repeat(data, len(data), 0))
            total += len(data)
    return total


class _Repeat:
    """``size`` bytes of a repeated chunk, each repetition varied so nothing deduplicates."""

    def __init__(self, chunk: bytes, size: int, salt: int) -> None:
        self.chunk, self.left, self.salt, self.n = chunk, size, salt, 0

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        out = bytearray()
        while len(out) < n:
            piece = bytearray(self.chunk[: n - len(out)])
            piece[:16] = (self.n * 1000 + self.salt).to_bytes(16, "little")
            self.n += 1
            out += piece
        self.left -= n
        return bytes(out)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def run(gib: float, runs: int, tmpdir: str | None) -> dict:
    base = Path(tempfile.mkdtemp(prefix="ovlbench-image-", dir=tmpdir))
    docker = None
    try:
        log(f"building a {gib} GiB layer in {base}")
        content = _rootfs(base / "rootfs.tar", gib)
        docker = Dockerd(base)
        docker("import", str(base / "rootfs.tar"), "big:v1")
        (base / "rootfs.tar").unlink()
        archive = base / "saved.tar"
        docker("save", "-o", str(archive), "big:v1")
        results: dict[str, dict[str, list[float]]] = {k: {"s": [], "rss": []} for k in
                                                      ("docker load", "ovlfuse import", "docker save",
                                                       "ovlfuse export")}
        for n in range(runs):
            log(f"run {n + 1}/{runs}")
            docker("rmi", "big:v1")
            drop_caches()
            s, rss = _timed_docker(docker, "load", "-i", str(archive))
            results["docker load"]["s"].append(s)
            results["docker load"]["rss"].append(rss)
            store = base / f"store{n}"
            drop_caches()
            s, rss = _timed_child([*OVLFUSE, "import", "-q", "--docker-root", str(store), str(archive)])
            results["ovlfuse import"]["s"].append(s)
            results["ovlfuse import"]["rss"].append(rss)
            shutil.rmtree(store)
            out = base / "out.tar"
            drop_caches()
            s, rss = _timed_docker(docker, "save", "-o", str(out), "big:v1")
            results["docker save"]["s"].append(s)
            results["docker save"]["rss"].append(rss)
            out.unlink()
            drop_caches()
            s, rss = _timed_child([*OVLFUSE, "export", "-q", "--docker-root", str(docker.data), "big:v1",
                                   "--tag", "big:v2", "-O", str(out)])
            results["ovlfuse export"]["s"].append(s)
            results["ovlfuse export"]["rss"].append(rss)
            out.unlink()
        return {"gib": gib, "runs": runs, "content_bytes": content, "archive_bytes": archive.stat().st_size,
                "results": results, "docker": docker("version", "-f", "{{.Server.Version}}"),
                "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": f"{os.cpu_count()} cores, Linux {os.uname().release}",
                "loadavg": open("/proc/loadavg").read().split()[:3]}
    finally:
        if docker is not None:
            docker.close()
        subprocess.run(["umount", "-R", "-l", str(base / "data" / "overlay2")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def markdown(res: dict, command: str) -> str:
    mb = res["archive_bytes"] / 1e6
    lines = [
        "# Import and export against docker load and docker save",
        "",
        "Written by `python -m bench.image` (the text lives in `bench/image.py`); edit the generator, not this file.",
        "",
        f"- Command: `{command}`, {res['runs']} runs, medians with (min–max); started {res['started']}; "
        f"{res['machine']}; load average {' '.join(res['loadavg'])} at the end (other work on the machine "
        "inflates the numbers).",
        f"- The image: one layer of {res['content_bytes'] / (1 << 30):.2f} GiB (four large files and 20,000 small "
        f"ones, 100 B to 8 KB), made with `docker import`; its `docker save` archive is {mb:,.0f} MB. "
        f"dockerd {res['docker']}, overlay2 driver, on the same disk.",
        "- The page cache is dropped before each step. `docker load` and `docker save` do their work in "
        "dockerd, so their memory is dockerd's peak RSS growth during the call (VmHWM, reset before it); "
        "ovlfuse's is its process's peak RSS (`ru_maxrss`). `ovlfuse import` writes a fresh store each run "
        "(no layer to reuse); `ovlfuse export --tag` writes the whole image as a docker save archive from "
        "dockerd's own store.",
        "",
        "| step | seconds | MB/s of archive | peak memory MB | ovlfuse / docker time |",
        "|---|---|---|---|---|",
    ]
    res_ = res["results"]
    for ours, theirs in (("ovlfuse import", "docker load"), ("ovlfuse export", "docker save")):
        for name in (theirs, ours):
            s, rss = res_[name]["s"], res_[name]["rss"]
            ratio = f"{_median(s) / _median(res_[theirs]['s']):.2f}x" if name == ours else "—"
            lines.append(f"| `{name}` | {_median(s):.1f} ({min(s):.1f}–{max(s):.1f}) | {mb / _median(s):,.0f} | "
                         f"{_median(rss) / 1e6:,.0f} ({min(rss) / 1e6:,.0f}–{max(rss) / 1e6:,.0f}) | {ratio} |")
    lines += ["", "Raw numbers (seconds, bytes):", "", "```json", json.dumps(res_, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.image", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=2.0, help="size of the layer (default 2 GiB)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--tmpdir", help="where the image, the stores and the daemons' data go")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("must run as root (dockerd, drop_caches)")
    res = run(args.gib, args.runs, args.tmpdir)
    command = "python -m bench.image " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(res, command.strip()))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
