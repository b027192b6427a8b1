"""Process control: spawn and kill servers, process trees, peak RSS, CPU ticks, waiting for a quiet machine."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

_live: list[subprocess.Popen] = []


def spawn(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None,
          append: bool = False) -> subprocess.Popen:
    """Start a process (a server, a compiler) in its own process group, output to `log`; `kill` or exit ends it."""
    with open(log, "ab" if append else "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    _live.append(proc)
    return proc


def kill(proc: subprocess.Popen) -> None:
    """End a process we started and its group: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
    else:  # the leader is gone; its group (e.g. a granian worker) may not be
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc in _live:
        _live.remove(proc)


def kill_all() -> None:
    """Kill every process started by `spawn` that is still running."""
    for proc in list(_live):
        try:
            kill(proc)
        except Exception:
            pass


atexit.register(kill_all)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    try:
        import psutil

        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except ImportError:
        pass
    except Exception:
        return [pid]
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo and len(out) < 10000:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def status_mib(pid: int, field: str) -> float | None:
    """A size of one process from /proc/PID/status, in MiB: `field` VmHWM (its peak resident set)
    or VmRSS (its resident set now). None if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mib(pid: int) -> float:
    """The resident memory now (VmRSS) of a process and its descendants, summed, in MiB."""
    return sum(status_mib(p, "VmRSS") or 0.0 for p in process_tree(pid))


def peak_rss(pid: int) -> dict:
    per = {}
    for p in process_tree(pid):
        mb = status_mib(p, "VmHWM")
        if mb is not None:
            try:
                name = Path(f"/proc/{p}/comm").read_text().strip()
            except OSError:
                name = "?"
            per[f"{p} {name}"] = round(mb, 1)
    return {"total_mb": round(sum(per.values()), 1), "processes": per}


def cpu_ticks(*pids: int | None) -> tuple[int, int]:
    """(busy clock ticks of the whole machine, ticks used by the process trees of `pids` and by this
    process, with the children it ran to the end: llama-batched-bench)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    busy = user + nice + system + irq + softirq + steal
    ours = 0
    for p in set([t for pid in pids if pid for t in process_tree(pid)] + [os.getpid()]):
        try:
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ours += sum(int(x) for x in stat[11:15])  # utime, stime, and those of its children that ended
        except (OSError, IndexError, ValueError):
            pass
    return busy, ours


def other_cpu_percent(before: tuple[int, int], after: tuple[int, int], seconds: float) -> float:
    """Share of the machine's CPU time used by processes other than the server and this script."""
    other = (after[0] - before[0]) - (after[1] - before[1])
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, other / hz / (seconds * (os.cpu_count() or 1)) * 100)


def wait_idle(max_wait: float) -> float:
    """Wait (at most max_wait s) until other processes use under 10% of the CPU over one second.
    Returns their share in the last second."""
    deadline, told, other = time.monotonic() + max_wait, False, 0.0
    while True:
        before, t0 = cpu_ticks(None), time.perf_counter()
        time.sleep(1.0)
        other = other_cpu_percent(before, cpu_ticks(None), time.perf_counter() - t0)
        if other < 10 or time.monotonic() >= deadline:
            if told:
                print(f"   ...{'idle' if other < 10 else 'still busy, going on'} ({other:.0f}% used by others)", flush=True)
            return other
        if not told:
            print(f"   other processes use {other:.0f}% of the CPU: waiting up to {max_wait:.0f} s for them", flush=True)
            told = True


QUIET = 10.0  # a run during which other processes used more than this % of the CPU is done again


def quiet_runs(fn, reps: int, first_index: int, pid: int | None, max_wait: float) -> list[dict]:
    """`reps` runs of fn(index) during which nothing else used the CPU (other processes' share
    recorded in each run): a disturbed run is kept (marked) but done again, at most reps + 3 times."""
    runs: list[dict] = []
    for attempt in range(2 * reps + 3):
        if sum(r["quiet"] for r in runs) >= reps:
            break
        before, t0 = cpu_ticks(pid), time.perf_counter()
        r = fn(first_index + attempt)
        r["other_cpu_pct"] = round(other_cpu_percent(before, cpu_ticks(pid), time.perf_counter() - t0), 1)
        r["quiet"] = r["other_cpu_pct"] < QUIET
        runs.append(r)
        if not r["quiet"]:
            wait_idle(max_wait)
    return runs


def until_quiet(fn, pids: list[int], max_wait: float, what: str) -> list[dict]:
    """fn(attempt) (a dict, other processes' CPU share recorded in it), done again (at most twice) if
    that share was >= QUIET. Returns every attempt; the last one is the one to use."""
    attempts: list[dict] = []
    for attempt in range(3):
        before, t0 = cpu_ticks(*pids), time.perf_counter()
        r = fn(attempt)
        r["other_cpu_pct"] = round(other_cpu_percent(before, cpu_ticks(*pids), time.perf_counter() - t0), 1)
        r["attempts"] = attempt + 1
        attempts.append(r)
        if r["other_cpu_pct"] < QUIET:
            break
        print(f"   ({what}: other processes used {r['other_cpu_pct']:.0f}% of the CPU; again)", flush=True)
        wait_idle(max_wait)
    return attempts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
