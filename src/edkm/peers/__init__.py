"""Post-training and quantization-aware peers of eDKM, written as LUT layers so that our export,
size and evaluation code measure them exactly like eDKM (see ``edkm compare``).

* :mod:`~edkm.peers.gptq`: GPTQ (and round-to-nearest with fp16 scales) onto uniform grids;
* :mod:`~edkm.peers.squeeze`: SqueezeLLM-style Fisher-weighted k-means LUTs;
* :mod:`~edkm.peers.awq`: AWQ-style activation-aware scaling before round-to-nearest;
* :mod:`~edkm.peers.hqq`: HQQ through the ``hqq`` library;
* :mod:`~edkm.peers.qat`: torchao quantization-aware training.
"""

from edkm.peers.calibrate import fisher_diagonal, input_hessians, quantize_layers_
from edkm.peers.gptq import gptq, gptq_, gptq_uniform, rtn_lut
from edkm.peers.squeeze import squeeze_, weighted_error, weighted_kmeans

__all__ = [
    "gptq",
    "gptq_",
    "gptq_uniform",
    "rtn_lut",
    "squeeze_",
    "weighted_kmeans",
    "weighted_error",
    "fisher_diagonal",
    "input_hessians",
    "quantize_layers_",
]
