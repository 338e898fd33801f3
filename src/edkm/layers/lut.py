"""Hard-clustered layers: a LUT plus indices per weight, decoded on use.

``LUTWeight`` holds an fp16 LUT (G, 2^b) and uint8 indices (G, n); ``LUTModule`` is the
``nn.Linear`` / ``nn.Embedding`` / ``Conv1D`` (or subclass, with its own forward) that computes with it. ``WrappedLayer`` is the plumbing both the
DKM (training) and the LUT (inference) layers share.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from edkm.cluster import decode
from edkm.kernels import Int8Weight, KernelViews, check_kernel, decode_rows, lut_embedding, lut_linear

LUT_DTYPE = torch.float16


def uniform_levels(lo: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 LUT (G, 2^bits) of the evenly spaced levels ``lo + step * j`` (fp32 math, (G, 1) inputs)."""
    return (lo.float() + step.float() * torch.arange(1 << bits, dtype=torch.float32, device=lo.device)).to(LUT_DTYPE)


class LUTWeight(nn.Module):
    """Hard-clustered weight: fp16 LUT (G, k) and indices (G, n); decoded on use.

    A LUT of evenly spaced levels (round-to-nearest) also keeps ``lo`` and ``step`` (fp32, (G, 1)),
    which the export stores instead of the 2^b levels: a scale and a zero point per group.

    :meth:`linear` and :meth:`embedding` compute without decoding the whole weight (``kernel``,
    see :mod:`edkm.kernels.linear`); calling the module decodes it all (for inspection).
    """

    def __init__(
        self, lut: torch.Tensor, indices: torch.Tensor, shape: torch.Size, bits: int, dtype: torch.dtype,
        uniform: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("lut", lut)
        self.register_buffer("indices", indices)
        self.shape, self.bits, self.dtype = torch.Size(shape), bits, dtype
        self.kernel = "auto"
        self.int8: Int8Weight | None = None  # the int8 re-grid, only while kernel == "int8"
        self.views: KernelViews | None = None  # the kernels' views of the current buffers (rebuilt if they change)
        if uniform is not None:
            self.register_buffer("lo", uniform[0])
            self.register_buffer("step", uniform[1])

    @property
    def uniform(self) -> bool:
        """Whether the levels are evenly spaced (kept as ``lo`` and ``step``)."""
        return "lo" in self._buffers

    @classmethod
    def from_uniform(cls, lo: torch.Tensor, step: torch.Tensor, indices: torch.Tensor, shape: torch.Size, bits: int,
                     dtype: torch.dtype) -> "LUTWeight":
        """The LUT of ``uniform_levels(lo, step, bits)``; exactly what :func:`edkm.rtn_` computes with."""
        return cls(uniform_levels(lo, step, bits), indices, shape, bits, dtype, uniform=(lo, step))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, bits={self.bits}, groups={self.lut.shape[0]}" + (", uniform" if self.uniform else "")

    def forward(self) -> torch.Tensor:
        return decode(self.lut, self.indices, self.shape, self.dtype)

    def set_kernel(self, kernel: str) -> None:
        """Choose how :meth:`linear` computes: ``auto`` | ``eager`` | ``decode`` (exact) or ``int8`` (approximate)."""
        self.kernel = check_kernel(kernel)
        self.int8 = None
        if kernel == "int8":
            rows = self.shape[0]
            self.int8 = Int8Weight.from_rows(lambda r: decode_rows(self.lut, self.indices, self.shape, self.dtype, r), rows)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, self(), bias)`` without materialising ``self()`` (exact unless kernel == "int8")."""
        if self.views is None or not self.views.fits(self.lut, self.indices, self.dtype):
            self.views = KernelViews.of(self.lut, self.indices, self.shape, self.dtype)
        return lut_linear(x, self.lut, self.indices, self.shape, self.dtype, bias, self.kernel, self.int8, self.views)

    def embedding(self, ids: torch.Tensor, padding_idx: int | None = None, max_norm: float | None = None,
                  norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> torch.Tensor:
        """``F.embedding(ids, self(), ...)`` decoding only the rows of ``ids``."""
        return lut_embedding(ids, self.lut, self.indices, self.shape, self.dtype, padding_idx, max_norm, norm_type,
                             scale_grad_by_freq, sparse)


def conv1d_type() -> type | None:
    """transformers' GPT-2-style ``Conv1D`` (a linear layer with its weight stored (in, out)), once transformers is loaded."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def layer_kind(module: nn.Module) -> str | None:
    """The kind of layer edkm can cluster: ``'Linear'`` (``nn.Linear``, its subclasses, transformers' ``Conv1D``),
    ``'Embedding'`` (``nn.Embedding`` and subclasses), or None: anything else, an already wrapped layer, or a
    subclass holding child modules (its own forward could not run on a wrapped copy; it stays unclustered and
    :func:`edkm.layers.dkm.unclustered_weights` lists it).

    >>> layer_kind(nn.Linear(2, 3)), layer_kind(nn.Embedding(4, 2)), layer_kind(nn.LayerNorm(2))
    ('Linear', 'Embedding', None)
    """
    if next(module.children(), None) is not None:
        return None
    if isinstance(module, nn.Linear) or (conv1d_type() is not None and isinstance(module, conv1d_type())):
        return "Linear"
    return "Embedding" if isinstance(module, nn.Embedding) else None


