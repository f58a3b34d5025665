"""The demo model zoo: a base and its full fine-tunes, built once and cached.

`build_zoo` trains (once, then reuses a cache) a small MLP on scikit-learn's
bundled digits, the **base**, and fine-tunes a full copy of it separately on
several tasks, each the digits seen through a distinct input transformation
(mirrored left-right, mirrored top-bottom, rotated 90°, transposed). The base
is poor on every task and each fine-tuned model is good on its own, so how the
task vectors are merged visibly matters. Every model is written as a Hugging
Face style folder: ``model.safetensors`` (fp32) and a small ``config.json``.

Everything is deterministic in the seed and needs no network: the data is
``sklearn.datasets.load_digits``, which ships with scikit-learn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from tiesfed.demo.model import CONFIG, WEIGHTS, DigitsMLP, accuracy, model_config, save_model
from tiesfed.demo.tasks import TRANSFORMS, load_data, task_tensors
from tiesfed.demo.train import Optimizer, single_thread, train
from tiesfed.io.files import sha256_file, write_json_atomic

ZOO_VERSION = "demo-zoo-v1"
MARKER = "zoo.json"

Progress = Union[None, bool, Callable[[str], None]]


def emit(progress: Progress, msg: str) -> None:
    """Report `msg`: to stderr when `progress` is True, to the callable when one is given."""
    if progress is True:
        print(msg, file=sys.stderr, flush=True)
    elif callable(progress):
        progress(msg)


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines the zoo's bytes (besides the seed).

    The defaults are the demo's. `ZooSpec.small()` is a reduced zoo for tests.
    Pre-training uses Adam; fine-tuning uses SGD with momentum and a small
    learning rate on *all* weights, for a modest number of steps, so the task
    vectors are small and interfere the way real fine-tunes do.
    """

    hidden: tuple[int, ...] = (256, 256)
    tasks: tuple[str, ...] = ("hflip", "vflip", "rot90", "transpose")
    pretrain_task: str = "original"
    pretrain_steps: int = 1500
    pretrain_lr: float = 1e-3
    finetune_steps: int = 1200
    finetune_lr: float = 3e-3
    finetune_momentum: float = 0.9
    batch_size: int = 64
    split_fractions: tuple[float, float] = (0.6, 0.2)  # train, val; test is the rest

    @classmethod
    def small(cls) -> "ZooSpec":
        """A reduced zoo (3 tasks, 64-wide) that builds in about a second."""
        return cls(
            hidden=(64, 64),
            tasks=("hflip", "rot90", "transpose"),
            pretrain_steps=600,
            finetune_steps=400,
            finetune_lr=1e-2,
        )

    def __post_init__(self) -> None:
        unknown = [t for t in (*self.tasks, self.pretrain_task) if t not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TRANSFORMS)}")
        if len(set(self.tasks)) != len(self.tasks) or self.pretrain_task in self.tasks:
            raise ValueError("tasks must be distinct and differ from the pre-training task")

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (64, *self.hidden, 10)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def key(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


@dataclass(frozen=True)
class Zoo:
    """A built zoo: where its models live, and the data to score them on.

    `base` and `tasks[name]` are HF-style folders. `built` is True when this
    call trained the zoo and False when it reused the cache.
    """

    root: Path
    base: Path
    tasks: dict[str, Path]
    seed: int
    spec: ZooSpec
    built: bool = False
    build_seconds: float = 0.0
    manifest: dict = field(default_factory=dict, compare=False, repr=False)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def models(self) -> list[Path]:
        """The fine-tuned folders, in task order (what a merge takes)."""
        return [self.tasks[t] for t in self.tasks]

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return self.spec.layer_sizes

    def fingerprint(self) -> str:
        """sha256 over every file of the zoo (their recorded hashes, in order)."""
        files = self.manifest.get("files", {})
        blob = json.dumps(sorted(files.items())).encode()
        return hashlib.sha256(blob).hexdigest()

    def data(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (n, 64) fp32, labels (n,)) of one task on one split."""
        key = (task, split)
        if key not in self._cache:
            if "data" not in self._cache:
                self._cache["data"] = load_data(self.seed, self.spec.split_fractions)
            self._cache[key] = task_tensors(self._cache["data"], task, split)
        return self._cache[key]

    def evaluate(self, model_dir: Path, split: str = "test", tasks: Optional[Sequence[str]] = None) -> dict[str, float]:
        from tiesfed.demo.scoreboard import evaluate  # scoreboard imports Zoo

        return evaluate(model_dir, self, split, tasks=tasks)


def default_cache_root() -> Path:
    """$TIESFED_CACHE if set, else ~/.cache/tiesfed."""
    env = os.environ.get("TIESFED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tiesfed"


def default_zoo_dir(seed: int = 0, spec: Optional[ZooSpec] = None) -> Path:
    """<cache root>/demo-zoo-v1 for the default zoo; a suffixed sibling otherwise."""
    spec = spec or ZooSpec()
    name = ZOO_VERSION
    if seed != 0:
        name += f"-seed{seed}"
    if spec != ZooSpec():
        name += f"-{spec.key()}"
    return default_cache_root() / name


def _expected_manifest_head(seed: int, spec: ZooSpec) -> dict:
    return {"version": ZOO_VERSION, "seed": seed, "spec": spec.to_dict()}


def _valid_manifest(root: Path, seed: int, spec: ZooSpec) -> Optional[dict]:
    """The marker's content when the cached zoo is complete and intact, else None."""
    try:
        manifest = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    head = _expected_manifest_head(seed, spec)
    if any(manifest.get(k) != v for k, v in head.items()):
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or manifest.get("tasks") != list(spec.tasks):
        return None
    expected = {f"base/{WEIGHTS}", f"base/{CONFIG}"}
    expected |= {f"{t}/{n}" for t in spec.tasks for n in (WEIGHTS, CONFIG)}
    if set(files) != expected:
        return None
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file() or sha256_file(p) != digest:
            return None
    return manifest


def build_zoo(
    cache_dir: Optional[Path] = None,
    seed: int = 0,
    *,
    spec: Optional[ZooSpec] = None,
    force: bool = False,
    progress: Progress = None,
) -> Zoo:
    """Build the demo zoo into `cache_dir`, or reuse it when already there.

    Default folder: `default_zoo_dir(seed, spec)`, i.e. ``~/.cache/tiesfed/demo-zoo-v1``
    (the root is overridden by ``$TIESFED_CACHE``). The zoo is reused when its
    marker ``zoo.json`` matches this version, seed and spec and every file it
    lists is present with the recorded sha256; otherwise (or with `force`) it
    is trained again from scratch. Files are written atomically and the marker
    last, so an interrupted build is detected and redone.

    Layout: ``base/`` and one folder per task, each with model.safetensors and
    config.json.
    """
    spec = spec or ZooSpec()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_zoo_dir(seed, spec)
    base_dir = root / "base"
    task_dirs = {t: root / t for t in spec.tasks}

    manifest = None if force else _valid_manifest(root, seed, spec)
    if manifest is not None:
        emit(progress, f"zoo: reusing {root}")
        return Zoo(root, base_dir, task_dirs, seed, spec, built=False,
                   build_seconds=float(manifest.get("build_seconds", 0.0)), manifest=manifest)

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (root / MARKER).unlink()  # an interrupted rebuild must not look complete
    data = load_data(seed, spec.split_fractions)
    sizes = spec.layer_sizes
    accuracies: dict[str, dict[str, float]] = {}

    with single_thread():
        torch.manual_seed(seed)
        base = DigitsMLP(sizes)
        x, y = task_tensors(data, spec.pretrain_task, "train")
        train(base, x, y, spec.pretrain_steps, Optimizer(list(base.parameters()), "adam", spec.pretrain_lr),
              spec.batch_size, seed=seed * 1000 + 1)
        base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        save_model(base, base_dir, model_config(
            sizes, role="base", task=spec.pretrain_task, description=TRANSFORMS[spec.pretrain_task][1],
            seed=seed, steps=spec.pretrain_steps, optimizer="adam", lr=spec.pretrain_lr))
        accuracies["base"] = {t: accuracy(base, *task_tensors(data, t, "val")) for t in spec.tasks}
        emit(progress, f"zoo: base pre-trained on {spec.pretrain_task} ({time.perf_counter() - t0:.1f}s)")

        for j, task in enumerate(spec.tasks):
            model = DigitsMLP(sizes)
            model.load_state_dict(base_state)
            x, y = task_tensors(data, task, "train")
            opt = Optimizer(list(model.parameters()), "sgd", spec.finetune_lr, spec.finetune_momentum)
            train(model, x, y, spec.finetune_steps, opt, spec.batch_size, seed=seed * 1000 + 2 + j)
            save_model(model, task_dirs[task], model_config(
                sizes, role="fine-tuned", task=task, description=TRANSFORMS[task][1], base="../base",
                seed=seed, steps=spec.finetune_steps, optimizer="sgd", lr=spec.finetune_lr,
                momentum=spec.finetune_momentum, full_finetune=True))
            accuracies[task] = {t: accuracy(model, *task_tensors(data, t, "val")) for t in spec.tasks}
            emit(progress, f"zoo: fine-tuned {task} ({time.perf_counter() - t0:.1f}s)")

    files = {}
    for folder in ["base", *spec.tasks]:
        for name in (WEIGHTS, CONFIG):
            files[f"{folder}/{name}"] = sha256_file(root / folder / name)
    seconds = time.perf_counter() - t0
    manifest = {
        **_expected_manifest_head(seed, spec),
        "tasks": list(spec.tasks),
        "files": files,
        "val_accuracy": accuracies,
        "build_seconds": round(seconds, 3),
    }
    write_json_atomic(root / MARKER, manifest)
    emit(progress, f"zoo: built in {seconds:.1f}s at {root}")
    return Zoo(root, base_dir, task_dirs, seed, spec, built=True, build_seconds=seconds, manifest=manifest)
