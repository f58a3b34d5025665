"""The embedded default demo: a small, real model zoo and a merge scoreboard.

`build_zoo` trains (once, then reuses a cache) a small MLP on scikit-learn's
bundled digits, the **base**, and fine-tunes a full copy of it separately on
several tasks, each the digits seen through a distinct input transformation
(mirrored left-right, mirrored top-bottom, rotated 90°, transposed). The base
is poor on every task and each fine-tuned model is good on its own, so how the
task vectors are merged visibly matters. Every model is written as a Hugging
Face style folder: ``model.safetensors`` (fp32) and a small ``config.json``.

`scoreboard` then scores the usual lines of the TIES paper's tables (the base,
the individual fine-tuned models, averaging, task arithmetic, TIES) on the
test split, picking λ for task arithmetic and TIES on the validation split.
The merge itself is injected (`merge_fn`), so the same scoreboard serves the
real engine, the federated deployment and a dense reference in the tests.

Everything is deterministic in the seed and needs no network: the data is
``sklearn.datasets.load_digits``, which ships with scikit-learn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

ZOO_VERSION = "demo-zoo-v1"
MARKER = "zoo.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SPLITS = ("train", "val", "test")

MergeFn = Callable[[Path, list, str, float, Path], Path]
Progress = Union[None, bool, Callable[[str], None]]


# --------------------------------------------------------------------------- tasks

def _hflip(x: np.ndarray) -> np.ndarray:
    return x[:, :, ::-1]


def _vflip(x: np.ndarray) -> np.ndarray:
    return x[:, ::-1, :]


def _rot90(x: np.ndarray) -> np.ndarray:
    return np.rot90(x, 1, axes=(1, 2))


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 1)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _invert(x: np.ndarray) -> np.ndarray:
    return 1.0 - x


# name -> (transform on (n, 8, 8) images in [0, 1], description)
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "original": (_identity, "the digits as they are (the base's pre-training task)"),
    "hflip": (_hflip, "digits mirrored left-right"),
    "vflip": (_vflip, "digits mirrored top-bottom"),
    "rot90": (_rot90, "digits rotated 90 degrees counter-clockwise"),
    "transpose": (_transpose, "digits transposed (mirrored about the main diagonal)"),
    "invert": (_invert, "digits with inverted intensities (1 - x)"),
}


# --------------------------------------------------------------------------- spec

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


# --------------------------------------------------------------------------- model

class DigitsMLP(nn.Module):
    """64 → hidden… → 10 with ReLU; tensors named fc1.weight, fc1.bias, …"""

    def __init__(self, layer_sizes: Sequence[int]):
        super().__init__()
        self.layer_sizes = tuple(int(s) for s in layer_sizes)
        self.n_layers = len(self.layer_sizes) - 1
        for i in range(self.n_layers):
            self.add_module(f"fc{i + 1}", nn.Linear(self.layer_sizes[i], self.layer_sizes[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_layers):
            x = getattr(self, f"fc{i + 1}")(x)
            if i < self.n_layers - 1:
                x = F.relu(x)
        return x


def model_config(layer_sizes: Sequence[int], **demo: object) -> dict:
    return {
        "model_type": "tiesfed_digits_mlp",
        "architectures": ["DigitsMLP"],
        "layer_sizes": list(layer_sizes),
        "activation": "relu",
        "torch_dtype": "float32",
        "tiesfed_demo": demo,
    }


def _read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, or every shard of an index."""
    single = model_dir / WEIGHTS
    if single.is_file():
        return load_file(str(single))
    index = model_dir / f"{WEIGHTS}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for name in shards:
        state.update(load_file(str(model_dir / name)))
    return state


def load_model(model_dir: Path, layer_sizes: Optional[Sequence[int]] = None) -> DigitsMLP:
    """Load a safetensors folder into a DigitsMLP (fp32, eval mode).

    The architecture comes from the folder's config.json when it has one,
    else from `layer_sizes` (e.g. a merged folder written without a config).
    """
    model_dir = Path(model_dir)
    cfg_path = model_dir / CONFIG
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if "layer_sizes" in cfg:
            layer_sizes = cfg["layer_sizes"]
    if layer_sizes is None:
        raise ValueError(f"{model_dir} has no config.json with layer_sizes and none was given")
    model = DigitsMLP(layer_sizes)
    state = {k: v.to(torch.float32) for k, v in _read_state(model_dir).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- data

@dataclass(frozen=True)
class _Data:
    images: np.ndarray  # (n, 8, 8) float32 in [0, 1]
    labels: np.ndarray  # (n,) int64
    split: dict[str, np.ndarray]  # split name -> indices


def _load_data(seed: int, fractions: tuple[float, float]) -> _Data:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    n = len(labels)
    perm = np.random.RandomState(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    split = {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train:n_train + n_val]),
        "test": np.sort(perm[n_train + n_val:]),
    }
    return _Data(images, labels, split)


