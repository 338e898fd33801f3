"""Entry point of one measurement process: ``python -m edkm.bench._child SPEC_JSON RESULT_PATH``.

Started by :func:`edkm.bench.measure.launch` in a fresh interpreter (one per configuration, one per
rank for sharded configurations), so that the process's peak RSS (``VmHWM``) belongs to that
measurement alone. Kept apart from :mod:`edkm.bench.measure` so that ``-m`` runs a module the
package has not imported yet.
"""

from __future__ import annotations

import json
import sys

from edkm.bench.measure import measure_in_process


def main(argv: list[str]) -> int:
    spec_json, result_path = argv
    result = measure_in_process(json.loads(spec_json))
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
