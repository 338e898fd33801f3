"""Model wrapping: `palettize_` (prepare for train-time clustering) and `finalize_` (hard LUTs).

``palettize_`` swaps every targeted ``nn.Linear`` / ``nn.Embedding`` for a DKM module that
computes with soft-clustered weights in training mode and hard-clustered ones in eval mode. The
weight Parameter is kept as it is (fp32 master weights train with any optimizer); each step it is
rounded to 16 bits (gradient straight through) and clustered by
:func:`edkm.memory.layer.cluster_weight`, which keeps for backward only small tables (a Linear
recomputes W_hat when backward needs it). Tied weights (embedding = output layer) share one
:class:`ClusteredWeight`, computed once per model forward (a scope opened by a forward pre-hook
on the model and dropped by its forward hook: nothing is cached between steps).
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

from functools import partial

import torch
from torch import nn

from edkm.cluster import decode, hard_assign, kmeans1d
from edkm.config import LayerSpec, PalettizeConfig, matches
from edkm.layers.lut import LUT_DTYPE, LUTModule, LUTWeight, WrappedLayer, is_transposed, layer_kind, rows_first_weight
from edkm.memory.fused_layer import fused_embedding, fused_linear, supports
from edkm.memory.layer import Clustered, cluster_weight, clustered_linear
from edkm.memory.plan import parse_memory


def tau_scale(centroids: torch.Tensor) -> torch.Tensor:
    """Per-LUT unit of tau: the median squared gap between neighbouring sorted centroids."""
    gaps = torch.diff(torch.sort(centroids, dim=-1).values, dim=-1).square().reshape(len(centroids), -1)
    scale = gaps.where(gaps > 0, torch.nan).nanmedian(dim=-1).values  # lower median of the positive gaps
    return scale.nan_to_num(1e-12)


class ClusteredWeight(nn.Module):
    """DKM state of one weight tensor: warm-start centroids (G, k) and the tau unit per LUT."""

    #: False: ``forward`` / :meth:`cluster` / :meth:`fused_layer` take the whole weight. True (sharded DKM,
    #: :class:`edkm.distributed.clustered.ShardedClusteredWeight`): ``forward`` takes this rank's rows and
    #: returns the whole clustered weight, and the single-process layer kernels do not apply.
    takes_shards = False

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
        self._scope: dict | None = None  # clustered weights of the current model forward (tied weights)
        self.tied = False  # set by palettize_ when several modules share the weight
        self.plan = parse_memory(spec.memory)

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

    def cluster(self, weight: torch.Tensor) -> Clustered:
        """This step's clustered weight (training: DKM, advancing the warm start; eval: hard)."""
        key = (weight._version, self.training, torch.is_grad_enabled())
        if self._scope is not None and key in self._scope:
            return self._scope[key]  # a tied weight already clustered in this forward
        if self.training:
            if not self.initialized:
                self.initialize(weight.detach().to(self.cluster_dtype))
            tau = self.tau * self.scale if self.groups > 1 else float(self.tau * self.scale)
            out = cluster_weight(weight, self.centroids, tau=tau, iters=self.spec.iters, eps=self.spec.eps,
                                 dtype=self.cluster_dtype, memory=self.spec.memory)
            self.centroids.copy_(out.centroids.reshape(self.centroids.shape))
            if self.spec.hard_forward:
                soft = out.w_hat
                hard = soft + (self.hard_weight(weight) - soft).detach()
                out = out.replaced(hard, partial(hard_forward_recompute, out.recompute, self.cluster_dtype),
                                   [out.centroids, *out.tables])
        else:
            w = self.hard_weight(weight)
            out = Clustered(weight, w, self.centroids, lambda _w: w)
        if self._scope is not None:
            self._scope[key] = out
        return out

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.cluster(weight).w_hat

    def fused_layer(self, module: WrappedLayer, x: torch.Tensor) -> torch.Tensor | None:
        """The training output of ``module`` by the fused layer kernels (no W_hat built; see
        :mod:`edkm.memory.fused_layer`), or None where they do not apply (tied, grouped or small
        weights, a paper memory mode, hard_forward, eval, no grad, embedding options)."""
        weight, spec = module.weight, self.spec
        if not (self.training and torch.is_grad_enabled() and not self.tied and not spec.hard_forward
                and (self.plan.fused or self.plan.auto) and supports(weight, self.centroids)):
            return None
        embedding = module.base_type == "Embedding"
        if embedding and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
            return None
        if not self.initialized:
            self.initialize(weight.detach().to(self.cluster_dtype))
        opts = dict(tau=float(self.tau * self.scale), iters=spec.iters, eps=spec.eps, dtype=self.cluster_dtype)
        if embedding:
            out, c = fused_embedding(x, weight, self.centroids, padding_idx=module.padding_idx, **opts)
        else:
            out, c = fused_linear(x, weight, module.bias, self.centroids, **opts)
        self.centroids.copy_(c.reshape(self.centroids.shape))
        return out


