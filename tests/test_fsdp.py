"""FSDP2 with eDKM on real gloo processes: sharded DKM = DKM on the gathered weight, `compress --fsdp`
= one process, killed-and-resumed = uninterrupted (also on another process count), packed model equal."""

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from edkm.models import BUNDLED_TEXT

FAST = [
    "--context",
    "32",
    "--steps",
    "6",
    "--batch-size",
    "4",
    "--lr",
    "1e-3",
    "--quiet",
    "--no-fp-control",
    "--distill",
    "0",
    "--checkpoint-every",
    "1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(BUNDLED_TEXT.read_text()[:12_000])
    return path


def compress_cmd(procs: int, text, out, *extra: str, base: list[str] = FAST) -> list[str]:
    launch = [sys.executable, "-m", "edkm.cli.main"]
    if procs > 1:  # --standalone: torchrun picks a free port itself
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(procs),
            "-m",
            "edkm.cli.main",
        ]
    return [*launch, "compress", "--text", str(text), "--out", str(out), *base, *extra]


def run_compress(procs: int, text, out, *extra: str, base: list[str] = FAST) -> dict:
    res = subprocess.run(
        compress_cmd(procs, text, out, *extra, base=base), capture_output=True, text=True, timeout=900, env=ENV
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def assert_same_run(report: dict, ref: dict, out, ref_out, rel: float = 1e-4) -> None:
    import edkm

    assert len(report["losses"]) == len(ref["losses"])
    for a, b in zip(report["losses"], ref["losses"]):
        assert abs(a - b) <= rel * abs(b), (report["losses"], ref["losses"])
    model = edkm.load_palettized(out)  # the compress output is a Hugging Face folder (model.safetensors)
    expected = edkm.load_palettized(ref_out)
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(x).logits, expected(x).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.fixture(scope="module")
def single(small_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, run_compress(1, small_text, out)


# --- sharded DKM against DKM on the gathered weight -------------------------------------------------


def _sharded_worker(rank: int, world: int) -> dict:
    from edkm.distributed.sharded import GatherRows, local_rows, sharded_dkm
    from edkm.memory.fused import fused_dkm

    errors = {}
    torch.manual_seed(0)
    for rows, cols, groups, iters in (
        (37, 24, 1, 3),
        (64, 16, 4, 2),
        (3, 40, 1, 0),
    ):  # uneven rows, LUT groups, rows < ranks
        w0 = torch.randn(rows, cols).to(torch.bfloat16).float()
        c0 = torch.sort(torch.randn(groups, 8), dim=-1).values
        tau = torch.full((groups,), 0.05)
        g = torch.randn(rows, cols)
        w = w0.clone().requires_grad_()
        ref, c_ref = fused_dkm(w, c0, tau=tau, iters=iters)
        (ref * g).sum().backward()
        start, end = local_rows(rows, rank, world)
        mine = w0[start:end].clone().requires_grad_()
        local, c = sharded_dkm(mine, c0, tau=tau, iters=iters, row_offset=start, group_rows=rows // groups)
        full = GatherRows.apply(local, rows, None)
        (full * g).sum().backward()  # every rank the same g: the reduce-scatter average is g itself
        scale = w.grad.abs().max()
        grad_err = (mine.grad - w.grad[start:end]).abs()  # empty on a rank without rows
        errors[(rows, groups)] = (
            float((full - ref).abs().max()),
            float((c - c_ref).abs().max()),
            float(grad_err.max() / scale) if grad_err.numel() else 0.0,
        )
    return errors


def _sharded_child(rank: int, world: int, init_file: str) -> dict:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    return _sharded_worker(rank, world)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_dkm_equals_dkm_on_the_gathered_weight(world, launch_ranks):
    for res in launch_ranks(_sharded_child, world, timeout=120):
        for case, (value_err, centroid_err, grad_err) in res.items():
            assert value_err == 0 and centroid_err == 0, case  # same tables, same fp32 math: bit-identical
            assert grad_err <= 1e-5, case  # fp64 bucket sums in another order: float tolerance


def _regather_child(rank: int, world: int, init_file: str) -> dict:
    """One sharded clustered Linear: the gathered weight is not kept for backward, gradients unchanged."""
    import edkm
    from edkm.distributed.clustered import shard_clustered_weights_
    from edkm.memory import track_saved

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(96, 32, bias=False))
    x = torch.randn(5, 64)
    out = {}
    for regather in (False, True):
        model = edkm.palettize_(copy.deepcopy(base), edkm.PalettizeConfig(bits=3, tau=0.05))
        shard_clustered_weights_(model, mesh)
        for m in model.modules():
            if hasattr(m, "regather"):
                m.regather = regather
        with track_saved() as stats:
            y = model(x)
        y.square().sum().backward()
        out[regather] = (stats.device_bytes, [p.grad.to_local().clone() for p in model.parameters()], y.detach())
    (kept_all, grads_all, y_all), (kept_rows, grads_rows, y_rows) = out[False], out[True]
    return {
        "saved_drop": kept_all - kept_rows,
        "same_y": torch.equal(y_all, y_rows),
        "grad_err": max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads_all, grads_rows)),
    }


