"""The scope in which tied layers share one clustered weight: one model forward.

An embedding and an output head that share one Parameter share one :class:`~edkm.layers.dkm.ClusteredWeight`;
within a model forward it is clustered once and both layers use the result (one DKM, one autograd graph).
Nothing may be cached between forwards: the warm-start centroids advance and the graph is freed by backward.

:class:`ForwardScope` is that cache, with its lifetime in the open: :func:`edkm.palettize_` creates one per model
and attaches it (a forward pre-hook opens it, a forward hook empties it, even when the forward raises), every
clusterer of the model holds a reference to it, and :func:`edkm.finalize_` removes its hooks.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> scope = ForwardScope().attach(model)
    >>> scope.get(model, "w") is None            # outside a forward: never cached
    True
    >>> _ = model.register_forward_hook(lambda m, a, out: scope.put(m, "w", out))
    >>> _ = model(torch.ones(1, 2)); scope.entries  # emptied when the forward ended
    >>> scope.remove(); len(model._forward_pre_hooks)
    0
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from torch import nn


class ForwardScope:
    """Values computed once per model forward, keyed by (owner, key); empty (None) outside a forward."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, Hashable], Any] | None = None
        self.handles: tuple[Any, ...] = ()

    def attach(self, model: nn.Module) -> ForwardScope:
        """Open the scope at each forward of ``model`` and close it at the end; returns self."""
        self.handles = (
            model.register_forward_pre_hook(self.open),
            model.register_forward_hook(self.close, always_call=True),
        )
        return self

    def open(self, *_: object) -> None:
        self.entries = {}

    def close(self, *_: object) -> None:
        self.entries = None

    def get(self, owner: object, key: Hashable) -> Any:
        """The value ``owner`` stored under ``key`` in this forward, or None."""
        return None if self.entries is None else self.entries.get((id(owner), key))

    def put(self, owner: object, key: Hashable, value: Any) -> None:
        """Keep ``value`` until the model forward ends (nothing is kept outside a forward)."""
        if self.entries is not None:
            self.entries[(id(owner), key)] = value

    def remove(self) -> None:
        """Detach from the model (after :func:`edkm.finalize_`, when no clusterer is left)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.entries = (), None