def _task_tensors(data: _Data, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    idx = data.split[split]
    fn = TRANSFORMS[task][0]
    x = np.ascontiguousarray(fn(data.images[idx]), dtype=np.float32).reshape(len(idx), 64)
    return torch.from_numpy(x), torch.from_numpy(data.labels[idx].copy())


# --------------------------------------------------------------------------- zoo

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
                self._cache["data"] = _load_data(self.seed, self.spec.split_fractions)
            self._cache[key] = _task_tensors(self._cache["data"], task, split)
        return self._cache[key]

    def evaluate(self, model_dir: Path, split: str = "test", tasks: Optional[Sequence[str]] = None) -> dict[str, float]:
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_json(path: Path, obj: object) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    _write_atomic(path, lambda p: p.write_text(text))


def _save_model(model: DigitsMLP, folder: Path, config: dict) -> None:
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    _write_atomic(folder / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    _write_json(folder / CONFIG, config)


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
        if not p.is_file() or _sha256(p) != digest:
            return None
    return manifest


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Train on one thread: bit-identical results whatever the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Optimizer:
    """Plain Adam / SGD-with-momentum on a list of tensors.

    Hand-written (the textbook update rules, as torch.optim's defaults) so the
    zoo build does not pay torch.optim's multi-second first-use import of
    torch._dynamo, and so the arithmetic is fixed by this file alone.
    """

    def __init__(self, params: list, kind: str, lr: float, momentum: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.kind, self.lr, self.momentum, self.betas, self.eps = params, kind, lr, momentum, betas, eps
        self.buf = [torch.zeros_like(p) for p in params]
        self.sq = [torch.zeros_like(p) for p in params] if kind == "adam" else []
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for i, p in enumerate(self.params):
            g = p.grad
            if self.kind == "sgd":
                buf = self.buf[i]
                if self.t == 1:
                    buf.copy_(g)
                else:
                    buf.mul_(self.momentum).add_(g)
                p.add_(buf, alpha=-self.lr)
            else:
                b1, b2 = self.betas
                m, v = self.buf[i], self.sq[i]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.t))
            p.grad = None


def _train(
    model: DigitsMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    optimizer: _Optimizer,
    batch_size: int,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
    model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).to(torch.float64).mean().item())


def _emit(progress: Progress, msg: str) -> None:
    if progress is True:
        print(msg, file=sys.stderr, flush=True)
    elif callable(progress):
        progress(msg)


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
        _emit(progress, f"zoo: reusing {root}")
        return Zoo(root, base_dir, task_dirs, seed, spec, built=False,
                   build_seconds=float(manifest.get("build_seconds", 0.0)), manifest=manifest)

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (root / MARKER).unlink()  # an interrupted rebuild must not look complete
    data = _load_data(seed, spec.split_fractions)
    sizes = spec.layer_sizes
    accuracies: dict[str, dict[str, float]] = {}

    with _single_thread():
        torch.manual_seed(seed)
        base = DigitsMLP(sizes)
        x, y = _task_tensors(data, spec.pretrain_task, "train")
        _train(base, x, y, spec.pretrain_steps, _Optimizer(list(base.parameters()), "adam", spec.pretrain_lr),
               spec.batch_size, seed=seed * 1000 + 1)
        base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        _save_model(base, base_dir, model_config(
            sizes, role="base", task=spec.pretrain_task, description=TRANSFORMS[spec.pretrain_task][1],
            seed=seed, steps=spec.pretrain_steps, optimizer="adam", lr=spec.pretrain_lr))
        accuracies["base"] = {t: _accuracy(base, *_task_tensors(data, t, "val")) for t in spec.tasks}
        _emit(progress, f"zoo: base pre-trained on {spec.pretrain_task} ({time.perf_counter() - t0:.1f}s)")

        for j, task in enumerate(spec.tasks):
            model = DigitsMLP(sizes)
            model.load_state_dict(base_state)
            x, y = _task_tensors(data, task, "train")
            opt = _Optimizer(list(model.parameters()), "sgd", spec.finetune_lr, spec.finetune_momentum)
            _train(model, x, y, spec.finetune_steps, opt, spec.batch_size, seed=seed * 1000 + 2 + j)
            _save_model(model, task_dirs[task], model_config(
                sizes, role="fine-tuned", task=task, description=TRANSFORMS[task][1], base="../base",
                seed=seed, steps=spec.finetune_steps, optimizer="sgd", lr=spec.finetune_lr,
                momentum=spec.finetune_momentum, full_finetune=True))
            accuracies[task] = {t: _accuracy(model, *_task_tensors(data, t, "val")) for t in spec.tasks}
            _emit(progress, f"zoo: fine-tuned {task} ({time.perf_counter() - t0:.1f}s)")

    files = {}
    for folder in ["base", *spec.tasks]:
        for name in (WEIGHTS, CONFIG):
            files[f"{folder}/{name}"] = _sha256(root / folder / name)
    seconds = time.perf_counter() - t0
    manifest = {
        **_expected_manifest_head(seed, spec),
        "tasks": list(spec.tasks),
        "files": files,
        "val_accuracy": accuracies,
        "build_seconds": round(seconds, 3),
    }
    _write_json(root / MARKER, manifest)
    _emit(progress, f"zoo: built in {seconds:.1f}s at {root}")
    return Zoo(root, base_dir, task_dirs, seed, spec, built=True, build_seconds=seconds, manifest=manifest)


