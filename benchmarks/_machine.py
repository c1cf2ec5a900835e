"""What the benchmarks print about the machine they ran on (imported by the scripts beside it)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Self


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (as ``lscpu`` prints it), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def memory_total_bytes() -> int:
    """This machine's physical memory (``MemTotal`` of /proc/meminfo), in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def load_average() -> float:
    """The 1-minute load average (what else ran on the machine while a benchmark did)."""
    import os

    return os.getloadavg()[0]


class MemoryCage:
    """A memory cgroup for one child process tree: a hard limit on its resident memory and its measured peak.

    "Does not fit in this machine's memory" is measured by running the child in a cgroup whose limit is the
    machine's physical memory (``memory_total_bytes()``): past the limit the kernel kills the child (exit status
    -9, counted in ``oom_kill``) instead of letting it push the rest of the machine out of memory, and the child is
    the first victim of a machine-wide shortage too (``oom_score_adj`` 1000). Works with cgroup v1 (the ``memory``
    controller) and v2, as root; ``MemoryCage.available()`` says whether this machine allows it.

    ``peak_bytes`` is the cgroup's high-water mark of resident memory of every process in it (page cache of files
    the child wrote included); ``peak_anon_bytes`` the largest anonymous (heap) memory sampled every 50 ms.
    """

    ROOT_V1 = Path("/sys/fs/cgroup/memory")
    ROOT_V2 = Path("/sys/fs/cgroup")

    def __init__(self, name: str, limit_bytes: int) -> None:
        import os

        self.limit_bytes = int(limit_bytes)
        self.v1 = (self.ROOT_V1 / "memory.limit_in_bytes").is_file()
        root = self.ROOT_V1 if self.v1 else self.ROOT_V2
        self.path = root / f"medseg-bench-{name}-{os.getpid()}"

    @classmethod
    def available(cls) -> bool:
        import os

        if os.geteuid() != 0:
            return False
        return (cls.ROOT_V1 / "memory.limit_in_bytes").is_file() or (cls.ROOT_V2 / "cgroup.controllers").is_file()

    def __enter__(self) -> Self:
        self.path.mkdir()
        if self.v1:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        else:
            (self.path / "memory.max").write_text(str(self.limit_bytes))
            (self.path / "memory.swap.max").write_text("0")
        return self

    def __exit__(self, *exc: object) -> None:
        import time

        for _ in range(50):  # the killed processes take a moment to leave the group
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` behind a shell that joins the cgroup, makes itself the first OOM victim, then execs it."""
        script = f'echo $$ > "{self.path}/cgroup.procs" && echo 1000 > /proc/self/oom_score_adj && exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *cmd]

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def anon_bytes(self) -> int:
        stat = dict(line.split() for line in self._read("memory.stat").splitlines() if line.count(" ") == 1)
        return int(stat.get("rss" if self.v1 else "anon", 0))

    @property
    def peak_bytes(self) -> int:
        text = self._read("memory.max_usage_in_bytes" if self.v1 else "memory.peak").strip()
        return int(text) if text else 0

    @property
    def oom_kills(self) -> int:
        text = self._read("memory.oom_control" if self.v1 else "memory.events")
        for line in text.splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def run(self, cmd: list[str], *, env: dict | None = None, stdout=None, timeout_s: float | None = None,
            cwd: str | Path | None = None) -> dict:
        """Run ``cmd`` in the cage; returns exit code, wall seconds, peaks (bytes) and whether it was OOM-killed."""
        import subprocess
        import time

        t0 = time.perf_counter()
        proc = subprocess.Popen(self.wrap(cmd), env=env, stdout=stdout,
                                stderr=subprocess.STDOUT if stdout else None, cwd=cwd)
        peak_anon = 0
        while proc.poll() is None:
            peak_anon = max(peak_anon, self.anon_bytes())
            if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                proc.kill()
            time.sleep(0.05)
        return {"exit_code": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_bytes": self.peak_bytes,
                "peak_anon_bytes": peak_anon, "oom_killed": self.oom_kills > 0, "limit_bytes": self.limit_bytes}
