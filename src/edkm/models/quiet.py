"""Loading without transformers' progress bars: edkm's loaders print one line or nothing.

Example:
    >>> with quiet_loading():
    ...     pass
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Without transformers' "Loading weights" progress bar (edkm's loaders print one line or nothing);
    restored after."""
    # deferred: transformers is the hf extra, loaded only when a Hugging Face model is loaded
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
