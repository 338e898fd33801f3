"""Putting clustering into a model and taking it out: ``palettize_``, ``anneal_``, ``finalize_``, and what they touch.

``palettize_`` swaps every targeted ``nn.Linear`` / ``nn.Embedding`` (and transformers' ``Conv1D``) for a
:class:`~edkm.layers.dkm.DKMModule`; tied weights share one clusterer. ``anneal_`` moves every tau along its
schedule (the trainer calls it each step). ``finalize_`` replaces the DKM modules by LUT modules holding an
fp16 LUT and uint8 indices. ``memory`` (how DKM holds its tensors for backward, docs/method.md §3-§4) is an
option of ``palettize_``, not of the config: it changes no value.

Example:
    >>> import torch, edkm
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> _ = edkm.palettize_(model, edkm.PalettizeConfig(bits=2))
    >>> model(torch.randn(3, 16)).sum().backward()    # training step: soft clustering
    >>> _ = model.eval(); expected = model(torch.ones(1, 16))
    >>> _ = edkm.finalize_(model)
    >>> torch.allclose(model(torch.ones(1, 16)), expected, rtol=1e-5, atol=1e-7)  # packed kernels: fp32 sums reordered
    True
    >>> model[0].lut.lut.shape, model[0].lut.indices.dtype
    (torch.Size([1, 4]), torch.uint8)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from edkm.config import LayerSpec, PalettizeConfig, matches
from edkm.layers.base import is_transposed, layer_kind, rows_first_weight, set_submodule
from edkm.layers.dkm import ClusteredWeight, DKMModule
from edkm.layers.lut import LUTModule, LUTWeight
from edkm.layers.tied import ForwardScope
from edkm.memory.plan import parse_memory


def target_modules(model: nn.Module, config: PalettizeConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer ``config`` clusters: its ``modules`` kinds
    (see :func:`edkm.layers.base.layer_kind`: Linear includes transformers' Conv1D, subclasses included),
    after ``include`` / ``exclude``."""
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if layer_kind(m) in config.modules]
    names = [n for n, _ in found]
    for kind, patterns in (
        ("include", config.include or []),
        ("exclude", config.exclude),
        ("overrides", config.overrides),
    ):
        for pattern in patterns:
            if not any(matches(pattern, n) for n in names):
                raise ValueError(
                    f"{kind} entry {pattern!r} matches no {'/'.join(config.modules)} module; "
                    f"modules are e.g. {names[:6]}"
                )
    keep = [(n, m) for n, m in found if config.include is None or any(matches(p, n) for p in config.include)]
    return [(n, m) for n, m in keep if not any(matches(p, n) for p in config.exclude)]


def weight_plans(model: nn.Module, config: PalettizeConfig) -> list[tuple[list[tuple[str, nn.Module]], LayerSpec]]:
    """Targeted layers grouped by the weight they hold (tied weights together) and that weight's LayerSpec:
    the one of its module names with the most bits (the first such name in ``named_modules`` order).

    >>> import torch, edkm
    >>> emb = torch.nn.Embedding(8, 4); head = torch.nn.Linear(4, 8, bias=False); head.weight = emb.weight
    >>> cfg = edkm.PalettizeConfig(bits=3, overrides={"1": {"bits": 8}})
    >>> [([n for n, _ in mods], spec.bits) for mods, spec in weight_plans(torch.nn.Sequential(emb, head), cfg)]
    [(['0', '1'], 8)]
    """
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in target_modules(model, config):
        groups.setdefault(id(module.weight), []).append((name, module))
    plans = []
    for modules in groups.values():
        if len({is_transposed(m) for _, m in modules}) > 1:
            raise ValueError(
                f"tied weight of {[n for n, _ in modules]} is used in two layouts (Conv1D and Linear): "
                "cannot cluster it"
            )
        specs = [config.for_module(name) for name, _ in modules]
        plans.append((modules, max(specs, key=lambda spec: spec.bits)))  # max keeps the first of equal bits
    return plans


def palettize_(
    model: nn.Module, config: PalettizeConfig | None = None, *, memory: str | Mapping[str, str] = "auto"
) -> nn.Module:
    """Prepare ``model`` in place for train-time clustering; returns it.

    ``memory``: the eDKM memory mode of every clustered weight ("auto", "plain", "fused", "marshal+unique+shard",
    ...: :mod:`edkm.memory`), or a mapping regex -> mode (applied in order, later wins, like ``overrides``).
    Tied weights (one Parameter used by several modules) get one ClusteredWeight with the settings of the module
    name asking for the most bits (see :func:`weight_plans`).
    """
    config = config or PalettizeConfig()
    dtype = getattr(torch, config.cluster_dtype)
    plans = weight_plans(model, config)
    if not plans:
        raise ValueError("palettize_ found no module to cluster")
    modes = {"": memory} if isinstance(memory, str) else dict(memory)
    for mode in modes.values():
        parse_memory(mode)  # an unknown mode fails before the model changes
    scope = ForwardScope().attach(model)  # tied weights are clustered once per forward, shared only within it
    for modules, spec in plans:
        weight = rows_first_weight(modules[0][1])
        mode = [m for pattern, m in modes.items() if any(matches(pattern, n) for n, _ in modules)][-1:] or ["auto"]
        clusterer = ClusteredWeight(spec, weight.shape, dtype, mode[0], scope).to(weight.device)
        clusterer.tied = len(modules) > 1
        for name, module in modules:
            set_submodule(model, name, DKMModule(module, clusterer))
    model.edkm_config = config  # recorded in exports
    return model


