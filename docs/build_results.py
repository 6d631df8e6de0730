"""Write docs/results.md from docs/results_template.md: each `<!-- table:NAME -->` becomes the table that
`recipes/compare.py --export docs/results/NAME` wrote (mean ± sd per method), each `<!-- runs:NAME -->` that export's
one-row-per-run table. The prose is the template's; no number in a table is typed by hand.

    python docs/build_results.py            # rewrite docs/results.md
    python docs/build_results.py --check    # exit 1 if docs/results.md is not what the template and exports give
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
MARKER = re.compile(r"<!-- (table|runs):([\w.-]+) -->")


def exported(kind: str, name: str) -> str:
    folder = DOCS / "results" / name
    record_path = folder / "EXPORTED.json"
    if not record_path.is_file():
        raise SystemExit(f"docs/results_template.md names {name!r}, but {folder} holds no export: run "
                         f"recipes/compare.py ... --export {folder}")
    record = json.loads(record_path.read_text())
    key = "table" if kind == "table" else "runs_table"
    if key not in record:
        raise SystemExit(f"{record_path} has no {key!r}: export it again with the current recipes/compare.py")
    return (folder / record[key]).read_text().rstrip("\n")


def render(template: str) -> str:
    return MARKER.sub(lambda match: exported(match.group(1), match.group(2)), template)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Compare instead of writing.")
    args = parser.parse_args(argv)
    text = render((DOCS / "results_template.md").read_text())
    target = DOCS / "results.md"
    if args.check:
        if target.read_text() != text:
            print(f"{target} differs from what docs/results_template.md and the exports give; run "
                  f"python docs/build_results.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
