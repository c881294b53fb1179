"""Shared by the benchmarks: how much CPU other processes used while a timed call ran, and the
peak memory of a measuring process."""
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


def peak_rss_mib() -> float:
    """This process's peak resident set so far (VmHWM of /proc/self/status), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident set (Linux >= 4.0: write 5 to clear_refs), so that a
    later :func:`peak_rss_mib` measures the peak from here on (e.g. after XLA has compiled).
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
