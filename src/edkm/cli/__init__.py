"""The ``edkm`` command line: parsers, one module per command, rendering; the only place argparse is used."""