@pytest.mark.distributed
def test_sharded_layer_keeps_its_rows_not_the_gathered_weight(launch_ranks):
    for res in launch_ranks(_regather_child, 2, timeout=120):
        assert (
            res["same_y"] and res["grad_err"] <= 1e-6
        )  # gathered again in backward: same outputs, gradients to fp32 rounding
        # the second layer keeps half its fp32 W_hat (its rows), not all;
        # the first keeps none (its input needs no gradient)
        assert res["saved_drop"] == 32 * 96 * 4 / 2


# --- edkm compress --fsdp -----------------------------------------------------------------------------


@pytest.mark.distributed
def test_fsdp_two_processes_match_one(single, small_text, tmp_path):
    ref_out, ref = single
    report = run_compress(2, small_text, tmp_path, "--fsdp", "--keep-checkpoints")
    assert report["world_size"] == 2
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "checkpoint_edkm.dcp" / ".metadata").is_file()
    assert_same_run(report, ref, tmp_path, ref_out)


# the whole default job (fp control as the distillation teacher), 20 steps: tau anneals 100x, where fp32 sums drift
EXACT = [
    *FAST[: FAST.index("--no-fp-control")],
    "--distill",
    "1",
    "--fsdp",
    "--mixed-precision",
    "fp64",
    "--steps",
    "20",
]


@pytest.fixture(scope="module")
def single_fp64(small_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_fp64")
    report = run_compress(1, small_text, out, base=EXACT)  # one process: a process group of one
    assert report["world_size"] == 1 and report["fp_losses"] and report["distill"] == 1
    return out, report


@pytest.mark.distributed
def test_fsdp_fp64_two_processes_take_the_same_steps_as_one(single_fp64, small_text, tmp_path):
    ref_out, ref = single_fp64
    report = run_compress(2, small_text, tmp_path, base=EXACT)
    assert report["fp_losses"] == pytest.approx(ref["fp_losses"], rel=1e-6)  # the sharded fp control (the teacher)
    assert_same_run(report, ref, tmp_path, ref_out, rel=1e-6)  # fp32 loss sums differ in the last bits only
    assert report["edkm_ppl"] == pytest.approx(ref["edkm_ppl"], rel=1e-9)  # the same packed model


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_fp64_four_processes_take_the_same_steps_as_one(single_fp64, small_text, tmp_path):
    ref_out, ref = single_fp64
    report = run_compress(4, small_text, tmp_path, base=EXACT)
    assert_same_run(report, ref, tmp_path, ref_out, rel=1e-6)
    assert report["edkm_ppl"] == pytest.approx(ref["edkm_ppl"], rel=1e-9)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [["--fsdp"], ["--fsdp", "--fsdp-gathered-dkm"], ["--fsdp", "--activation-checkpointing"]]
)
def test_fsdp_four_processes_and_options_match_one(single, small_text, tmp_path, extra):
    ref_out, ref = single
    report = run_compress(4 if extra == ["--fsdp"] else 2, small_text, tmp_path, *extra)
    assert_same_run(report, ref, tmp_path, ref_out)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_trains(single, small_text, tmp_path):
    _, ref = single
    report = run_compress(2, small_text, tmp_path, "--fsdp", "--mixed-precision", "bf16")
    for a, b in zip(report["losses"], ref["losses"]):
        assert abs(a - b) <= 0.05 * abs(b)  # bf16 compute: close, not equal


def descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []
    return [c for child in children for c in (child, *descendants(child))]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process under it, and wait until none runs (torchrun starts each rank with
    ``start_new_session``, so killing its process group would leave the ranks training and checkpointing)."""
    pids = [pid, *descendants(pid)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    for p in pids:
        while os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] not in "ZX":
            time.sleep(0.01)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("resume_procs", [2, 4])
def test_fsdp_killed_and_resumed_gives_the_same_result(single_fp64, small_text, tmp_path, resume_procs):
    """Killed in the eDKM phase (after the sharded fp control), resumed on 2 or 4 processes: the same run."""
    ref_out, ref = single_fp64
    every = [*EXACT, "--checkpoint-every", "4"]
    proc = subprocess.Popen(
        compress_cmd(2, small_text, tmp_path, base=every),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        start_new_session=True,
    )
    ckpt = tmp_path / "checkpoint_edkm.dcp"
    deadline = time.time() + 600
    while not (ckpt / ".metadata").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(proc.pid)  # torchrun and both ranks (each rank runs in its own session)
    proc.wait()
    assert not (tmp_path / "report.json").exists(), "the run finished before it could be killed"
    resumed = run_compress(resume_procs, small_text, tmp_path, "--resume", base=every)
    assert resumed["world_size"] == resume_procs
    assert_same_run(resumed, ref, tmp_path, ref_out, rel=1e-6)
    assert resumed["edkm_ppl"] == pytest.approx(ref["edkm_ppl"], rel=1e-9)


def test_fsdp_without_palettize_or_process_group_is_a_clear_error():
    from edkm.distributed import fsdp_

    with pytest.raises(ValueError, match="palettize_"):
        fsdp_(torch.nn.Sequential(torch.nn.Linear(4, 4)))
