"""Model wrapping: `palettize_` (prepare for train-time clustering) and `finalize_` (hard LUTs).

``palettize_`` swaps every targeted ``nn.Linear`` / ``nn.Embedding`` for a DKM module that
computes with soft-clustered weights in training mode and hard-clustered ones in eval mode. The
weight Parameter is kept as it is (fp32 master weights train with any optimizer); each step it is
rounded to 16 bits (gradient straight through) and clustered by :func:`edkm.dkm`. Tied weights
(embedding = output layer) share one :class:`ClusteredWeight`, computed once per forward.
``finalize_`` replaces the DKM modules by LUT modules holding an fp16 LUT and uint8 indices.

Example:
    >>> import torch, edkm
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> _ = edkm.palettize_(model, edkm.PalettizeConfig(bits=2, memory="plain"))
    >>> model(torch.randn(3, 16)).sum().backward()    # training step: soft clustering
    >>> _ = model.eval(); expected = model(torch.ones(1, 16))
    >>> _ = edkm.finalize_(model)
    >>> torch.allclose(model(torch.ones(1, 16)), expected, rtol=1e-5, atol=1e-7)  # packed kernels: fp32 sums reordered
    True
    >>> model[0].lut.lut.shape, model[0].lut.indices.dtype
    (torch.Size([1, 4]), torch.uint8)
"""

from __future__ import annotations

import torch
from torch import nn

from .cluster import decode, dkm, hard_assign, kmeans1d
from .cluster.sixteen import cast_straight_through
from .config import LayerSpec, PalettizeConfig, matches
from .lut import LUT_DTYPE, LUTModule, LUTWeight, WrappedLayer

def tau_scale(centroids: torch.Tensor) -> torch.Tensor:
    """Per-LUT unit of tau: the median squared gap between neighbouring sorted centroids."""
    gaps = torch.diff(torch.sort(centroids, dim=-1).values, dim=-1).square()
    scale = torch.stack([g[g > 0].median() if (g > 0).any() else g.new_tensor(1e-12) for g in gaps.reshape(len(centroids), -1)])
    return scale


class ClusteredWeight(nn.Module):
    """DKM state of one weight tensor: warm-start centroids (G, k) and the tau unit per LUT."""

    def __init__(self, spec: LayerSpec, shape: torch.Size, cluster_dtype: torch.dtype) -> None:
        super().__init__()
        rows = shape[0]
        if spec.group_size is not None and rows % spec.group_size:
            raise ValueError(f"group_size {spec.group_size} does not divide the {rows} output channels of a {tuple(shape)} weight")
        self.spec, self.shape, self.cluster_dtype = spec, torch.Size(shape), cluster_dtype
        self.groups = 1 if spec.group_size is None else rows // spec.group_size
        self.tau = spec.tau  # relative; the trainer may anneal it
        self.register_buffer("centroids", torch.zeros(self.groups, spec.k))
        self.register_buffer("scale", torch.zeros(self.groups))
        self.register_buffer("initialized", torch.tensor(False))
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, groups={self.groups}, iters={self.spec.iters}, memory={self.spec.memory!r}"

    @torch.no_grad()
    def initialize(self, w16: torch.Tensor) -> None:
        """First-step hard k-means on the 16-bit weights."""
        c = kmeans1d(w16, self.spec.k, groups=self.groups)
        self.centroids.copy_(c)
        self.scale.copy_(tau_scale(c))
        self.initialized.fill_(True)

    def hard(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 indices (G, n), fp16 LUT (G, k)) of the 16-bit-rounded weight."""
        w16 = weight.detach().to(self.cluster_dtype)
        if not self.initialized:
            self.initialize(w16)
        idx, lut = hard_assign(w16, self.centroids)
        return idx, lut.to(LUT_DTYPE)

    def hard_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight decoded from its hard assignment, exactly as the finalized LUT module computes it."""
        idx, lut = self.hard(weight)
        return decode(lut, idx, self.shape, weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight._version, self.training, torch.is_grad_enabled())
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]  # a tied weight already clustered in this forward
        if self.training:
            w16 = weight if weight.dtype == self.cluster_dtype else cast_straight_through(weight, self.cluster_dtype)
            if not self.initialized:
                self.initialize(w16.detach())
            tau = self.tau * self.scale if self.groups > 1 else float(self.tau * self.scale)
            w_hat, c = dkm(w16, self.centroids, tau=tau, iters=self.spec.iters, eps=self.spec.eps, memory=self.spec.memory)
            self.centroids.copy_(c.detach().reshape(self.centroids.shape))
            out = w_hat.to(weight.dtype)
            if self.spec.hard_forward:
                out = out + (self.hard_weight(weight) - out).detach()
        else:
            out = self.hard_weight(weight)
        self._cache = (key, out)
        return out


