"""A process tree's memory from /proc/PID/smaps: RSS and PSS of each process, and of each class of
mapping (the model's weights, llama.cpp's buffers, the heaps, shared libraries)."""

from __future__ import annotations

from pathlib import Path

from bench.procs import process_tree

# An anonymous mapping this big is one of llama.cpp's buffers (the KV cache, the compute and
# output buffers: ggml allocates each with one large malloc, which glibc serves with mmap), or a
# thread's stack or malloc arena (8 and 64 MiB of address space, little of it resident). Python's
# own allocator takes 256 KiB arenas, glibc's heap grows [heap] or smaller mappings.
BIG_ANON = 4 * 2**20
CLASSES = ("model file", "big anonymous (llama.cpp buffers)", "[heap] and small anonymous", "shared libraries", "other")


def mapping_class(path: str, size: int, model: Path) -> str:
    if path == str(model):
        return CLASSES[0]
    if not path or path.startswith("[anon"):
        return CLASSES[1] if size >= BIG_ANON else CLASSES[2]
    if path == "[heap]":
        return CLASSES[2]
    if ".so" in Path(path).name:
        return CLASSES[3]
    return CLASSES[4]


def process_memory(pid: int, model: Path) -> dict:
    """One process's RSS and PSS (MiB), in total and by class of mapping."""
    by_class = {c: {"rss_mib": 0.0, "pss_mib": 0.0} for c in CLASSES}
    path, size, cls = "", 0, CLASSES[4]
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            start, end = (int(x, 16) for x in fields[0].split("-"))
            path, size = (line.split(None, 5)[5].strip() if len(fields) >= 6 else ""), end - start
            cls = mapping_class(path, size, model)
        elif fields[0] in ("Rss:", "Pss:"):
            by_class[cls][fields[0][:-1].lower() + "_mib"] += int(fields[1]) / 1024
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    return {"pid": pid, "name": comm, "rss_mib": sum(c["rss_mib"] for c in by_class.values()),
            "pss_mib": sum(c["pss_mib"] for c in by_class.values()), "by_class": by_class}


def tree_memory(pid: int, model: Path) -> dict:
    """Every process of the tree (process_memory), and the sums over the tree."""
    procs = []
    for p in process_tree(pid):
        try:
            procs.append(process_memory(p, model))
        except (OSError, ValueError):
            pass  # ended meanwhile
    total = {c: {k: sum(p["by_class"][c][k] for p in procs) for k in ("rss_mib", "pss_mib")} for c in CLASSES}
    return {"processes": procs, "rss_mib": sum(p["rss_mib"] for p in procs),
            "pss_mib": sum(p["pss_mib"] for p in procs), "by_class": total}