@torch.no_grad()
def warm_start_(model: nn.Module, importance: Mapping[str, torch.Tensor]) -> nn.Module:
    """Initialize the centroids of ``model``'s DKM modules by activation-aware k-means; returns it.

    ``importance`` maps module names to weights of each weight's squared error, broadcastable to the
    (out, in) weight (:func:`edkm.peers.calibrate.input_importance` gives the mean squared input per
    column, taken on the original model). Plain k-means of the values clips the few large weights that
    multiply large activations: on SmolLM2-135M two weights of one ``down_proj`` hold the model, and 4-bit
    per-tensor k-means without them gives perplexity in the hundreds of thousands. A tied weight takes the
    importance of the first of its names that has one; a weight without one keeps plain k-means.

    >>> import torch, edkm
    >>> from edkm.peers.calibrate import input_importance
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> imp = input_importance(model, torch.randn(8, 4))
    >>> model = warm_start_(palettize_(model, edkm.PalettizeConfig(bits=2)), imp)
    >>> bool(model[0].clusterer.initialized)
    True
    """
    tied: dict[int, list[tuple[str, DKMModule]]] = {}  # clusterer -> its modules, in model order
    for name, module in clustered_modules(model):
        tied.setdefault(id(module.clusterer), []).append((name, module))
    for modules in tied.values():
        module, cw = modules[0][1], modules[0][1].clusterer
        found = [importance[n] for n, _ in modules if n in importance]
        cw.initialize(module.rows_first(module.weight).detach().to(cw.cluster_dtype), found[0] if found else None)
    return model


def clustered_modules(model: nn.Module) -> list[tuple[str, DKMModule]]:
    """(name, module) of every DKM module, tied ones included."""
    return [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, DKMModule)]


def anneal_(model: nn.Module, progress: float) -> None:
    """Move the tau of every clusterer along its schedule (``progress`` 0 -> 1 over the training run)."""
    for m in model.modules():
        if isinstance(m, ClusteredWeight):
            m.anneal(progress)


@torch.no_grad()
def finalize_(model: nn.Module) -> nn.Module:
    """Replace every DKM module by a LUT module (hard assignment to the trained centroids)."""
    luts: dict[int, LUTWeight] = {}
    scopes = forward_scopes(model)
    for name, module in clustered_modules(model):
        cw = module.clusterer
        if id(cw) not in luts:
            idx, lut = cw.hard(module.rows_first(module.weight))
            luts[id(cw)] = LUTWeight(lut, idx, cw.shape, cw.spec.bits, module.weight.dtype)
        set_submodule(model, name, LUTModule(module, luts[id(cw)]))
    release_scopes(scopes)
    return model


def forward_scopes(model: nn.Module) -> list[ForwardScope]:
    """The forward scopes of ``model``'s clusterers (one per ``palettize_`` call)."""
    found = {id(m.scope): m.scope for m in model.modules() if isinstance(m, ClusteredWeight) and m.scope is not None}
    return list(found.values())


def release_scopes(scopes: list[ForwardScope]) -> None:
    """Detach ``scopes`` from their model (once it holds no DKM module)."""
    for scope in scopes:
        scope.remove()


def clustered_fraction(model: nn.Module) -> float:
    """Share of the model's parameters (tied ones once) held by clustered weights, DKM or LUT layers.

    >>> import torch, edkm
    >>> model = edkm.ptq_kmeans_(torch.nn.Sequential(torch.nn.Linear(8, 4)), edkm.PalettizeConfig(bits=2))
    >>> round(clustered_fraction(model), 3)   # 32 clustered weights, 4 fp biases
    0.889
    """
    clustered: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, DKMModule):
            clustered[id(module.weight)] = module.weight.numel()
        elif isinstance(module, LUTModule):
            clustered[id(module.lut)] = module.lut.shape.numel()
    other = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in clustered)
    total = sum(clustered.values()) + other
    return sum(clustered.values()) / total if total else 0.0


def unclustered_weights(model: nn.Module) -> list[str]:
    """Names of parameters of two or more dimensions left in floating point (weights nothing clusters)."""
    return [
        n
        for n, p in model.named_parameters()
        if p.dim() >= 2 and not isinstance(model.get_submodule(n.rpartition(".")[0]), DKMModule)
    ]
