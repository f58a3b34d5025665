"""Regenerate the README's demo table from a real `tiesfed demo` run.

    python benchmarks/demo_table.py            # run the demo, print the table block
    python benchmarks/demo_table.py --update-readme

`tiesfed demo` merges its zoo in federated rounds (mutual TLS on loopback, a Ray
of its own) and prints the accuracy table; this puts that table between the
README's `<!-- figures:demo -->` markers, so the README shows what the demo prints.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

try:  # as a script (benchmarks/ on sys.path) or as benchmarks.demo_table
    from figures import ROOT, update_readme
except ImportError:  # pragma: no cover
    from benchmarks.figures import ROOT, update_readme


def demo_block(output: str) -> str:
    """The table `tiesfed demo` printed: from its `method` header to the first blank line."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("method ")), None)
    if start is None:
        raise ValueError("no table in the demo's output (no line starting with 'method ')")
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "```\n" + "\n".join(lines[start:end]) + "\n```"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--update-readme", action="store_true", help="replace README.md's demo block")
    a = p.parse_args(argv)
    res = subprocess.run([sys.executable, "-m", "tiesfed.cli", "demo"], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        return res.returncode
    block = demo_block(res.stdout)
    print(block)
    if a.update_readme:
        changed = update_readme(ROOT / "README.md", {"demo": block})
        print("README.md: demo table " + ("updated" if changed else "unchanged"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
