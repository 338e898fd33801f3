"""``python -m edkm`` is the ``edkm`` command."""

from edkm.cli.main import main

if __name__ == "__main__":
    main()
