"""The embedded default demo: a small, real model zoo and a merge scoreboard.

Split by job: `tasks` (the digits and their transforms), `model` (DigitsMLP and
its folder format), `train`, `zoo` (building and caching), `scoreboard`, `run`;
`merge` holds the merge back ends. The public names are re-exported here.
"""

from tiesfed.demo.model import DigitsMLP, load_model, model_config
from tiesfed.demo.run import run_demo
from tiesfed.demo.scoreboard import (
    DEFAULT_LAMBDAS,
    LABELS,
    MergeFn,
    Row,
    Table,
    evaluate,
    format_table,
    scoreboard,
    table_to_dict,
    table_to_json,
)
from tiesfed.demo.tasks import SPLITS, TRANSFORMS
from tiesfed.demo.zoo import ZOO_VERSION, Progress, Zoo, ZooSpec, build_zoo, default_cache_root, default_zoo_dir

__all__ = [
    "DEFAULT_LAMBDAS",
    "LABELS",
    "SPLITS",
    "TRANSFORMS",
    "ZOO_VERSION",
    "DigitsMLP",
    "MergeFn",
    "Progress",
    "Row",
    "Table",
    "Zoo",
    "ZooSpec",
    "build_zoo",
    "default_cache_root",
    "default_zoo_dir",
    "evaluate",
    "format_table",
    "load_model",
    "model_config",
    "run_demo",
    "scoreboard",
    "table_to_dict",
    "table_to_json",
]
