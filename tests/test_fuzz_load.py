"""Fuzz the loaders with a real saved model (bundled stories260K after palettize_ -> finalize_).

Every mutated file either loads to the identical model or is refused with ``FormatError``; a crafted
file (header edited and its checksum recomputed) is refused or loads into a model whose forward runs.
Any other exception, a crash in forward or a hang fails the test. Seeded; the model is built once.
"""

import copy
import json
import random
import struct

import pytest
import torch

import edkm
from edkm.export import FormatError
from edkm.export.layers import digest
from edkm.hf.folder import save_folder
from edkm.layers.lut import LUTModule
from edkm.models import load_causal_lm

SEED = 20261201
X = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
POOL = [
    None,
    True,
    False,
    -1,
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    9,
    16,
    255,
    256,
    1 << 31,
    1 << 40,
    1 << 62,
    -(1 << 63),
    1.5,
    1e308,
    "",
    "x",
    "float64",
    "int8",
    "__class__",
    "lut",
    "uniform",
    "model.norm",
    "lm_head",
    "model.embed_tokens",
    "edkm-palettized",
    "llama",
    [],
    [1],
    [0, 0],
    [512, 64],
    [64, 172],
    [10**12, 10**12],
    [3] * 9,
    {},
    {"a": 1},
]


def split(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :], n


def join(table: dict, body: bytes) -> bytes:
    blob = json.dumps(table).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + body


def paths(obj, prefix=()):
    if prefix:
        yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from paths(value, (*prefix, key))


def mutate_json(obj, rng: random.Random) -> str:
    """Change, delete or retype one random field of ``obj`` in place; returns a description."""
    path = rng.choice(list(paths(obj)))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    action = rng.random()
    if action < 0.15:
        del parent[path[-1]]
        return f"delete {path}"
    value = copy.deepcopy(rng.choice(POOL))
    if action < 0.3 and isinstance(parent[path[-1]], str):
        old = parent[path[-1]]
        i = rng.randrange(len(old) + 1)
        value = old[:i] + rng.choice("ax.0_ ") + old[i + 1 :]
    parent[path[-1]] = value
    return f"set {path} = {value!r}"[:200]


def flip(raw: bytes, lo: int, hi: int, rng: random.Random) -> bytes:
    data = bytearray(raw)
    data[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)
    return bytes(data)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model, tok = load_causal_lm(None)
    pristine = copy.deepcopy(model)
    edkm.palettize_(model, edkm.PalettizeConfig(bits=3, overrides={"embed_tokens|lm_head": {"bits": 8}}))
    model.train()
    model(X)  # initializes the centroids
    edkm.finalize_(model).eval()
    root = tmp_path_factory.mktemp("fuzz")
    edkm.save_palettized(model, root / "model.edkm.safetensors")
    save_folder(model, root / "hf")
    with torch.no_grad():
        logits = model(X).logits
    return pristine, logits, root


def check(load, logits, crafted: bool, what: str) -> str:
    try:
        model = load()
    except FormatError:
        return "refused"
    except Exception as err:  # noqa: BLE001 - anything but our error type is the bug this test looks for
        raise AssertionError(f"{what}: {type(err).__name__}: {err}") from err
    with torch.no_grad():
        out = model(X).logits
    if crafted:
        assert out.shape == logits.shape, what
    else:
        assert torch.equal(out, logits), f"{what}: loaded a different model"
    return "loaded"