# --------------------------------------------------------------------------- evaluation

def evaluate(
    model_dir: Path,
    zoo: Zoo,
    split: str = "test",
    *,
    tasks: Optional[Sequence[str]] = None,
) -> dict[str, float]:
    """Accuracy of the model in `model_dir` on every task of the zoo (or `tasks`)."""
    model = load_model(Path(model_dir), zoo.layer_sizes)
    out = {}
    with torch.no_grad():
        for task in tasks or zoo.task_names:
            out[task] = _accuracy(model, *zoo.data(task, split))
    return out


# --------------------------------------------------------------------------- scoreboard

DEFAULT_LAMBDAS: dict[str, tuple[float, ...]] = {
    "task_arithmetic": (0.1, 0.3, 0.5, 0.7, 1.0),
    "ties": (0.3, 0.6, 1.0, 1.5, 2.0),
}

LABELS = {
    "base": "pre-trained base",
    "individual": "fine-tuned (individual)",
    "average": "averaging",
    "task_arithmetic": "task arithmetic",
    "ties": "TIES",
}


@dataclass
class Row:
    method: str
    label: str
    test: dict[str, float]
    lam: Optional[float] = None
    val_average: Optional[float] = None
    sweep: dict[float, float] = field(default_factory=dict)  # λ -> average val accuracy

    @property
    def average(self) -> float:
        return float(sum(self.test.values()) / len(self.test))


@dataclass
class Table:
    tasks: list[str]
    rows: list[Row]
    merges: int = 0
    merge_seconds: float = 0.0
    seconds: float = 0.0

    def row(self, method: str) -> Row:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(method)

    def __getitem__(self, method: str) -> Row:
        return self.row(method)


def _grid(lambdas: Union[None, Sequence[float], Mapping[str, Sequence[float]]], method: str) -> tuple[float, ...]:
    if lambdas is None:
        grid = DEFAULT_LAMBDAS[method]
    elif isinstance(lambdas, Mapping):
        grid = lambdas.get(method, DEFAULT_LAMBDAS[method])
    else:
        grid = lambdas
    grid = tuple(float(v) for v in grid)
    if not grid:
        raise ValueError(f"empty λ grid for {method}")
    return grid


def _mean(d: Mapping[str, float]) -> float:
    return float(sum(d.values()) / len(d))