def hard_forward_recompute(soft_recompute, cluster_dtype: torch.dtype, weight: torch.Tensor, centroids: torch.Tensor,
                           *tables: torch.Tensor) -> torch.Tensor:
    """The hard_forward value W_soft + (W_hard - W_soft) again, from the step's centroids."""
    soft = soft_recompute(weight, *tables)
    idx, lut = hard_assign(weight.detach().to(cluster_dtype), centroids.reshape(-1, centroids.shape[-1]))
    return soft + (decode(lut.to(LUT_DTYPE), idx, weight.shape, weight.dtype) - soft)


class DKMModule(WrappedLayer):
    """A Linear / Embedding / Conv1D layer whose weight is DKM-clustered on the fly (output channels first)."""

    def __init__(self, base: nn.Module, clusterer: ClusteredWeight) -> None:
        super().__init__(base)
        self.clusterer = clusterer

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.clusterer.takes_shards:  # sharded DKM: gathered clustered rows (edkm.distributed.clustered)
            return self.clusterer.layer_forward(self, x, *args, **kwargs)
        if self.shell is not None or self.transposed:  # Conv1D, a subclass's own forward: on the clustered weight
            return self._compute(x, self.clusterer(self.rows_first(self.weight)), *args, **kwargs)
        out = self.clusterer.fused_layer(self, x)
        if out is not None:
            return out
        clustered = self.clusterer.cluster(self.weight)
        if self.base_type == "Linear":
            return clustered_linear(x, clustered, self.bias)  # keeps x and small tables, not W_hat
        return self._compute(x, clustered.w_hat)  # F.embedding keeps only its indices


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def target_modules(model: nn.Module, config: PalettizeConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer ``config`` clusters: its ``modules`` kinds (see :func:`edkm.layers.lut.layer_kind`:
    Linear includes transformers' Conv1D, subclasses included), after ``include`` / ``exclude``."""
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if layer_kind(m) in config.modules]
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
            raise ValueError(f"tied weight of {[n for n, _ in modules]} is used in two layouts (Conv1D and Linear): cannot cluster it")
        specs = [config.for_module(name) for name, _ in modules]
        plans.append((modules, max(specs, key=lambda spec: spec.bits)))  # max keeps the first of equal bits
    return plans


def _open_scope(module: nn.Module, _args: object) -> None:
    for m in module.modules():
        if isinstance(m, ClusteredWeight):
            m._scope = {}


def _close_scope(module: nn.Module, _args: object, _out: object) -> None:
    for m in module.modules():
        if isinstance(m, ClusteredWeight):
            m._scope = None


def palettize_(model: nn.Module, config: PalettizeConfig | None = None) -> nn.Module:
    """Prepare ``model`` in place for train-time clustering; returns it.

    Tied weights (one Parameter used by several modules) get one ClusteredWeight with the settings of
    the module name asking for the most bits (see :func:`weight_plans`).
    """
    config = config or PalettizeConfig()
    dtype = getattr(torch, config.cluster_dtype)
    plans = weight_plans(model, config)
    for modules, spec in plans:
        weight = rows_first_weight(modules[0][1])
        clusterer = ClusteredWeight(spec, weight.shape, dtype).to(weight.device)
        clusterer.tied = len(modules) > 1
        for name, module in modules:
            set_submodule(model, name, DKMModule(module, clusterer))
    if not plans:
        raise ValueError("palettize_ found no module to cluster")
    if not hasattr(model, "_edkm_hook"):  # tied weights are clustered once per forward, shared only within it
        model._edkm_hook = (model.register_forward_pre_hook(_open_scope),
                            model.register_forward_hook(_close_scope, always_call=True))
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
            idx, lut = cw.hard(module.rows_first(module.weight))
            luts[id(cw)] = LUTWeight(lut, idx, cw.shape, cw.spec.bits, module.weight.dtype)
        set_submodule(model, name, LUTModule(module, luts[id(cw)]))
    remove_scope_hooks(model)
    return model


def remove_scope_hooks(model: nn.Module) -> None:
    """Remove the per-forward scope hooks ``palettize_`` registered on ``model`` (once it holds no DKM module)."""
    for hook in model.__dict__.pop("_edkm_hook", ()):
        hook.remove()


def clustered_fraction(model: nn.Module) -> float:
    """Share of the model's parameters (tied ones once) held by clustered weights, DKM or LUT layers.

    >>> import torch, edkm
    >>> model = edkm.ptq_kmeans_(torch.nn.Sequential(torch.nn.Linear(8, 4)), edkm.PalettizeConfig(bits=2, memory="plain"))
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
    return [n for n, p in model.named_parameters() if p.dim() >= 2 and not isinstance(model.get_submodule(n.rpartition(".")[0]), DKMModule)]
