"""Write the data of each standard family (sd1, sd2, sdxl) into ``src/lorablend/naming/families``.

The models are built on the meta device from ``lorablend/naming/configs.py`` (whose numbers are those of the
published config.json files), so the names and shapes come from the real module trees; offline work then reads
the files instead of importing diffusers and transformers. Run it after changing ``configs.py``, ``index.py``'s
naming rules or the file format; ``tests/test_naming_family_data.py`` fails until the files agree.

    .venv/bin/python scripts/make_family_data.py            # rewrite the files
    .venv/bin/python scripts/make_family_data.py --check    # exit 1 when a file differs from the models
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

from lorablend.naming.family_data import dump_family_data, family_file_name, index_to_data
from lorablend.naming.standard import STANDARD_FAMILIES, build_standard_index

FAMILIES_DIR = Path(__file__).resolve().parents[1] / "src" / "lorablend" / "naming" / "families"


def made_by() -> str:
    """Where a family file comes from: this script and the library versions whose module trees it read."""
    return (f"scripts/make_family_data.py from lorablend/naming/configs.py on the meta device "
            f"(diffusers {version('diffusers')}, transformers {version('transformers')})")


def family_text(family: str) -> str:
    """The text of one family's file, regenerated from the meta-device models."""
    return dump_family_data(index_to_data(build_standard_index(family), made_by=made_by()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the files with the models, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for family in STANDARD_FAMILIES:
        path = FAMILIES_DIR / family_file_name(family)
        text = family_text(family)
        if args.check:
            old = json.loads(path.read_text()) if path.exists() else {}
            new = json.loads(text)
            if {k: v for k, v in old.items() if k != "made_by"} != {k: v for k, v in new.items() if k != "made_by"}:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"{path}: {len(json.loads(text)['modules'])} modules, {len(text):,} bytes")
    for path in stale:
        print(f"{path} differs from the models built from configs.py; run scripts/make_family_data.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