def scoreboard(
    zoo: Zoo,
    merge_fn: MergeFn,
    lambdas: Union[None, Sequence[float], Mapping[str, Sequence[float]]] = None,
    progress: Progress = None,
    *,
    methods: Sequence[str] = ("average", "task_arithmetic", "ties"),
    work_dir: Optional[Path] = None,
) -> Table:
    """Per-task test accuracy of the base, the fine-tuned models and each merge.

    `merge_fn(base_dir, model_dirs, method, lam, out_dir) -> merged_dir` does a
    merge ("average", "task_arithmetic" or "ties") into `out_dir` and returns
    the folder holding the merged weights. For task arithmetic and TIES every
    λ of the grid is merged and the one with the best average *validation*
    accuracy is reported on the test split (ties → the first in the grid).
    `lambdas`: None (DEFAULT_LAMBDAS), one grid for both, or {method: grid}.
    Merged folders go under `work_dir` (a temporary folder, removed, if None).
    """
    t0 = time.perf_counter()
    tasks = zoo.task_names
    rows: list[Row] = []
    merges = 0
    merge_seconds = 0.0

    base_test = evaluate(zoo.base, zoo, "test")
    rows.append(Row("base", LABELS["base"], base_test, val_average=_mean(evaluate(zoo.base, zoo, "val"))))
    own_test = {t: evaluate(zoo.tasks[t], zoo, "test", tasks=[t])[t] for t in tasks}
    own_val = {t: evaluate(zoo.tasks[t], zoo, "val", tasks=[t])[t] for t in tasks}
    rows.append(Row("individual", LABELS["individual"], own_test, val_average=_mean(own_val)))
    _emit(progress, f"scoreboard: base {_mean(base_test):.3f}, fine-tuned {_mean(own_test):.3f} (test avg)")

    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tiesfed-demo-")
        work = Path(tmp.name)
    else:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        for method in methods:
            grid = (1.0,) if method == "average" else _grid(lambdas, method)
            sweep: dict[float, float] = {}
            best: Optional[tuple[float, float, Path]] = None
            for lam in grid:
                out_dir = work / f"{method}-lam{lam:g}"
                if out_dir.exists():
                    shutil.rmtree(out_dir)
                m0 = time.perf_counter()
                merged = merge_fn(zoo.base, list(zoo.models), method, lam, out_dir)
                merge_seconds += time.perf_counter() - m0
                merges += 1
                merged = Path(merged) if merged is not None else out_dir
                val = _mean(evaluate(merged, zoo, "val"))
                sweep[lam] = val
                _emit(progress, f"scoreboard: {method} λ={lam:g} val avg {val:.3f}")
                if best is None or val > best[0]:
                    best = (val, lam, merged)
            assert best is not None
            val, lam, merged = best
            test = evaluate(merged, zoo, "test")
            rows.append(Row(method, LABELS.get(method, method), test,
                            lam=None if method == "average" else lam, val_average=val,
                            sweep=sweep if method != "average" else {}))
            _emit(progress, f"scoreboard: {method} test avg {_mean(test):.3f}"
                  + ("" if method == "average" else f" at λ={lam:g}"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return Table(tasks, rows, merges=merges, merge_seconds=merge_seconds, seconds=time.perf_counter() - t0)


def format_table(table: Table, digits: int = 1) -> str:
    """Aligned text: one row per method, a λ column, accuracy in % per task and average."""
    header = ["method", "λ", *table.tasks, "average"]
    body = []
    for r in table.rows:
        lam = "-" if r.lam is None else f"{r.lam:g}"
        cells = [f"{100 * r.test[t]:.{digits}f}" for t in table.tasks]
        body.append([r.label, lam, *cells, f"{100 * r.average:.{digits}f}"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def table_to_dict(table: Table) -> dict:
    return {
        "tasks": list(table.tasks),
        "rows": [
            {
                "method": r.method,
                "label": r.label,
                "lambda": r.lam,
                "test": {t: r.test[t] for t in table.tasks},
                "average": r.average,
                "val_average": r.val_average,
                "sweep": {f"{k:g}": v for k, v in r.sweep.items()},
            }
            for r in table.rows
        ],
        "merges": table.merges,
        "merge_seconds": round(table.merge_seconds, 3),
        "seconds": round(table.seconds, 3),
    }


def table_to_json(table: Table, indent: Optional[int] = 2) -> str:
    """The table as JSON text (see `table_to_dict` for the shape)."""
    return json.dumps(table_to_dict(table), indent=indent, ensure_ascii=False)


def run_demo(
    merge_fn: MergeFn,
    cache_dir: Optional[Path] = None,
    seed: int = 0,
    *,
    spec: Optional[ZooSpec] = None,
    lambdas: Union[None, Sequence[float], Mapping[str, Sequence[float]]] = None,
    progress: Progress = None,
    out: Callable[[str], None] = print,
) -> Table:
    """Build (or reuse) the zoo, run the scoreboard, print the table and the timings."""
    t0 = time.perf_counter()
    zoo = build_zoo(cache_dir, seed, spec=spec, progress=progress)
    t_zoo = time.perf_counter() - t0
    table = scoreboard(zoo, merge_fn, lambdas, progress)
    out(format_table(table))
    how = f"built in {zoo.build_seconds:.1f}s" if zoo.built else f"reused from cache ({t_zoo:.2f}s)"
    out(f"\nzoo: {len(zoo.tasks)} tasks, {how}; scoreboard: {table.merges} merges in "
        f"{table.merge_seconds:.1f}s, {table.seconds:.1f}s in all; total {time.perf_counter() - t0:.1f}s")
    return table
