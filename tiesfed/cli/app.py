"""`tiesfed` command line. click does the parsing; every option maps onto
MergeOptions, whose validation errors are shown as usage errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
from pydantic import ValidationError

from tiesfed.cli.common import device_option, flag_message, parse_size, parse_weights
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry
from tiesfed.io.merge_config import load_config
from tiesfed.io.mergekit_config import MergekitConfigError
from tiesfed.io.shard_size import parse_shard_size


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tiesfed")
def main() -> None:
    """Federated, distributed TIES-Merging."""


@main.command()
@click.argument("base", required=False)
@click.argument("models", nargs=-1)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="merge YAML: mergekit's format (merge_method: ...; mergekit's defaults and semantics) or "
              "tiesfed's own (method: ...; the paper's defaults)")
@click.option("--method", type=click.Choice(["ties", "task_arithmetic", "average", "dare_ties"]),
              help="merge method (default ties: trim, elect sign, disjoint mean)")
@click.option("--k", type=float, help="percent of each task vector kept (default 20)")
@click.option("--lambda", "lam", type=float, help="scale of the merged task vector (default 1.0)")
@click.option("--trim", type=click.Choice(["global", "tensor"]), help="trim scope (default global, the paper's)")
@click.option("--election", type=click.Choice(["mass", "count"]),
              help="sign election: by summed magnitude (default mass, the paper's) or by count of models")
@click.option("--zero-sign", type=click.Choice(["majority", "positive"]),
              help="sign where the vote ties: the whole model's majority (default, the paper's) or +1 "
              "(mergekit, peft)")
@click.option("--disjoint", type=click.Choice(["mean", "sum", "max"]),
              help="combine the values that agree with the elected sign (default mean)")
@click.option("--weights", help="one weight per model, comma separated")
@click.option("--weight-semantics", type=click.Choice(["mergekit", "peft"]),
              help="with --weights: mergekit (default) divides by the agreeing models' weights; peft elects "
              "on the unweighted values, then weights them")
@click.option("--min-support", type=int, help="publish only where at least this many models agree")
@click.option("--seed", type=int, help="DARE seed")
@click.option("--value-dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="dtype of the trimmed task-vector values (default: the model's own)")
@click.option("--keep-base", multiple=True, help="glob of tensors left at the base value (repeatable)")
@click.option("--sparsifier", type=click.Choice(["magnitude", "dare", "breadcrumbs", "della"]),
              help="mergekit's sparsifier instead of the trim of ties, task_arithmetic or average (whole tensors)")
@click.option("--rescale/--no-rescale", default=None, help="with --sparsifier: survivors scaled to the tensor's L1 norm")
@click.option("--gamma", type=float, help="breadcrumbs: share of the largest |τ| dropped (default 0.01)")
@click.option("--epsilon", type=float, help="della: keep probability spread around the density (default 0.15)")
@click.option("--device", default="cpu", show_default=True, callback=device_option,
              help="where to trim and fold: cpu, cuda, cuda:N or mps")
@click.option("--shard-size", default="5GB", show_default=True,
              help="largest output shard: 5GB, 500MB, 5GiB, 1e9 (bytes), or mergekit's 5B, 500M, 10K (billions, "
              "millions, thousands of bytes)")
@click.option("--allow-architecture-mismatch", is_flag=True,
              help="merge models whose config.json names another architecture than the base's (e.g. model_type, "
              "hidden_size); the error without it lists what differs")
@click.option("--vocab", type=click.Choice(["base", "union"]),
              help="base: a fine-tune whose vocabulary grew (tokens appended after the base's, embeddings resized) is "
              "read at the base's rows, its added tokens dropped (mergekit's tokenizer_source: base); union: the "
              "output also grows the rows of the tokens one fine-tune appended, its rows (mergekit's union)")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write the report as JSON")
@click.option("--overwrite", is_flag=True, help="replace the weights of an existing output folder")
@click.option("--max-memory", help="memory budget for tensor data, e.g. 4GB (default: half the machine's); "
              "a tensor that does not fit is streamed in blocks, with the same result")
@click.option("--upload-size", is_flag=True,
              help="also encode each model's contribution as a client would upload it, to report its size "
                   "(bits/param; one more pass per model)")
@click.option("--lora-rank", type=click.IntRange(min=1),
              help="also write the merge as a peft LoRA adapter of this rank (truncated SVD of the merged ΔW per "
              "target module of the LoRA inputs)")
@click.option("--lora-out", type=click.Path(file_okay=False),
              help="folder of the --lora-rank adapter (default: OUT/adapter)")
@click.option("--random-seed", type=int,
              help="mergekit-yaml's --random-seed: DARE and DELLA draw mergekit's own masks, so the merge equals "
                   "mergekit's (Llama, Mistral, Qwen2, GPT-2; refused where mergekit's order cannot be replayed)")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
def merge(base, models, out_dir, config_path, weights, device, shard_size, allow_architecture_mismatch, vocab,
          report_path, overwrite, max_memory, upload_size, lora_rank, lora_out, random_seed, quiet, **opts) -> None:
    """Merge fine-tuned MODELS of BASE locally (same pipeline as the federated path)."""
    from tiesfed.engine import merge as run_merge

    given = {k: v for k, v in opts.items() if v is not None and v != ()}
    try:
        shard_bytes = parse_shard_size(shard_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--shard-size") from None
    try:
        if config_path:
            cfg = load_config(config_path)
            if base or models:
                raise click.UsageError("give either --config or BASE MODELS..., not both")
            if given:
                cfg = cfg.model_copy(update={"options": cfg.options.model_copy(update=given)})
                MergeOptions.model_validate(cfg.options.model_dump())
        else:
            if not base or not models:
                raise click.UsageError("need BASE and at least one fine-tuned model (or --config)")
            ws = parse_weights(weights, len(models))
            cfg = MergeConfig(
                base_model=base,
                models=[ModelEntry(model=m, weight=w) for m, w in zip(models, ws)],
                options=MergeOptions(**given),
            )
    except ValidationError as e:
        raise click.UsageError(flag_message(e, click.get_current_context(), {"lambda": "lam"})) from None
    except MergekitConfigError as e:
        raise click.UsageError(f"{config_path}: {e}") from None
    if vocab:
        cfg = cfg.model_copy(update={"vocab": vocab})
    try:
        report = run_merge(
            cfg, out_dir, device=device, shard_bytes=shard_bytes, progress=not quiet,
            report_path=report_path, overwrite=overwrite, measure_upload=upload_size,
            max_memory=parse_size(max_memory) if max_memory else None, source_config=config_path,
            allow_architecture_mismatch=allow_architecture_mismatch, lora_rank=lora_rank, lora_out=lora_out,
            random_seed=random_seed,
        )
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(report.format())


@main.command()
@click.option("--local", is_flag=True, help="merge in-process instead of a federated round on loopback")
@click.option("--no-ray", is_flag=True, help="federated, but with the in-process aggregator instead of Ray actors")
@click.option("--cache", type=click.Path(file_okay=False), help="cache root of the demo model zoo")
@click.option("--seed", default=0, show_default=True, help="seed of the zoo")
def demo(local: bool, no_ray: bool, cache: Optional[str], seed: int) -> None:
    """Build a small model zoo (once), merge it, and print per-task accuracy.

    By default every merge is a real federated round: a coordinator sharded
    over a local Ray and one client per task, over gRPC on loopback.
    """
    from tiesfed.demo import run_demo
    from tiesfed.demo.merge import FederatedDemo, local_merge_fn

    if local:
        run_demo(local_merge_fn, Path(cache) if cache else None, seed, progress=True)
        return
    fed = FederatedDemo(use_ray=not no_ray)
    try:
        run_demo(fed, Path(cache) if cache else None, seed, progress=True)
    finally:
        fed.close()
    click.echo(fed.summary())


from tiesfed.cli.federated import register  # noqa: E402  (the federated groups join the same CLI)
from tiesfed.cli.pki import pki  # noqa: E402

register(main)
main.add_command(pki)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
