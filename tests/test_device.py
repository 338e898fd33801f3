"""--device auto|cpu|cuda: resolution, backend choice, CPU runs of the commands; CUDA checks skip without a GPU."""

from __future__ import annotations

import pytest
import torch

import edkm
from edkm.cli.main import main
from edkm.distributed.device import backend_for, resolve_device
from edkm.memory.marshal import to_host
from edkm.models import BUNDLED_MODEL_DIR

CUDA = torch.cuda.is_available()


def test_resolve_and_backend():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    if not CUDA:
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_cuda_without_gpu_is_one_clear_line(capsys):
    if CUDA:
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        main(["generate", str(BUNDLED_MODEL_DIR), "--device", "cuda", "--max-new-tokens", "2"])
    assert "no CUDA GPU" in capsys.readouterr().err


def test_generate_on_cpu(capsys):
    main(["generate", str(BUNDLED_MODEL_DIR), "--device", "cpu", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.strip()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the CUDA path is untested on this machine)")
def test_cuda_training_step_and_pinned_host_copies():
    model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64)).cuda()
    edkm.palettize_(model, edkm.PalettizeConfig(bits=3, overrides={"0": {"bits": 6}}))
    assert all(b.is_cuda for b in model.buffers())
    x = torch.randint(0, 64, (2, 8), device="cuda")
    model(x).sum().backward()
    assert model[1].weight.grad.is_cuda
    host = to_host(torch.randn(4, device="cuda"))
    assert host.device.type == "cpu" and host.is_pinned()
    w = (torch.randn(64, 48, device="cuda") * 0.05).bfloat16().requires_grad_()
    for memory in ("marshal+unique", "fused"):
        out, _ = edkm.dkm(w, torch.linspace(-0.1, 0.1, 8, device="cuda"), tau=1e-4, iters=3, eps=1e-6, memory=memory)
        out.float().sum().backward()
