"""``python -m edkm`` is the ``edkm`` command."""

from .cli import main

if __name__ == "__main__":
    main()