def is_transposed(module: nn.Module) -> bool:
    """True when ``module`` stores its weight (in_features, out_features), like ``Conv1D``."""
    if isinstance(module, WrappedLayer):
        return module.transposed
    conv = conv1d_type()
    return conv is not None and isinstance(module, conv)


def rows_first_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear / Embedding / Conv1D layer with output channels (LUT groups) along dim 0."""
    return module.weight.t() if is_transposed(module) else module.weight


def own_forward_shell(module: nn.Module) -> nn.Module | None:
    """An empty instance of ``module``'s class (no tensors) to run its own ``forward``, or None when it has the plain
    ``nn.Linear`` / ``nn.Embedding`` forward (OPT's positional and Gemma's scaled embeddings, ``Conv1D`` have their own)."""
    if type(module).forward in (nn.Linear.forward, nn.Embedding.forward):
        return None
    shell = type(module).__new__(type(module))
    nn.Module.__init__(shell)
    shell.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"})
    return shell


class WrappedLayer(nn.Module):
    """Shared plumbing of DKM and LUT layers: keeps the wrapped module's attributes (weight, bias, padding_idx, ...)
    and buffers, its kind (``base_type``), weight layout (``transposed``) and, for a class with its own ``forward``,
    that forward (run on a tensor-less shell of the class with this layer's tensors and the clustered weight)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        for key, value in vars(base).items():
            if not key.startswith("_") and key not in ("training", "shell"):
                setattr(self, key, value)
        for key, param in base._parameters.items():
            self.register_parameter(key, param)  # the same Parameter objects (bias may be None)
        for key, buffer in base._buffers.items():  # e.g. Gemma's embed_scale
            self.register_buffer(key, buffer, persistent=key not in base._non_persistent_buffers_set)
        wrapped = isinstance(base, WrappedLayer)
        kind = base.base_type if wrapped else layer_kind(base)
        if kind is None:
            raise ValueError(f"cannot cluster a {type(base).__name__}: only Linear, Embedding and Conv1D layers")
        self.base_type: str = kind
        self.transposed: bool = is_transposed(base)
        self.__dict__["shell"] = base.shell if wrapped else own_forward_shell(base)  # not a submodule: holds no tensors

    def rows_first(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` in output-channels-first layout from the stored layout (and back: a transpose is its own inverse)."""
        return weight.t() if self.transposed else weight

    def _compute(self, x: torch.Tensor, weight: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """The layer's output for ``x`` computed with ``weight`` (output channels first)."""
        if self.shell is not None:  # the class's own forward, on the shell lent this layer's tensors for the call
            shell = self.shell
            tensors = {k: v for k, v in {**self._parameters, **self._buffers}.items() if v is not None}
            tensors["weight"] = self.rows_first(weight)
            shell.__dict__.update(tensors, training=self.training)  # plain attributes: found before nn.Module's registries
            try:
                return shell(x, *args, **kwargs)
            finally:
                for key in tensors:
                    del shell.__dict__[key]
        if self.base_type == "Linear":
            return F.linear(x, weight, self.bias)
        return F.embedding(x, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)


class LUTModule(WrappedLayer):
    """A Linear / Embedding / Conv1D layer computing with a decoded LUT weight (no weight Parameter)."""

    def __init__(self, base: nn.Module, lut: LUTWeight) -> None:
        super().__init__(base)
        self.__dict__.pop("weight", None)
        self._parameters.pop("weight", None)
        self.lut = lut

    @property
    def weight(self) -> torch.Tensor:  # decoded in the stored layout, for code that inspects `.weight`
        return self.rows_first(self.lut())

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.shell is not None or self.transposed:  # Conv1D, or a subclass's own forward, on the decoded weight
            return self._compute(x, self.lut(), *args, **kwargs)
        if self.base_type == "Linear":
            return self.lut.linear(x, self.bias)
        return self.lut.embedding(x, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)


def set_lut_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Set the kernel of every LUT Linear in ``model`` (see :mod:`edkm.kernels.linear`); returns ``model``."""
    check_kernel(kernel)
    for module in model.modules():
        if isinstance(module, LUTModule) and module.base_type == "Linear" and module.lut.kernel != kernel:
            module.lut.set_kernel(kernel)
    return model
