"""`import edkm` stays light: torch only, no transformers, no CUDA initialisation."""

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, edkm, torch; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'; "
        "assert any(type(f).__name__ == '_RegisterAfterImport' for f in sys.meta_path), 'no transformers hook'; "
        "print(sorted(edkm.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "palettize_" in out.stdout


def test_public_api_surface():
    import edkm

    assert set(edkm.__all__) >= {
        "dkm",
        "kmeans1d",
        "PalettizeConfig",
        "palettize_",
        "finalize_",
        "save_palettized",
        "load_palettized",
        "rtn_",
        "ptq_kmeans_",
    }
    for name in edkm.__all__:
        assert getattr(edkm, name) is not None
