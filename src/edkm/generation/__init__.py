"""Fast batch-1 generation of packed models: a lean forward over the model's own weights (see :mod:`.llama`).

* :mod:`.weights`: projections calling the native kernel directly, q/k/v and gate/up fused into one call each.
* :mod:`.llama`: :class:`LeanLlama`, the loop over a Llama model's layers with a preallocated KV cache.
* :mod:`.generate`: greedy :func:`lean_generate`, and :func:`bind`, which routes ``model.generate`` to it.
"""

from edkm.generation.generate import LeanGenerate, bind, lean_generate
from edkm.generation.llama import LeanLlama, unsupported_reason
from edkm.generation.weights import Projection

__all__ = ["LeanGenerate", "LeanLlama", "Projection", "bind", "lean_generate", "unsupported_reason"]
