"""This process's resident memory, read from /proc (Linux; ``ru_maxrss`` for the peak elsewhere).

The peak (``VmHWM``) can be reset to the current resident set (:func:`reset_peak_rss`), so a phase of a job or
one row of a benchmark reads a peak of its own.

    >>> reset_peak_rss() in (True, False) and peak_rss_bytes() > 0
    True
"""

from __future__ import annotations

import sys


def proc_kib(path: str, name: str) -> int | None:
    """The kiB value on line ``name:`` of a /proc file such as /proc/self/status (None if missing)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    kib = proc_kib("/proc/self/status", "VmHWM")
    if kib is None:
        # deferred: resource is POSIX-only, and the CLI parser imports this module on every platform
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru if sys.platform == "darwin" else ru * 1024
    return kib * 1024


def rss_bytes() -> int | None:
    """The current resident set size of this process (None without /proc)."""
    kib = proc_kib("/proc/self/status", "VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> bool:
    """Return the allocator's free memory to the system (glibc ``malloc_trim``), so that the next phase's peak
    starts from what is in use; False where there is no glibc.

    Why by hand: no library exposes it; freed heap memory otherwise stays resident and a later peak reads low.
    """
    try:
        # deferred: ctypes and the C library only where a benchmark asks
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
