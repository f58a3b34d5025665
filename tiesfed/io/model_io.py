"""Model I/O: read and write Hugging Face style safetensors models a tensor at a time.

The code lives in modules with one job each: `safetensors_format` (dtype
tables, header parsing, `TensorInfo`, `ModelError`), `reader` (`ModelReader`,
fingerprint), `torch_bin` (PyTorch checkpoints), `compat` (whether a model fits
its base) and `writer` (`ShardedWriter`, shard layout, side files). This module keeps the one import path the rest of tiesfed uses.
"""

from __future__ import annotations

from tiesfed.io.compat import check_compatible, mergeable
from tiesfed.io.reader import ModelReader, fingerprint
from tiesfed.io.safetensors_format import (
    DEFAULT_SHARD_BYTES,
    DTYPE_TO_ST,
    FLOAT_DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    ST_TO_DTYPE,
    ModelError,
    TensorInfo,
)
from tiesfed.io.writer import (
    WEIGHT_SUFFIXES,
    ShardedWriter,
    check_out_dir,
    copy_side_files,
    existing_outputs,
    pack_shards,
    shard_name,
)

__all__ = [
    "ModelError",
    "TensorInfo",
    "ModelReader",
    "check_compatible",
    "fingerprint",
    "ShardedWriter",
    "copy_side_files",
    "check_out_dir",
    "existing_outputs",
    "SINGLE_FILE",
    "INDEX_FILE",
    "shard_name",
    "DTYPE_TO_ST",
    "ST_TO_DTYPE",
    "FLOAT_DTYPES",
    "mergeable",
    "DEFAULT_SHARD_BYTES",
    "pack_shards",
    "WEIGHT_SUFFIXES",
]