class DKMModule(WrappedLayer):
    """nn.Linear / nn.Embedding whose weight is DKM-clustered on the fly."""

    def __init__(self, base: nn.Module, clusterer: ClusteredWeight) -> None:
        super().__init__(base)
        self.clusterer = clusterer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compute(x, self.clusterer(self.weight))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def target_modules(model: nn.Module, config: PalettizeConfig) -> list[tuple[str, nn.Module]]:
    types = tuple({"Linear": nn.Linear, "Embedding": nn.Embedding}[t] for t in config.modules)
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, types)]
    names = [n for n, _ in found]
    for kind, patterns in (("include", config.include or []), ("exclude", config.exclude), ("overrides", config.overrides)):
        for pattern in patterns:
            if not any(matches(pattern, n) for n in names):
                raise ValueError(
                    f"{kind} entry {pattern!r} matches no {'/'.join(config.modules)} module; "
                    f"modules are e.g. {names[:6]}"
                )
    keep = [(n, m) for n, m in found if config.include is None or any(matches(p, n) for p in config.include)]
    return [(n, m) for n, m in keep if not any(matches(p, n) for p in config.exclude)]


def _clear_caches(module: nn.Module, _args: object) -> None:
    for m in module.modules():
        if isinstance(m, ClusteredWeight):
            m._cache = None


def palettize_(model: nn.Module, config: PalettizeConfig | None = None) -> nn.Module:
    """Prepare ``model`` in place for train-time clustering; returns it.

    Tied weights (one Parameter used by several modules) get one ClusteredWeight, whose settings
    are those of the first module name in ``named_modules`` order.
    """
    config = config or PalettizeConfig()
    dtype = getattr(torch, config.cluster_dtype)
    shared: dict[int, ClusteredWeight] = {}
    for name, module in target_modules(model, config):
        weight = module.weight
        if id(weight) not in shared:
            shared[id(weight)] = ClusteredWeight(config.for_module(name), weight.shape, dtype).to(weight.device)
        set_submodule(model, name, DKMModule(module, shared[id(weight)]))
    if not shared:
        raise ValueError("palettize_ found no module to cluster")
    if not hasattr(model, "_edkm_hook"):
        model._edkm_hook = model.register_forward_pre_hook(_clear_caches)
    model.edkm_config = config  # recorded in exports
    return model


def clustered_modules(model: nn.Module) -> list[tuple[str, DKMModule]]:
    """(name, module) of every DKM module, tied ones included."""
    return [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, DKMModule)]


def set_tau(model: nn.Module, tau: float) -> None:
    """Set the relative temperature of every ClusteredWeight (for annealing)."""
    for m in model.modules():
        if isinstance(m, ClusteredWeight):
            m.tau = tau


@torch.no_grad()
def finalize_(model: nn.Module) -> nn.Module:
    """Replace every DKM module by a LUT module (hard assignment to the trained centroids)."""
    luts: dict[int, LUTWeight] = {}
    for name, module in clustered_modules(model):
        cw = module.clusterer
        if id(cw) not in luts:
            idx, lut = cw.hard(module.weight)
            luts[id(cw)] = LUTWeight(lut, idx, cw.shape, cw.spec.bits, module.weight.dtype)
        set_submodule(model, name, LUTModule(module, luts[id(cw)]))
    hook = model.__dict__.pop("_edkm_hook", None)
    if hook is not None:
        hook.remove()
    return model
