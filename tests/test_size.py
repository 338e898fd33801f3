"""`edkm size`: LLaMA-7B lands on the paper's 12.6 GB -> 2.5 GB (GiB), computed on the meta device."""

import json

import pytest

from edkm.cli.main import main
from edkm.config import PalettizeConfig
from edkm.jobs.size import GiB, load_config, meta_model, palettized_size


def test_llama7b_matches_paper():
    model = meta_model(load_config("llama-7b"))
    assert all(p.is_meta for p in model.parameters())
    r = palettized_size(model, PalettizeConfig(bits=3, overrides={"embed_tokens|lm_head": {"bits": 8}}))
    assert r["params"] == 6_738_415_616
    assert abs(r["fp16_bytes"] / GiB - 12.55) < 0.01  # the paper's "12.6 GB"
    assert abs(r["palettized_bytes"] / GiB - 2.51) < 0.01  # the paper's "2.5 GB"


def test_cli_and_local_config(tmp_path, capsys):
    main(["size", "llama-7b", "--bits", "3", "--override", "embed_tokens|lm_head=8"])
    out = capsys.readouterr().out
    assert "12.55 GiB -> palettized: 2.51 GiB" in out
    from edkm.models import BUNDLED_MODEL_DIR

    main(["size", str(BUNDLED_MODEL_DIR / "config.json"), "--bits", "4"])
    assert "palettized" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(SystemExit):
        main(["size", str(tmp_path)])
    assert "model_type" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["size", "no-such-preset"])
