"""Shared by the benchmarks: how much CPU other processes used while a timed call ran."""
from __future__ import annotations

import os


def others_cpu_seconds(skip_niced: bool = False) -> float:
    """CPU seconds run so far by every thread of every *other* process
    (/proc/*/task/*/schedstat, ns).

    Nanosecond resolution, unlike /proc/stat's 10 ms ticks, so single calls of ~20 ms can be
    judged. Threads that start and end between two reads are missed (an underestimate). With
    ``skip_niced``, processes at nice >= 10 are not counted: a study at nice 19 gets ~1.5 % of a
    core the timed call wants, so it does not slow the call down.
    """
    own = str(os.getpid())
    total = 0
    for proc in os.scandir("/proc"):
        if not proc.name.isdigit() or proc.name == own:
            continue
        try:
            if skip_niced:
                with open(f"/proc/{proc.name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[16]) >= 10:       # field 19: nice
                        continue
            for task in os.scandir(f"/proc/{proc.name}/task"):
                with open(f"/proc/{proc.name}/task/{task.name}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total * 1e-9
