"""What a run folder (``edkm compress --out``) remembers between invocations, and the checks of ``--resume``.

``settings.json`` holds the settings that decide the result (model, data, bits, steps, lr, ...);
``--resume`` with different ones is refused with one line naming the first difference as a flag.
``--memory`` is not compared: every memory mode gives the same values and gradients, so switching
mode on resume (e.g. after running out of memory) is allowed. When a run completes, its training
checkpoints are deleted (``--keep-checkpoints`` keeps them): the report and the packed model are
the result, and ``--resume`` of a finished run prints its report again without recomputing.

Example:
    >>> first_difference({"plan": {"bits": 3}, "train": {"steps": 300}}, {"plan": {"bits": 4}, "train": {"steps": 300}})
    "--bits 4 differs from the checkpoint's 3"
    >>> resume_command(["compress", "--steps", "20"])
    'edkm compress --steps 20 --resume'
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODEL_FILE = "model.edkm.safetensors"  # the packed model of a run folder
SETTINGS_FILE = "settings.json"
CHECKPOINTS = ("checkpoint_fp.pt", "checkpoint_fp.dcp", "checkpoint_edkm.pt", "checkpoint_edkm.dcp")  # .dcp: a sharded (--fsdp) folder
NOT_COMPARED = {"plan.memory", "train.progress", "train.checkpoint_every", "plan.format_version"}
FLAGS = {
    "model": "--model", "text": "--text", "alpaca": "--alpaca", "context": "--context", "holdout": "--holdout",
    "plan.bits": "--bits", "plan.group_size": "--group-size", "plan.tau": "--tau", "plan.iters": "--iters",
    "plan.overrides": "--embed-bits", "train.steps": "--steps", "train.batch_size": "--batch-size",
    "train.grad_accum": "--grad-accum", "train.lr": "--lr", "train.tau_start": "--tau", "train.tau_end": "--tau-end",
    "train.seed": "--seed", "fp_control": "--no-fp-control", "control_lr": "--control-lr", "distill": "--distill",
}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("plan", "train"):
            out.update(_flatten(value, name + "."))
        elif name not in NOT_COMPARED:
            out[name] = value
    return out


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """'--FLAG new differs from the checkpoint's old' for the first differing setting, else None."""
    old, new = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))  # tuples as lists
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            show = lambda v: "none" if v is None else json.dumps(v) if isinstance(v, (dict, list)) else str(v)  # noqa: E731
            return f"{FLAGS.get(key, key)} {show(new.get(key))} differs from the checkpoint's {show(old.get(key))}"
    return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (a killed run never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def check_resume(out: Path, settings: dict[str, Any], resume: bool, write: bool = True) -> str:
    """Compare ``settings`` with the run in ``out``; returns "fresh", "resume" or "complete".

    Raises ValueError naming the first difference when resuming with other settings. A fresh start
    (no ``--resume``, or nothing to resume) deletes the folder's old checkpoints and progress and writes
    ``settings`` when ``write`` (rank 0).
    """
    path = out / SETTINGS_FILE
    saved = json.loads(path.read_text()) if path.is_file() else None
    has_state = any((out / name).exists() for name in (*CHECKPOINTS, "progress.json"))
    if resume and saved is not None and (has_state or (out / "report.json").is_file()):
        diff = first_difference(saved, settings)
        if diff:
            raise ValueError(f"--resume: {diff} ({path}); drop --resume to start over, or use another --out")
        return "complete" if (out / "report.json").is_file() and is_complete(out) else "resume"
    if resume and has_state:  # a run from before settings.json existed: nothing to compare, resume as asked
        if write:
            write_json(path, settings)
        return "resume"
    if write:  # a fresh start: nothing of an earlier run in this folder may be resumed later
        for name in (*CHECKPOINTS, "progress.json"):
            remove(out / name)
        write_json(path, settings)
    return "fresh"


def is_complete(out: Path) -> bool:
    """True when the run in ``out`` finished (its progress.json says so)."""
    progress = out / "progress.json"
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


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues an interrupted ``edkm`` run."""
    args = list(argv)
    return shlex.join(["edkm", *args, *([] if "--resume" in args else ["--resume"])])


__all__ = ["CHECKPOINTS", "MODEL_FILE", "SETTINGS_FILE", "check_resume", "first_difference", "is_complete", "prune_checkpoints",
           "resume_command", "write_json"]
