"""The one error type a damaged, crafted or unsupported packed model is refused with."""


class FormatError(ValueError):
    """A packed edkm model (single file or Hugging Face folder) that cannot be loaded safely.

    The message names the file and the problem. Subclasses ``ValueError``, so ``except ValueError``
    and the CLI's one-line error handling catch it.

    Example:
        >>> from edkm.export import FormatError
        >>> issubclass(FormatError, ValueError)
        True
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever a library's error text held
