"""The demo's two merge back ends: the local engine, or a real federated round
on loopback (coordinator + one gRPC client per task, Ray-sharded aggregator)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry


def _config(base_dir: Path, model_dirs: list[Path], method: str, lam: float) -> MergeConfig:
    return MergeConfig(
        base_model=str(base_dir),
        models=[ModelEntry(model=str(p)) for p in model_dirs],
        options=MergeOptions(method=method, lam=lam),
    )


def local_merge_fn(base_dir: Path, model_dirs: list[Path], method: str, lam: float, out_dir: Path) -> Path:
    """One merge through the in-process engine."""
    from tiesfed.engine import merge

    merge(_config(base_dir, model_dirs, method, lam), out_dir, progress=False)
    return out_dir


@dataclass
class FederatedDemo:
    """Each merge is a federated round over gRPC on loopback; one Ray session
    serves every round. Keeps the bytes on the wire for the summary."""

    use_ray: bool = True
    rounds: int = 0
    wire_bytes: int = 0
    upload_bytes: int = 0
    download_bytes: int = 0
    dense_fp32_bytes: int = 0
    seconds: float = 0.0
    by_method: dict[str, list[int]] = field(default_factory=dict)  # method -> [wire bytes, dense fp32 bytes]
    _factory: object = field(default=None, init=False, repr=False)

    def __call__(self, base_dir: Path, model_dirs: list[Path], method: str, lam: float, out_dir: Path) -> Path:
        from tiesfed.federated_merge import federated_merge

        if self.use_ray and self._factory is None:
            from tiesfed.coordinator.ray_factory import RayAggregatorFactory

            self._factory = RayAggregatorFactory()
        res = federated_merge(
            _config(base_dir, model_dirs, method, lam), out_dir, aggregator_factory=self._factory,
            round_id=f"demo-{self.rounds}",
        )
        self.rounds += 1
        self.wire_bytes += res.wire_bytes
        self.upload_bytes += res.upload_bytes
        self.download_bytes += res.download_bytes
        self.dense_fp32_bytes += res.dense_fp32_bytes
        self.seconds += res.wall_seconds
        per = self.by_method.setdefault(method, [0, 0])
        per[0] += res.wire_bytes
        per[1] += res.dense_fp32_bytes
        return out_dir

    def close(self) -> None:
        if self._factory is not None:
            self._factory.close()
            self._factory = None

    def summary(self) -> str:
        share = 100 * self.wire_bytes / max(self.dense_fp32_bytes, 1)
        return (
            f"federated: {self.rounds} rounds over gRPC on loopback"
            f"{' with a Ray-sharded coordinator' if self.use_ray else ''}, {self.seconds:.1f} s; "
            f"bytes on the wire {self.wire_bytes:,} (uploads {self.upload_bytes:,}, downloads "
            f"{self.download_bytes:,}) = {share:.1f}% of shipping the fine-tuned models as dense fp32 "
            f"({self.dense_fp32_bytes:,}); per method: "
            + ", ".join(f"{m} {100 * w / max(d, 1):.1f}%" for m, (w, d) in self.by_method.items())
        )
