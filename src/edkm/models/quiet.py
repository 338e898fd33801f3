"""Loading without transformers' progress bars: edkm's loaders print one line or nothing.

Example:
    >>> with quiet_loading():
    ...     pass
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Without transformers' "Loading weights" progress bar (edkm's loaders print one line or nothing);
    restored after."""
    # deferred: transformers is the hf extra, loaded only when a Hugging Face model is loaded
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils = _gguf_utils()
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:  # its GGUF dequantization bar is a plain tqdm that the switch above does not reach
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar


def _gguf_utils() -> Any:
    """transformers' GGUF loading module, or None where its optional imports are missing."""
    try:
        # deferred: the hf extra, loaded only when a model is loaded
        from transformers import modeling_gguf_pytorch_utils
    except ImportError:
        return None
    return modeling_gguf_pytorch_utils
