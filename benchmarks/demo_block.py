"""The demo's comparison table in README.md (block `demo`), made by running the demo through the API.

    python benchmarks/demo_block.py [--cache DIR]

The table is the one `featcache compare` writes to compare.md (the dataset and protocol columns, the
same for every row, left out), so the README's numbers are what the code gives, not copied by hand.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from docs_blocks import replace_block

import featcache as fc

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        runs = fc.demo(cache=cache, quiet=True)
        comparison = fc.compare(cache=cache, runs=[r.path for r in runs])
        table = comparison.to_pandas()
        files = comparison.write(Path(tmp) / "out")
        lines = files["md"].read_text().splitlines()
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        keep = [i for i, name in enumerate(header) if name not in ("dataset", "protocol", "run folder")]
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
        text = ["| " + " | ".join(header[i] for i in keep) + " |", "|" + "---|" * len(keep)]
        text += ["| " + " | ".join(row[i] for i in keep) + " |" for row in rows]
        replace_block(REPO / "README.md", "demo", "\n".join(text))
        print("\n".join(text))
        print(f"{len(table)} rows; protocol: {table['protocol'].iloc[0]}")


if __name__ == "__main__":
    main()
