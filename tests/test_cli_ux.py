"""The first hour with edkm: fast --help, validation before loading, honest progress, clean Ctrl-C,
--resume checks, run folders for eval/generate, size presets, report metadata (issue 13)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from edkm.cli.main import build_parser, main
from edkm.models import BUNDLED_MODEL_DIR, BUNDLED_TEXT

TINY = ["--context", "32", "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1"]


def run_cli(*args, env=None, timeout=300):
    env = {**os.environ, **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "edkm", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(BUNDLED_TEXT.read_text()[:12_000])
    return path


@pytest.fixture(scope="module")
def run(small_text, tmp_path_factory):
    """A finished run started with --resume on an empty folder, progress on, OMP_NUM_THREADS unset."""
    out = tmp_path_factory.mktemp("run")
    res = run_cli(
        "compress",
        "--text",
        str(small_text),
        "--out",
        str(out),
        *TINY,
        "--resume",
        env={"OMP_NUM_THREADS": None, "MKL_NUM_THREADS": None},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


# ------------------------------------------------------------------ conventions, parse-time checks
def test_help_and_version_import_no_torch():
    code = (
        "import sys; from edkm.cli.main import build_parser; build_parser(); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == "edkm 0.1.0"


@pytest.mark.parametrize("command", ["compress", "eval", "generate", "size", "bench memory"])
def test_every_option_has_help_and_shows_its_default(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command.split()[0]]
    if " " in command:
        sub = sub._subparsers._group_actions[0].choices[command.split()[1]]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no help"
            if action.default is not None and action.default is not False:
                assert "default" in formatter._get_help_string(action), action.option_strings[0]
    assert "(default: " in sub.format_help()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compress", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
        (["compress", "--distill", "1.5"], "--distill: must be a number from 0 to 1"),
        (["generate", "x", "--temperature", "-1"], "--temperature: must be a number >= 0"),
        (["size", "llama-2-7b", "--group-size", "0"], "--group-size: must be an integer >= 1"),
    ],
)
def test_bad_numbers_fail_at_parse_time_in_one_line(argv, message):
    res = run_cli(*argv, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compress", "--text", "/nonexistent.txt"], "--text /nonexistent.txt: no such file"),
        (["compress", "--batch-size", "6", "--grad-accum", "4"], "divisible by --grad-accum"),
        (["compress", "--context", "100000"], "exceeds the model's context"),
        (["compress", "--model", "/tmp"], "no config.json"),
        (["compress", "--group-size", "7"], "group_size 7 does not divide"),
        (["compress", "--memory", "bogus"], "unknown memory mode"),
        (["eval", str(BUNDLED_MODEL_DIR), "--holdout", "0.2", "--tasks", "piqa"], "--holdout needs --text"),
        (["eval", str(BUNDLED_MODEL_DIR), "--tasks", "piqa,nope"], "unknown task(s) nope"),
    ],
)
def test_inputs_checked_before_the_model_loads(argv, message, tmp_path, capsys, monkeypatch):
    import edkm.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(edkm.models, "load_causal_lm", no_load)
    monkeypatch.setattr("edkm.jobs.compress.load_causal_lm", no_load)
    with pytest.raises(SystemExit):
        main([*argv, *(["--out", str(tmp_path)] if argv[0] == "compress" else [])])
    assert message in capsys.readouterr().err


def test_job_eta_scales_the_cost_ahead_by_the_pace_so_far():
    import io

    from edkm.jobs.progress import JobProgress

    job = JobProgress({"a": 1.0, "b": 3.0}, stream=io.StringIO())
    job.start -= 10.0  # 10 s elapsed
    assert job.eta() == 0.0  # nothing done yet: no estimate
    assert job.eta("a", 0.5) == pytest.approx(10.0 * 3.5 / 0.5, rel=0.01)
    job.finished.add("a")
    assert job.eta() == pytest.approx(30.0, rel=0.01)
    with job.phase("b", total=2) as bar:
        bar.update(loss_ce="2.0")  # not a terminal: a line at most every 30 s, and at the end
        bar.update(loss_ce="1.9")
    lines = job.stream.getvalue().splitlines()
    assert lines[0] == "[2/2] b (2 steps)"
    assert lines[1].startswith("[2/2] b: 2/2 steps (loss_ce 1.9, phase 0:00, job ETA")
    assert len(lines) == 3 and lines[2].startswith("[2/2] b done in")


def test_bench_writes_to_a_run_folder_by_default():
    from edkm.bench.configs import BenchOptions

    args = build_parser().parse_args(["bench", "memory", "--shape", "1024", "1024"])
    assert args.out.startswith("runs/bench/") and not BenchOptions().out.startswith("benchmarks/results")


# ------------------------------------------------------------------ the job: progress, resume, report
def test_job_eta_takes_the_current_phase_pace_after_its_first_update():
    """A slow phase before (another job on the cores) or units restored by --resume do not skew the ETA."""
    import io

    from edkm.jobs.progress import JobProgress

    job = JobProgress({"a": 1.0, "b": 3.0, "c": 1.0}, stream=io.StringIO())
    job.start -= 100.0  # phase a took 100 s for 1 unit of cost
    job.finished.add("a")
    with job.phase("b", total=10) as bar:
        bar.update(5)  # restored from a checkpoint: no time spent on them
        assert bar.pace() is None  # the pace starts at the first update
        bar.first = (bar.first[0] - 30.0, bar.first[1])  # 30 s later, one more unit (0.3 of the cost)
        bar.done = 6
        assert bar.pace() == pytest.approx(100.0, rel=0.01)
        bar.done = 8  # three units (0.9 of the cost) in those 30 s
        assert bar.pace() == pytest.approx(100 / 3, rel=0.01)
        assert job.eta("b", bar.fraction(), bar.pace()) == pytest.approx(100 / 3 * (3 * 0.2 + 1), rel=0.01)
        bar.done = 10
    assert job.recent_pace == pytest.approx(20.0, rel=0.01) and job.eta() == pytest.approx(20.0, rel=0.01)


def test_progress_labels_each_phase_with_job_eta_and_named_losses(run):
    _, res = run
    err = res.stderr
    for label in ("[1/5] baselines", "[2/5] fp control", "[3/5] eDKM", "[4/5] export", "[5/5] evaluation"):
        assert f"{label} done in" in err, label
    assert "fp32 original ppl" in err and "k-means 3-bit ppl" in err and "eDKM ppl" in err  # no silent phases
    assert "loss CE" in err and "loss KL(teacher||model)" in err and "job ETA" in err
    assert "--resume: no checkpoint in" in err and "starting fresh" in err
    assert "[1/5]" not in res.stdout  # progress on stderr, the table on stdout
    assert "| eDKM 3-bit per tensor, fine-tuned |" in res.stdout


def test_report_carries_versions_threads_and_gap(run):
    out, _ = run
    report = json.loads((out / "report.json").read_text())
    env = report["environment"]
    assert env["edkm_version"] == "0.1.0" and env["torch_version"].startswith("2.")
    assert env["torch_threads"] == 1 and env["omp_num_threads_env"] is None  # tiny model: one thread by default
    assert env["timestamp_utc"].endswith("+00:00") and env["device"] == "cpu"
    assert report["gap_to_control"] == pytest.approx(report["edkm_ppl"] / report["fp_finetuned_ppl"] - 1)
    assert report["loss"] == "KL(teacher||model)" and report["fp_loss"] == "CE"


def test_finished_run_keeps_no_checkpoints_and_resume_reprints(run, small_text):
    out, _ = run
    assert not list(out.glob("checkpoint_*.pt"))
    res = run_cli("compress", "--text", str(small_text), "--out", str(out), *TINY, "--resume", "--memory", "plain")
    assert res.returncode == 0 and "finished run" in res.stderr and "eDKM 3-bit" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--bits", "4", "--bits 4 differs from the checkpoint's 3"),
        ("--steps", "3", "--steps 3 differs from the checkpoint's 2"),
        ("--model", str(BUNDLED_MODEL_DIR), "--model"),
    ],
)
def test_resume_with_other_settings_is_refused_in_one_line(run, small_text, flag, value, message, capsys):
    out, _ = run
    args = dict(zip(TINY[::2], TINY[1::2]), **{flag: value})
    with pytest.raises(SystemExit):
        main(
            [
                "compress",
                "--text",
                str(small_text),
                "--out",
                str(out),
                "--resume",
                *[x for kv in args.items() for x in kv],
            ]
        )
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_ctrl_c_prints_the_resume_command(small_text, tmp_path):
    args = [
        "compress",
        "--text",
        str(small_text),
        "--out",
        str(tmp_path),
        "--context",
        "32",
        "--steps",
        "500",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "1",
        "--quiet",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edkm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # a background pytest ignores SIGINT
    try:
        deadline = time.time() + 600
        while not (tmp_path / "checkpoint_fp.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a 500-step job behind
    lines = [line for line in err.splitlines() if line.strip() and "torchao" not in line and "pytree" not in line]
    assert (tmp_path / "checkpoint_fp.pt").exists(), "no checkpoint before the deadline"
    assert proc.returncode == 130 and "Traceback" not in err and "[1/5]" not in err, err[-2000:]  # --quiet: no progress
    assert lines[-1].startswith("edkm compress: interrupted; continue with: edkm compress ")
    assert lines[-1].endswith("--quiet --resume")


# ------------------------------------------------------------------ eval / generate / size
def test_eval_and_generate_find_the_model_in_a_run_folder(run, capsys):
    out, _ = run
    main(["eval", str(out), "--tasks", "boolq,openbookqa,social_i_qa", "--limit", "3"])
    tasks = json.loads(capsys.readouterr().out)["tasks"]
    assert all(tasks[t]["n"] == 3 for t in ("boolq", "openbookqa", "social_i_qa"))
    assert tasks["boolq"]["acc_norm"] is None and tasks["openbookqa"]["acc_norm"] is not None
    main(["generate", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_bench_zeroshot_scores_every_model_of_the_run_and_resumes(run, tmp_path, capsys):
    out, _ = run
    result = tmp_path / "zeroshot.json"
    argv = ["bench", "zeroshot", str(out), "--tasks", "piqa,winogrande", "--limit", "3", "--out", str(result)]
    main(argv)
    doc = json.loads(result.read_text())
    models = doc["models"]
    assert list(models)[0] == "original" and list(models)[-1] == "edkm"
    assert {"rtn", "kmeans", "gptq", "squeeze"} <= set(models)
    assert all(m["tasks"]["piqa"]["n"] == 3 and 0 <= m["average"] <= 1 for m in models.values())
    assert models["edkm"]["bits_per_weight"]["3"] > 3 and "bits_per_weight" not in models["original"]
    capsys.readouterr()
    main(argv)  # everything is there: nothing rescored
    assert capsys.readouterr().out == "" and json.loads(result.read_text()) == doc


def test_bench_zeroshot_models_scores_only_the_named_models_and_refuses_unknown_ones(run, tmp_path, capsys):
    out, _ = run
    result = tmp_path / "zeroshot.json"
    argv = ["bench", "zeroshot", str(out), "--tasks", "piqa", "--limit", "2", "--out", str(result)]
    main([*argv, "--models", "edkm"])
    assert list(json.loads(result.read_text())["models"]) == ["edkm"]
    with pytest.raises(SystemExit):
        main([*argv, "--models", "edkm,gptq_g64"])
    assert "holds no model gptq_g64" in capsys.readouterr().err


def test_packed_model_without_tokenizer_needs_tokenizer_flag(run, tmp_path, capsys):
    out, _ = run
    import edkm

    edkm.save_palettized(edkm.load_palettized(out), tmp_path / "m.safetensors")  # a packed file alone
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path / "m.safetensors"), "--max-new-tokens", "2"])
    assert "pass --tokenizer" in capsys.readouterr().err
    main(["generate", str(tmp_path / "m.safetensors"), "--tokenizer", str(out), "--max-new-tokens", "2"])
    assert capsys.readouterr().out


@pytest.mark.parametrize(
    "preset,params",
    [
        ("llama-2-7b", 6_738_415_616),
        ("llama-2-13b", 13_015_864_320),
        ("llama-2-70b", 68_976_648_192),
        ("llama-3-8b", 8_030_261_248),
        ("mistral-7b", 7_241_732_096),
        ("qwen2-7b", 7_615_616_512),
    ],
)
def test_size_presets_match_published_parameter_counts(preset, params):
    from edkm.config import PalettizeConfig
    from edkm.jobs.size import load_config, meta_model, palettized_size

    assert palettized_size(meta_model(load_config(preset)), PalettizeConfig())["params"] == params


def test_size_readable_units_and_group_size_checked(capsys):
    main(["size", str(BUNDLED_MODEL_DIR)])
    out = capsys.readouterr().out
    assert "260.0 K" in out and "KiB" in out and "0.00 GiB" not in out
    with pytest.raises(SystemExit):
        main(["size", str(BUNDLED_MODEL_DIR), "--group-size", "7"])
    assert "does not divide" in capsys.readouterr().err


def test_run_folder_states(tmp_path):
    from edkm.jobs.runstate import check_resume

    (tmp_path / "checkpoint_edkm.pt").write_bytes(b"x")  # a run from before settings.json: resumed, not cleared
    assert check_resume(tmp_path, {"plan": {"bits": 3}}, resume=True) == "resume"
    assert (tmp_path / "checkpoint_edkm.pt").exists()
    with pytest.raises(ValueError, match="plan.bits 4 differs from the checkpoint's 3"):
        check_resume(tmp_path, {"plan": {"bits": 4}}, resume=True)
    assert check_resume(tmp_path, {"plan": {"bits": 4}}, resume=False) == "fresh"  # starting over clears the old state
    assert not (tmp_path / "checkpoint_edkm.pt").exists()
    assert check_resume(tmp_path, {"plan": {"bits": 4}}, resume=True) == "fresh"  # nothing to resume


def test_eval_text_replaces_the_test_split_and_teacher_original_trains_no_control(small_text, tmp_path):
    out = tmp_path / "run"
    res = run_cli("compress", "--text", str(small_text), "--out", str(out), *TINY, "--memory", "plain", "--quiet",
                  "--teacher", "original", "--eval-text", str(small_text), "--eval-context", "16",
                  "--eval-tokens", "200")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["eval_split"] == "small.txt: 200 tokens, windows of 16" and report["heldout_tokens"] == 199
    assert report["fp_finetuned_ppl"] is None and not report["fp_losses"]  # the original model was the teacher


def test_teacher_control_needs_the_control(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--teacher", "control", "--no-fp-control", "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert "--teacher control needs the fp control" in err and len(err.splitlines()) == 1


def test_synthetic_data_is_the_models_own_cached_and_reused(small_text, tmp_path):
    out = tmp_path / "run"
    args = ("compress", "--text", str(small_text), "--out", str(out), *TINY, "--memory", "plain", "--quiet",
            "--no-fp-control", "--synthetic", "8")  # fmt: skip
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    seqs = torch.load(out / "synthetic.pt", weights_only=True)
    assert seqs.shape == (8, 33) and seqs.dtype == torch.int64
    first = json.loads((out / "report.json").read_text())["losses"]
    (out / "report.json").unlink()
    (out / "progress.json").unlink()
    assert run_cli(*args, "--resume").returncode == 0  # the cached sequences, not new ones
    assert torch.equal(torch.load(out / "synthetic.pt", weights_only=True), seqs)
    assert json.loads((out / "report.json").read_text())["losses"] == first


def test_warm_start_defaults_to_activation_aware_for_a_given_model_and_is_a_resume_setting(tmp_path):
    from edkm.cli.compress import compress_config

    def cfg(*argv):
        return compress_config(build_parser().parse_args(["compress", *argv]), BUNDLED_MODEL_DIR, "cpu")

    assert cfg().warm_start == "kmeans" and "warm_start" not in cfg().settings()  # the committed bundled results
    given = cfg("--model", str(BUNDLED_MODEL_DIR.resolve()) + "/")
    assert given.warm_start == "kmeans"  # the bundled folder, named by its path, is still the bundled model
    other = tmp_path / "m"
    shutil.copytree(BUNDLED_MODEL_DIR, other)
    assert cfg("--model", str(other)).settings()["warm_start"] == "activation"
    assert cfg("--model", str(other), "--warm-start", "kmeans").warm_start == "kmeans"
    assert cfg("--model", str(other), "--warm-start", "fisher").settings()["warm_start"] == "fisher"
    assert cfg("--model", "smollm2-135m").settings()["model"] == "smollm2-135m"  # a name stays a name


def test_group_size_groups_the_decoder_layers_and_leaves_the_8bit_embedding_one_lut():
    from edkm.cli.compress import compress_config

    def plan(*argv):
        return compress_config(build_parser().parse_args(["compress", *argv]), BUNDLED_MODEL_DIR, "cpu").plan

    grouped = plan("--group-size", "4")
    assert grouped.for_module("model.layers.0.mlp.up_proj").group_size == 4
    assert grouped.for_module("model.embed_tokens").group_size is None
    assert grouped.for_module("lm_head").bits == 8 and grouped.for_module("lm_head").group_size is None
    assert plan("--group-size", "4", "--embed-bits", "0").for_module("model.embed_tokens").group_size == 4
