"""Regenerate the gRPC stubs of tiesfed/protos/v1/tiesfed.proto and secagg.proto.

    python -m tiesfed.protos.generate            # rewrite the committed stubs in place
    python -m tiesfed.protos.generate --out DIR  # write them under DIR instead (tests)

The stubs are committed (so installing tiesfed needs no grpcio-tools); a test
regenerates them into a temporary folder and checks they equal the committed
ones. protoc runs with the repository root as its only import root, so the
proto's path is its Python module path and the generated imports read
`from tiesfed.protos.v1 import ...`, inside the namespace, with no rewriting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ("tiesfed/protos/v1/tiesfed.proto", "tiesfed/protos/v1/secagg.proto")
#: per proto, in PROTOS' order: its _pb2.py, _pb2.pyi and _pb2_grpc.py
GENERATED = tuple(p.removesuffix(".proto") + suffix for p in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))


def generate(out_dir: str | Path = ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the generated files' paths."""
    from grpc_tools import protoc

    out = Path(out_dir).resolve()
    (out / Path(PROTOS[0]).parent).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(ROOT / p) for p in PROTOS),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    return [out / g for g in GENERATED]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT), help="root folder to write tiesfed/protos/v1/* under")
    a = p.parse_args(argv)
    for f in generate(a.out):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
