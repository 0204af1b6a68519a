"""How many threads torch may use: ``--threads N``, else ``$LLMGEN_THREADS``, else the
cores nobody else is using right now.

torch's default is every core it may run on. On a machine busy with other work that
is the slow choice: its OpenMP workers wait for each other at every matrix product, and
a worker whose core is taken stalls them all. Measured on this project's 2-core machine
(GPT-2-124M shape, batch-1 greedy decode, tokens/s; README, Performance):

    machine           1 thread   2 threads
    idle                  21.4        34.4
    one core busy         22.8         8.9
    both cores busy       14.7         9.5

So the default counts the processes running this instant (``/proc/loadavg``'s fourth
field, the lowest of three looks, ourselves excluded) and leaves their cores to them.
The 1-minute load average is not used: it lags, and in a shell loop of llmgen runs it
would count the previous run as someone else.
"""

from __future__ import annotations

import os
import time

ENV = "LLMGEN_THREADS"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def others_running() -> int:
    """Runnable processes other than this one, the lowest of three looks 2 ms apart
    (0 where /proc/loadavg does not exist)."""
    counts = []
    for _ in range(3):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(running - 1)
        time.sleep(0.002)
    return max(0, min(counts))


def default_threads() -> int:
    cores = usable_cores()
    return max(1, min(cores, cores - others_running()))


def resolve(threads: int | None) -> int:
    """The flag, else ``$LLMGEN_THREADS`` (or OpenMP's ``$OMP_NUM_THREADS``), else the idle cores."""
    if threads is not None:
        return threads
    for name in (ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return default_threads()


def use(threads: int | None) -> int:
    """Set torch's intra-op threads; returns the number set."""
    import torch

    n = resolve(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
