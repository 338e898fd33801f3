"""What a run folder (``edkm compress --out``) remembers between invocations, and the checks of ``--resume``.

``settings.json`` holds the settings that decide the result (model, data, bits, steps, lr, ...);
``--resume`` with different ones is refused with one line naming the first difference
(:class:`ResumeMismatch`; the command line names the setting by its flag).
``--memory`` is not compared: every memory mode gives the same values and gradients, so switching
mode on resume (e.g. after running out of memory) is allowed. When a run completes, its training
checkpoints are deleted (``--keep-checkpoints`` keeps them): the report and the packed model are
the result, and ``--resume`` of a finished run prints its report again without recomputing.

Example:
    >>> first_difference({"plan": {"bits": 3}, "train": {"steps": 300}}, {"plan": {"bits": 4}, "train": {"steps": 300}})
    ('plan.bits', 4, 3)
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edkm.atomic import write_json
from edkm.export.files import CHECKPOINTS, PROGRESS_FILE, REPORT_FILE, SETTINGS_FILE
from edkm.ranks import rank_world

NOT_COMPARED = {"plan.memory", "memory", "train.progress", "train.checkpoint_every", "plan.format_version"}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("plan", "train"):
            out.update(_flatten(value, name + "."))
        elif name not in NOT_COMPARED:
            out[name] = value
    return out


class ResumeMismatch(ValueError):
    """``--resume`` of a run folder whose saved settings differ from this run's: names the first difference.

    ``key`` is the setting's dotted name (``plan.bits``); the command line names it by its flag instead.
    """

    def __init__(self, key: str, new: Any, old: Any, path: Path) -> None:
        self.key, self.new, self.old, self.path = key, show(new), show(old), path
        super().__init__(self.describe(key))

    def describe(self, name: str) -> str:
        return (
            f"--resume: {name} {self.new} differs from the checkpoint's {self.old} ({self.path}); "
            "drop --resume to start over, or use another --out"
        )


def show(value: Any) -> str:
    """A setting's value as a message shows it."""
    return "none" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """(key, new value, saved value) of the first differing setting, else None."""
    old, new = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))  # tuples as lists
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return key, new.get(key), old.get(key)
    return None


def check_resume(out: Path, settings: dict[str, Any], resume: bool, write: bool = True) -> str:
    """Compare ``settings`` with the run in ``out``; returns "fresh", "resume" or "complete".

    Raises ValueError naming the first difference when resuming with other settings. A fresh start
    (no ``--resume``, or nothing to resume) deletes the folder's old checkpoints and progress and writes
    ``settings`` when ``write`` (rank 0).
    """
    path = out / SETTINGS_FILE
    saved = json.loads(path.read_text()) if path.is_file() else None
    has_state = any((out / name).exists() for name in (*CHECKPOINTS, PROGRESS_FILE))
    if resume and saved is not None and (has_state or (out / REPORT_FILE).is_file()):
        diff = first_difference(saved, settings)
        if diff:
            raise ResumeMismatch(*diff, path)
        return "complete" if (out / REPORT_FILE).is_file() and is_complete(out) else "resume"
    if resume and has_state:  # a run from before settings.json existed: nothing to compare, resume as asked
        if write:
            write_json(path, settings)
        return "resume"
    if write:  # a fresh start: nothing of an earlier run in this folder may be resumed later
        for name in (*CHECKPOINTS, PROGRESS_FILE):
            remove(out / name)
        write_json(path, settings)
    return "fresh"


def is_complete(out: Path) -> bool:
    """True when the run in ``out`` finished (its progress.json says so)."""
    progress = out / PROGRESS_FILE
    return progress.is_file() and json.loads(progress.read_text()).get("complete", False)


def prune_checkpoints(out: Path) -> int:
    """Delete the training checkpoints of a finished run; returns the bytes freed."""
    freed = 0
    for name in CHECKPOINTS:
        freed += remove(out / name)
    return freed


def remove(path: Path) -> int:
    """Delete a file or a folder (a sharded checkpoint) if it exists; returns the bytes freed."""
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path)
        return size
    if path.is_file():
        size = path.stat().st_size
        path.unlink()
        return size
    return 0


@dataclass
class Run:
    """One invocation of the job: where it writes, which rank it is, what earlier invocations finished."""

    cfg: Any  # the job's config (CompressConfig): its out, resume and settings()
    out: Path
    rank: int
    size: int
    state: str  # "fresh", "resume" or "complete" (edkm.jobs.runstate.check_resume)
    done: dict[str, Any]  # results of finished phases (progress.json)
    job: Any = None  # JobProgress, once the model and data are known
    ppl: Any = None  # perplexity on the test split, once the data are known

    def record(self, **values: Any) -> None:
        """Keep phase results in progress.json (rank 0), so a resumed run skips the phase."""
        self.done.update(values)
        if self.rank == 0:
            write_json(self.out / PROGRESS_FILE, self.done)

    def keep_phase_times(self) -> None:
        """Keep the wall seconds and peak RSS of the phases run so far in progress.json (a phase that resumed
        keeps the figures of its last invocation; one restored whole keeps its first)."""
        self.record(phases={**self.done.get("phases", {}), **self.job.measured})

    def say(self, line: str) -> None:
        if self.rank == 0:  # even with --quiet
            print(line, file=sys.stderr, flush=True)


def open_run(cfg: Any) -> Run:
    """The run folder's state after the --resume checks (settings compared, old state cleared on a fresh start)."""
    rank, size = rank_world()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = check_resume(out, cfg.settings(), cfg.resume, write=rank == 0)
    progress = out / PROGRESS_FILE
    done = json.loads(progress.read_text()) if state == "resume" and progress.is_file() else {}
    return Run(cfg, out, rank, size, state, done)


__all__ = ["ResumeMismatch", "Run", "check_resume", "first_difference", "is_complete", "open_run", "prune_checkpoints"]
