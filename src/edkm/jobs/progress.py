"""Progress of a long job on stderr: numbered phases, one bar (or a line every 30 s when stderr is
not a terminal) per phase, and the ETA of the whole job, not only of the current phase.

The job's phases get estimated costs up front (any unit, e.g. seconds on a reference machine);
the overall ETA is the cost still ahead times the pace: the current phase's own (seconds per unit of cost since
its first update, once that spans ``PHASE_PACE_AFTER_S``), else the job's so far (elapsed over cost done), so it
corrects itself for a faster or slower machine as soon as work is measured, and a phase slowed by another job
(or units restored by --resume at no cost, or a first step's warm-up) does not mislead the rest. ``measured`` holds each
finished phase's wall seconds and peak resident memory.

Example:
    >>> import io
    >>> job = JobProgress({"baselines": 1.0, "train": 3.0}, stream=io.StringIO())
    >>> with job.phase("baselines", total=2, unit="eval") as bar:
    ...     bar.update(note="fp ppl 5.53")
    ...     bar.update()
    >>> print(job.stream.getvalue().splitlines()[0])
    [1/2] baselines (2 evals)
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TextIO

from tqdm.auto import tqdm

from edkm.rss import peak_rss_bytes, reset_peak_rss

LINE_EVERY_S = 30.0  # a plain progress line at most this often when stderr is not a terminal
PHASE_PACE_AFTER_S = 20.0  # the current phase's pace replaces the job's once measured over this long


def clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) of a duration.

    >>> clock(75.4), clock(3725)
    ('1:15', '1:02:05')
    """
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class PhaseBar:
    """The progress of one phase: ``update`` after each unit of work (with loss or a note)."""

    def __init__(
        self, job: JobProgress, index: int, name: str, total: int, unit: str, shares: Sequence[float] | None = None
    ) -> None:
        self.job, self.name, self.total, self.unit = job, name, max(1, total), unit
        if shares is not None and len(shares) != total:
            raise ValueError(f"{len(shares)} shares for the {total} {unit}s of phase {name!r}")
        self.shares = list(shares) if shares is not None and sum(shares) > 0 else None
        self.label = f"[{index}/{len(job.costs)}] {name}"
        self.done, self.start = 0, time.perf_counter()
        self.last_line = self.start
        self.first: tuple[float, float] | None = None  # (time, fraction) at the first update: the pace starts there
        self.bar: Any = None
        if job.enabled and job.is_tty:
            self.bar = tqdm(
                total=self.total, desc=self.label, unit=unit, file=job.stream, dynamic_ncols=True, leave=True
            )

    def update(self, n: int = 1, note: str | None = None, **values: Any) -> None:
        """Count ``n`` units done; ``values`` (e.g. ``loss_ce=2.31``) show beside the bar."""
        self.done += n
        fields = {
            **values,
            "phase": clock(time.perf_counter() - self.start),
            "job ETA": clock(self.job.eta(self.name, self.fraction(), self.pace())),
        }
        if self.bar is not None:
            if note:
                self.bar.write(f"{self.label}: {note}", file=self.job.stream)
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(n)
            return
        if not self.job.enabled:
            return
        now = time.perf_counter()
        if note or now - self.last_line >= LINE_EVERY_S or self.done == self.total:
            self.last_line = now
            shown = ", ".join(f"{k} {v}" for k, v in fields.items())
            self.job.print(
                f"{self.label}: {self.done}/{self.total} {self.unit}s{': ' + note if note else ''} ({shown})"
            )

    def fraction(self) -> float:
        """The share of the phase's cost done: units done over all, each unit weighted by its share if given.

        >>> bar = PhaseBar(JobProgress({"p": 1.0}, enabled=False), 1, "p", 3, "eval", shares=[1, 0, 3])
        >>> bar.done = 2
        >>> bar.fraction()
        0.25
        """
        if self.shares is None:
            return self.done / self.total
        return sum(self.shares[: self.done]) / sum(self.shares)

    def pace(self) -> float | None:
        """Seconds per unit of the job's cost in this phase since its first update (None until measured over
        ``PHASE_PACE_AFTER_S``): the first update's lump (restored units, a first step's warm-up) is left out."""
        now, fraction = time.perf_counter(), self.fraction()
        if self.first is None:
            self.first = (now, fraction)
            return None
        cost = self.job.costs.get(self.name, 0.0) * (fraction - self.first[1])
        if now - self.first[0] < PHASE_PACE_AFTER_S or cost <= 0:
            return None
        return (now - self.first[0]) / cost

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class JobProgress:
    """Numbered phases with estimated ``costs`` (phase name -> cost, in order); output to ``stream``
    (default stderr), nothing at all when ``enabled`` is False."""

    def __init__(self, costs: Mapping[str, float], enabled: bool = True, stream: TextIO | None = None) -> None:
        self.costs = dict(costs)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.finished: set[str] = set()
        self.measured: dict[str, dict[str, float]] = {}  # phase -> wall seconds and this process's peak RSS
        self.recent_pace: float | None = None  # the pace of the last phase that measured one (PhaseBar.pace)

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def eta(self, current: str | None = None, fraction: float = 0.0, pace: float | None = None) -> float:
        """Seconds left for the whole job: the cost ahead times ``pace`` (seconds per unit of cost; default the
        job's so far, elapsed over cost done; 0 if nothing is done yet)."""
        done = sum(c for name, c in self.costs.items() if name in self.finished)
        if current is not None:
            done += self.costs.get(current, 0.0) * min(1.0, fraction)
        ahead = sum(self.costs.values()) - done
        if pace is None:
            pace = self.recent_pace
        if pace is None:
            pace = (time.perf_counter() - self.start) / done if done > 0 else 0.0
        return pace * ahead

    @contextlib.contextmanager
    def phase(
        self, name: str, total: int, unit: str = "step", detail: str = "", shares: Sequence[float] | None = None
    ) -> Iterator[PhaseBar]:
        """A phase of ``total`` units; prints its start and, at the end, its time and the job's.

        ``shares``: the relative cost of each unit, where units differ (the ETA counts a unit done by its share).
        """
        if name not in self.costs:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(self.costs)}")
        index = list(self.costs).index(name) + 1
        self.print(f"[{index}/{len(self.costs)}] {name} ({total} {unit}s{', ' + detail if detail else ''})")
        bar = PhaseBar(self, index, name, total, unit, shares)
        exact_peak = reset_peak_rss()  # the phase's own peak (Linux), else the process's so far
        try:
            yield bar
        finally:
            bar.close()
        self.recent_pace = bar.pace() or self.recent_pace
        self.finished.add(name)
        seconds = time.perf_counter() - bar.start
        self.measured[name] = {
            "seconds": round(seconds, 1),
            ("peak_rss_bytes" if exact_peak else "process_peak_rss_bytes"): peak_rss_bytes(),
        }
        elapsed = time.perf_counter() - self.start
        left = f", about {clock(self.eta())} left" if len(self.finished) < len(self.costs) else ""
        self.print(f"{bar.label} done in {clock(seconds)} (job: {clock(elapsed)} so far{left})")

    def skip(self, name: str, reason: str) -> None:
        """Mark a phase done without work (e.g. restored by --resume)."""
        index = list(self.costs).index(name) + 1
        self.costs[name] = 0.0
        self.finished.add(name)
        self.print(f"[{index}/{len(self.costs)}] {name}: {reason}")


__all__ = ["JobProgress", "PhaseBar", "clock", "LINE_EVERY_S", "PHASE_PACE_AFTER_S"]
