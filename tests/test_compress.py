"""`edkm compress` end to end on the bundled model: report, reload, DDP with sharding, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edkm.cli.main import main
from edkm.models import BUNDLED_TEXT

FAST = ["--context", "32", "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--quiet"]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(BUNDLED_TEXT.read_text()[:12_000])
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "edkm.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        **kw,
    )


@pytest.fixture(scope="module")
def single(small_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    res = run_cli(
        "compress",
        "--text",
        str(small_text),
        "--out",
        str(out),
        "--memory",
        "marshal+unique",
        *FAST,
        "--keep-checkpoints",
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text())


def test_report_fields_and_eval_reproduces_exactly(single, small_text, capsys):
    out, report = single
    for key in (
        "fp_ppl",
        "fp_finetuned_ppl",
        "rtn_ppl",
        "kmeans_ptq_ppl",
        "edkm_ppl",
        "bits",
        "size_bytes",
        "fp_size_bytes",
        "steps",
        "seconds",
        "gptq_ppl",
        "gptq_bpw",
        "squeeze_ppl",
        "squeeze_bpw",
        "gptq_g128_ppl",
        "kmeans_aw_ppl",
        "kmeans_aw_bpw",
    ):
        assert report[key] is not None, key
    phases = report["phases"]
    assert list(phases) == ["baselines", "fp control", "eDKM", "export", "evaluation"]
    assert all(
        p["seconds"] >= 0 and p.get("peak_rss_bytes", p.get("process_peak_rss_bytes")) > 0 for p in phases.values()
    )
    assert report["bits"] == 3 and report["steps"] == 4 and len(report["losses"]) == 4
    assert report["size_bytes"] < report["fp_size_bytes"] / 2
    assert 3 < report["gptq_bpw"] < 4 and 3 < report["squeeze_bpw"] < 5  # scales / per-row LUTs counted
    main(["eval", str(out), "--text", str(small_text), "--holdout", "0.1", "--context", "32"])  # the test split
    assert json.loads(capsys.readouterr().out)["ppl"] == report["edkm_ppl"]


def test_output_folder_loads_with_plain_from_pretrained_after_import_edkm(single):
    out, report = single
    code = (
        "import sys, torch, edkm; assert 'transformers' not in sys.modules; "
        "from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); r = edkm.load_palettized({str(out)!r}); "
        "x = torch.arange(40).reshape(2, 20); assert torch.equal(m(x).logits, r(x).logits); print('same logits')"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("same logits"), res.stderr[-3000:]
    assert report["size_bytes"] == (out / "model.safetensors").stat().st_size
    assert "| eDKM 3-bit, fine-tuned 4 steps |" in (out / "README.md").read_text()


def test_control_and_edkm_train_at_their_own_learning_rates(single):
    import torch

    from edkm.training.loop import TrainConfig, lr_at

    out, report = single
    assert report["control_lr"] == 5e-4 and report["train"]["lr"] == 1e-3  # --lr 1e-3 in FAST, default --control-lr
    for name, peak in (("checkpoint_fp.pt", 5e-4), ("checkpoint_edkm.pt", 1e-3)):
        groups = torch.load(out / name, weights_only=False)["optimizer"]["param_groups"]
        assert groups[0]["lr"] == pytest.approx(lr_at(3, TrainConfig(steps=4, lr=peak)))


def test_zero_shot_eval_of_packed_model(single, capsys):
    out, _ = single
    main(["eval", str(out), "--tasks", "piqa,winogrande", "--limit", "4"])
    tasks = json.loads(capsys.readouterr().out)["tasks"]
    assert tasks["piqa"]["n"] == 4 and 0 <= tasks["piqa"]["acc"] <= 1 and 0 <= tasks["winogrande"]["acc"] <= 1


def test_generate_from_packed_model(single, capsys):
    out, _ = single
    main(["generate", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "8"])
    assert capsys.readouterr().out.startswith("Once upon a time")
    main(["generate", str(out), "--temperature", "0.8", "--max-new-tokens", "8"])
    assert capsys.readouterr().out.strip()


@pytest.mark.distributed
def test_two_process_ddp_with_sharding_matches_single(single, small_text, tmp_path):
    _, report = single
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "edkm.cli.main",
            "compress",
            "--text",
            str(small_text),
            "--out",
            str(tmp_path),
            "--memory",
            "marshal+unique+shard",
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = json.loads((tmp_path / "report.json").read_text())
    assert ddp["world_size"] == 2
    for a, b in zip(ddp["losses"], report["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert abs(ddp["edkm_ppl"] - report["edkm_ppl"]) <= 1e-4 * report["edkm_ppl"]


def test_kill_and_resume_ends_with_the_same_result(single, small_text, tmp_path):
    _, report = single
    args = [
        "compress",
        "--text",
        str(small_text),
        "--out",
        str(tmp_path),
        "--memory",
        "marshal+unique",
        *FAST,
        "--checkpoint-every",
        "1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edkm.cli.main", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ckpt = tmp_path / "checkpoint_edkm.pt"
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "report.json").exists(), "the run finished before it could be killed"
    res = run_cli(*args, "--resume", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = json.loads((tmp_path / "report.json").read_text())
    assert resumed["losses"] == report["losses"]
    assert resumed["edkm_ppl"] == report["edkm_ppl"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--text", "/nonexistent.txt"], "nonexistent"),
        (["--model", "/tmp"], "config.json"),
        (["--context", "100000"], "exceeds"),
    ],
)
def test_bad_input_clear_error(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--out", str(tmp_path), *FAST[2:], *args])
    assert message in capsys.readouterr().err


def test_bad_alpaca_and_empty_split(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "Say hi.", "input": "", "output": ""}, {"instruction": "x", "output": "y"}]')
    with pytest.raises(SystemExit):
        main(["compress", "--alpaca", str(bad), "--out", str(tmp_path), *FAST])
    assert "record 0" in capsys.readouterr().err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("One day.\n\nThe end.\n\nBye now.\n\nYes.")
    with pytest.raises(SystemExit):
        main(["compress", "--text", str(tiny), "--out", str(tmp_path), *FAST])
    assert "no complete sequence" in capsys.readouterr().err
