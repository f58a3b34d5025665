"""Parsing shared by the `tiesfed` command groups (click raises the usage errors)."""

from __future__ import annotations

import logging
from typing import Optional

import click
from pydantic import ValidationError


def parse_weights(weights: Optional[str], n: int) -> list[float]:
    if not weights:
        return [1.0] * n
    try:
        values = [float(w) for w in weights.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"weights must be numbers, got {weights!r}", param_hint="--weights") from None
    if len(values) != n:
        raise click.BadParameter(f"{len(values)} weights for {n} models", param_hint="--weights")
    return values


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise click.BadParameter(f"not a size: {text!r} (e.g. 2GB, 500MB)") from None
    if value <= 0:
        raise click.BadParameter("size must be positive")
    return int(value)


def check_device(device: str) -> str:
    """`--device` checked before any work: a device torch knows and this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise click.ClickException(f"--device {device}: not a device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise click.ClickException(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                                       f"{build}, {torch.cuda.device_count()} GPUs visible); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise click.ClickException(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                                       f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return device
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise click.ClickException(f"--device {device}: MPS (Apple GPU) is not available here; use --device cpu")
        return device
    raise click.ClickException(f"--device {device}: tiesfed runs on cpu, cuda or mps, not {dev.type}")


def device_option(ctx: click.Context, param: click.Parameter, value: str) -> str:  # noqa: ARG001
    """click callback of --device."""
    return check_device(value)


def target_option(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:  # noqa: ARG001
    """click callback of --target: HOST:PORT, or one line saying what is wrong (never a dial to :443)."""
    from tiesfed.protos.v1 import check_target

    if value is None:
        return value
    try:
        return check_target(value)
    except ValueError as e:
        raise click.ClickException(f"--{e}") from None  # "--target 'host' must be HOST:PORT (...)"


def log_to_stderr(level: int = logging.WARNING, name: str = "tiesfed") -> None:
    """Show tiesfed's log lines of `level` and above on stderr (e.g. a client's retries while its
    coordinator is unreachable); idempotent."""
    from tiesfed.cli.logs import StderrHandler  # writes to the current sys.stderr (CliRunner's too)

    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    ours = [h for h in logger.handlers if isinstance(h, StderrHandler)]
    if any(isinstance(h, StderrHandler) for h in logging.getLogger().handlers):  # `configure` ran: it prints them
        for h in ours:
            logger.removeHandler(h)
        return
    if not ours:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
        ours = [handler]
    ours[0].setLevel(level)


def flag_message(e: ValidationError, ctx: click.Context, fields: Optional[dict[str, str]] = None) -> str:
    """`validation_message`, naming the command-line flag of each bad field the user gave as a flag.

    `fields` maps a model field to the click parameter that sets it, where the names differ."""
    from tiesfed.core.options import validation_message

    fields = fields or {}
    flags = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p.name:
            src = ctx.get_parameter_source(p.name)
            if src in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT):
                flags[p.name] = max(p.opts, key=len)
    lines = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        name = fields.get(loc[0], loc[0]) if loc else ""
        where = flags[name] if len(loc) == 1 and name in flags else ".".join(loc) or "value"
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines) if lines else validation_message(e)