def test_single_file_fuzz(reference, tmp_path):
    pristine, logits, root = reference
    raw = (root / "model.edkm.safetensors").read_bytes()
    table, body, n = split(raw)
    header = json.loads(table["__metadata__"]["edkm"])
    from safetensors.torch import load_file

    tensors = load_file(root / "model.edkm.safetensors")
    rng = random.Random(SEED)
    plan = (
        ["flip"] * 300
        + ["flip_header"] * 150
        + ["truncate"] * 80
        + ["table"] * 120
        + ["field"] * 200
        + ["crafted"] * 150
    )
    counts: dict[str, int] = {}
    path = tmp_path / "case.safetensors"
    spare = [copy.deepcopy(pristine)]

    def load_into_spare():  # the loader changes the model only after every check passed: copy only then
        try:
            return edkm.load_palettized(path, spare[0])
        finally:
            if any(isinstance(m, LUTModule) for m in spare[0].modules()):
                spare[0] = copy.deepcopy(pristine)

    for case, kind in enumerate(plan):
        crafted = False
        if kind == "flip":
            data, what = flip(raw, 0, len(raw), rng), "flip"
        elif kind == "flip_header":
            data, what = flip(raw, 0, 8 + n, rng), "flip in the header"
        elif kind == "truncate":
            data, what = raw[: rng.randrange(len(raw))], "truncate"
        elif kind == "table":
            edited = json.loads(json.dumps(table))
            entry = edited[rng.choice([k for k in edited if k != "__metadata__"])]
            what = mutate_json(entry, rng)
            data = join(edited, body)
        else:
            edited, crafted = json.loads(json.dumps(header)), kind == "crafted"
            what = mutate_json(edited, rng)
            if crafted and isinstance(edited, dict):
                rest = {k: v for k, v in edited.items() if k != "sha256"}
                edited["sha256"] = digest(tensors) if edited.get("version") in (1, 2) else digest(tensors, rest)
            data = join({**table, "__metadata__": {"edkm": json.dumps(edited)}}, body)
        path.write_bytes(data)
        via_hf = case % 8 == 0  # the rest load into a copy of the pristine model (faster)
        load = (lambda: edkm.load_palettized(path)) if via_hf else load_into_spare
        result = check(load, logits, crafted, f"case {case} ({kind}, {'hf' if via_hf else 'model'}): {what}")
        counts[f"{kind}:{result}"] = counts.get(f"{kind}:{result}", 0) + 1
    print(counts)
    assert sum(counts.values()) == len(plan) >= 1000
    assert counts.get("flip:refused", 0) > 250 and counts.get("crafted:refused", 0) > 50, counts


def test_folder_fuzz(reference, tmp_path):
    _, logits, root = reference
    weights = (root / "hf" / "model.safetensors").read_bytes()
    config_text = (root / "hf" / "config.json").read_text()
    generation = (root / "hf" / "generation_config.json").read_bytes()
    n = split(weights)[2]
    rng = random.Random(SEED + 1)
    plan = (
        ["flip"] * 50
        + ["flip_header"] * 20
        + ["truncate"] * 10
        + ["config_flip"] * 30
        + ["quant_field"] * 25
        + ["model_field"] * 15
    )
    counts: dict[str, int] = {}
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    (case_dir / "generation_config.json").write_bytes(generation)
    for case, kind in enumerate(plan):
        data, config, what = weights, config_text, kind
        if kind == "flip":
            data = flip(weights, 0, len(weights), rng)
        elif kind == "flip_header":
            data = flip(weights, 0, 8 + n, rng)
        elif kind == "truncate":
            data = weights[: rng.randrange(len(weights))]
        elif kind == "config_flip":
            config = flip(config_text.encode(), 0, len(config_text), rng).decode("latin-1")
        else:
            edited = json.loads(config_text)
            unchecked = {"dtype", "architectures", "transformers_version"}  # load options transformers rewrites
            target = (
                edited["quantization_config"]
                if kind == "quant_field"
                else {k: v for k, v in edited.items() if k not in unchecked | {"quantization_config"}}
            )
            what = mutate_json(target, rng)
            if kind == "model_field":
                edited.update(target)
                edited = {k: v for k, v in edited.items() if k in target or k in unchecked | {"quantization_config"}}
            config = json.dumps(edited)
        (case_dir / "model.safetensors").write_bytes(data)
        (case_dir / "config.json").write_text(config, encoding="latin-1")
        result = check(lambda: edkm.load_palettized(case_dir), logits, False, f"case {case} ({kind}): {what}")
        counts[f"{kind}:{result}"] = counts.get(f"{kind}:{result}", 0) + 1
    print(counts)
    assert sum(counts.values()) == len(plan)
    assert counts.get("flip:refused", 0) > 40, counts
