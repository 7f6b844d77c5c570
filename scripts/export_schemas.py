#!/usr/bin/env python3
"""Write schemas/*.json from the wire models (the only way those files change).

Usage: scripts/export_schemas.py [--check]
With --check, exit 1 when a committed file differs from the models.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.core.wire import WIRE_MODELS, json_schema_text  # noqa: E402


def main(argv: list[str]) -> int:
    check = "--check" in argv
    out = ROOT / "schemas"
    out.mkdir(exist_ok=True)
    stale = []
    for name, model in WIRE_MODELS.items():
        path = out / f"{name}.json"
        text = json_schema_text(model)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"schemas out of date: {', '.join(stale)}; run scripts/export_schemas.py")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
