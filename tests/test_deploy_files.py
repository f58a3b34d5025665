"""Static checks of deploy/ (no container engine, no network, no cluster).

Every file is parsed (PyYAML; Dockerfiles line by line), every `tiesfed ...` and
`ray ...` command line in them is checked against the real click command trees
(subcommands, options, values of typed options, required options, arguments), and
the files are checked against each other: certificate, CRL, token, spool and base
paths resolve through the volumes and mounts to what the pki job writes (or the
Secret holds); service names, hosts and ports agree; every Ray node mounts the
spool and the base at the coordinator's paths (the parallel model write); the
images, Ray and torch versions agree; what the Dockerfiles COPY exists and is not
left out by their .dockerignore. The checks return lists of problems, so the tests
at the end can break each file on purpose and see the problem named.
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

import click
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yml"
K8S_DIR = DEPLOY / "k8s"
RAY_CLUSTER_FILE = DEPLOY / "ray" / "cluster.yaml"
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}
README = DEPLOY / "README.md"

TORCH_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEX = re.compile(r"https://download\.pytorch\.org/whl/cu\d+")
DEFAULT_RAY_PORT = 6379


# ============================================================== command lines


def _tiesfed_cli() -> click.Command:
    from tiesfed.cli import main

    return main


def _ray_cli() -> click.Command:
    from ray.scripts.scripts import cli

    return cli


@dataclass
class Invocation:
    """One command line parsed against a click tree."""

    argv: list[str]
    path: tuple[str, ...] = ()  # subcommand names, e.g. ("coordinator", "serve")
    command: Optional[click.Command] = None
    values: dict[str, list] = field(default_factory=dict)  # param.name -> values given
    args: list[str] = field(default_factory=list)  # positional arguments
    problems: list[str] = field(default_factory=list)

    def opt(self, flag: str) -> Optional[str]:
        """The (last) value given for `flag`, or None."""
        vals = self.opts(flag)
        return vals[-1] if vals else None

    def opts(self, flag: str) -> list:
        p = _find_param(self.command, flag) if self.command else None
        return self.values.get(p.name, []) if p else []


def _params(cmd: click.Command) -> list[click.Parameter]:
    return cmd.get_params(click.Context(cmd))  # with --help


def _find_param(cmd: click.Command, flag: str) -> Optional[click.Option]:
    for p in _params(cmd):
        if isinstance(p, click.Option) and (flag in p.opts or flag in p.secondary_opts):
            return p
    return None


def _value_problems(where: str, flag: str, param: click.Parameter, value: str) -> list[str]:
    if "$" in value or value.startswith("~"):
        return []  # expanded by a shell
    t = param.type
    if isinstance(t, (click.Choice, click.types.IntParamType, click.types.FloatParamType,
                      click.types.BoolParamType)):
        try:
            t.convert(value, param, None)
        except click.BadParameter as e:
            return [f"{where}: {flag} {value!r}: {e.message}"]
    return []


def parse_command(root: click.Command, argv: list[str]) -> Invocation:
    """Walk `argv` (argv[0] the program) down `root`'s tree and check it the way click
    would: subcommands that exist, known options, values where one is needed (and
    none for flags), values of typed options, required options, arguments."""
    inv = Invocation(argv=list(argv))
    cmd, args, path = root, list(argv[1:]), [PurePosixPath(argv[0]).name]
    while isinstance(cmd, click.Group):
        where = " ".join(path)
        while args and args[0].startswith("-"):
            flag = args.pop(0).split("=")[0]
            param = _find_param(cmd, flag)
            if param is None:
                inv.problems.append(f"{where}: unknown option {flag}")
            elif param.is_eager:  # --help, --version: done
                return inv
        if not args:
            inv.problems.append(f"{where}: no subcommand")
            return inv
        name = args.pop(0)
        if name not in cmd.commands:
            inv.problems.append(f"{where}: no subcommand {name!r} (it has {', '.join(sorted(cmd.commands))})")
            return inv
        cmd = cmd.commands[name]
        path.append(name)
        inv.path += (name,)
    inv.command = cmd
    where = " ".join(path)
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if tok == "--":
            inv.args += args[i:]
            break
        if not (tok.startswith("-") and len(tok) > 1):
            inv.args.append(tok)
            continue
        flag, eq, value = tok.partition("=")
        param = _find_param(cmd, flag)
        if param is None:
            inv.problems.append(f"{where}: unknown option {flag}")
            continue
        if param.is_flag or param.count:
            if eq:
                inv.problems.append(f"{where}: {flag} is a flag and takes no value")
            inv.values.setdefault(param.name, []).append(True)
            continue
        vals = [value] if eq else []
        while len(vals) < max(param.nargs, 1):
            if i >= len(args):
                inv.problems.append(f"{where}: {flag} needs a value")
                break
            vals.append(args[i])
            i += 1
        for v in vals:
            inv.problems += _value_problems(where, flag, param, v)
        inv.values.setdefault(param.name, []).extend(vals)
    for p in _params(cmd):
        if isinstance(p, click.Option) and p.required and p.name not in inv.values:
            inv.problems.append(f"{where}: missing required option {max(p.opts, key=len)}")
    arguments = [p for p in _params(cmd) if isinstance(p, click.Argument)]
    if any(a.nargs == -1 for a in arguments):
        need = sum(1 for a in arguments if a.nargs != -1 and a.required)
        if len(inv.args) < need:
            inv.problems.append(f"{where}: expects at least {need} argument(s), got {inv.args}")
    else:
        need = sum(a.nargs for a in arguments if a.required)
        if not need <= len(inv.args) <= sum(a.nargs for a in arguments):
            names = " ".join(a.name.upper() for a in arguments)
            inv.problems.append(f"{where}: expects arguments [{names}], got {inv.args}")
    return inv


def check_tiesfed_argv(argv: list[str]) -> list[str]:
    """The problems of one `tiesfed ...` command line (empty when click would take it)."""
    return parse_command(_tiesfed_cli(), argv).problems


# ============================================================== shell scripts

_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;", "{", "}"}
_REDIRECTS = {">", ">>", "<", ">&", "&>", "<<"}
_PREFIX_WORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "exec", "time"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_COMMAND_LINE = re.compile(r"^\s*(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(?:exec\s+)?(?:tiesfed|ray)\s")


@dataclass
class Cmd:
    """A simple command of a shell script: its words, and files it redirects to."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    redirects: list[str] = field(default_factory=list)


def _newlines_to_separators(script: str) -> str:
    """Unquoted newlines become `;` and comments go (shlex alone would join lines)."""
    out, quote, i = [], None, 0
    script = script.replace("\\\n", " ")
    while i < len(script):
        c = script[i]
        if quote:
            if c == "\\" and quote == '"' and i + 1 < len(script):
                out.append(script[i:i + 2])
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "\\" and i + 1 < len(script):
            out.append(script[i:i + 2])
            i += 2
            continue
        elif c == "#" and (not out or out[-1] in " \t\n;"):
            while i < len(script) and script[i] != "\n":
                i += 1
            continue
        elif c == "\n":
            c = " ; "
        out.append(c)
        i += 1
    return "".join(out)


def shell_commands(script: str) -> list[Cmd]:
    """The simple commands of `script`, and those of the scripts it hands to
    `sh -c` or to another program as one argument (`ray exec ... 'tiesfed ...'`)."""
    lex = shlex.shlex(_newlines_to_separators(script), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = ""
    segments: list[list[str]] = [[]]
    for tok in lex:
        if tok in _SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(tok)
    out: list[Cmd] = []
    for words in segments:
        cmd = Cmd(argv=[])
        it = iter(words)
        for w in it:
            if w in _REDIRECTS:
                cmd.redirects.append(next(it, ""))
            elif not cmd.argv and w in _PREFIX_WORDS:
                continue
            elif not cmd.argv and _ASSIGNMENT.match(w):
                k, _, v = w.partition("=")
                cmd.env[k] = v
            else:
                cmd.argv.append(w)
        if not cmd.argv:
            continue
        out.append(cmd)
        out += nested_commands(cmd.argv)
    return out


def nested_commands(argv: list[str]) -> list[Cmd]:
    """Commands inside `sh -c SCRIPT`, or inside an argument that is a command line
    (`ray exec CLUSTER 'tiesfed ...'`; not the text that echo prints)."""
    name = PurePosixPath(argv[0]).name
    if name in ("sh", "bash") and "-c" in argv[:-1]:
        return shell_commands(argv[argv.index("-c") + 1])
    if name in ("echo", "printf"):
        return []
    return [c for a in argv[1:] if _COMMAND_LINE.match(a) for c in shell_commands(a)]


def program(cmd: Cmd) -> str:
    return PurePosixPath(cmd.argv[0]).name


def python_problems(code: str) -> list[str]:
    """A `python -c` snippet: it compiles, and what it imports from tiesfed exists."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return [f"python -c: {e}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tiesfed":
            module = importlib.import_module(node.module)
            problems += [f"python -c: {node.module} has no {a.name}" for a in node.names if not hasattr(module, a.name)]
    return problems


def command_problems(cmds: list[Cmd], where: str) -> list[str]:
    """Every `tiesfed` and `ray` command line among `cmds`, checked against its CLI
    (and every `python -c` snippet's imports from tiesfed)."""
    problems = []
    for c in cmds:
        if program(c) == "tiesfed":
            problems += [f"{where}: {p}" for p in parse_command(_tiesfed_cli(), c.argv).problems]
        elif program(c) == "ray":
            problems += [f"{where}: {p}" for p in parse_command(_ray_cli(), c.argv).problems]
        elif program(c).startswith("python") and "-c" in c.argv[:-1]:
            problems += [f"{where}: {p}" for p in python_problems(c.argv[c.argv.index("-c") + 1])]
    return problems


def invocations(cmds: list[Cmd], prog: str, path: tuple[str, ...]) -> list[Invocation]:
    root = _tiesfed_cli() if prog == "tiesfed" else _ray_cli()
    found = [parse_command(root, c.argv) for c in cmds if program(c) == prog]
    return [i for i in found if i.path == path]


def host_port(value: Optional[str]) -> tuple[str, int]:
    host, _, port = (value or "").rpartition(":")
    return host, int(port) if port.isdigit() else -1


# ============================================================== Dockerfiles


@dataclass
class Instr:
    op: str
    args: str
    line: int


@dataclass
class DockerInfo:
    problems: list[str]
    base: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = "root"
    ray_version: str = ""
    owned_dirs: set[str] = field(default_factory=set)  # made and chowned to the user


def parse_dockerfile(text: str) -> list[Instr]:
    instrs, buf, start = [], "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if not buf:
            start = n
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        op, _, args = (buf + s).partition(" ")
        instrs.append(Instr(op.upper(), args.strip(), start))
        buf = ""
    return instrs


def _expand(s: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), s)


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or a folder above it wins."""

    def match(pat: str) -> bool:
        rx = re.escape(pat.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        return any(re.fullmatch(rx, "/".join(parts[:k])) for k in range(1, len(parts) + 1))

    excluded = False
    for pat in patterns:
        if match(pat.lstrip("!")):
            excluded = not pat.startswith("!")
    return excluded


def _pip_installs(runs: list[tuple[int, list[Cmd]]]) -> list[tuple[int, list[str]]]:
    out = []
    for idx, cmds in runs:
        for c in cmds:
            a = c.argv
            if program(c).startswith("pip") and "install" in a:
                out.append((idx, a))
            elif "-m" in a and "pip" in a and "install" in a:
                out.append((idx, a))
    return out


def check_pip_order(installs: list[tuple[int, list[str]]], index_ok: Callable[[str], bool],
                    where: str) -> tuple[list[str], str]:
    """torch (pinned, from PyTorch's index) installed before the project; the Ray pin."""
    problems, ray_version = [], ""
    torch = [(i, a) for i, a in installs if any(t.startswith("torch==") for t in a)]
    project = [(i, a) for i, a in installs if any(t in (".", "./") or t.endswith("/tiesfed") for t in a)]
    if not torch:
        problems.append(f"{where}: no `pip install torch==...`")
    if not project:
        problems.append(f"{where}: the project is never installed")
    if torch:
        i, a = torch[0]
        version = next(t for t in a if t.startswith("torch==")).split("==", 1)[1]
        if version != TORCH_VERSION:
            problems.append(f"{where}: torch=={version}, want {TORCH_VERSION}")
        index = a[a.index("--index-url") + 1] if "--index-url" in a[:-1] else ""
        if not index_ok(index):
            problems.append(f"{where}: torch from index {index!r}")
        if project and project[0][0] <= i:
            problems.append(f"{where}: the project is installed before torch (pip would pick its own torch)")
    for _, a in project:
        for t in a:
            m = re.fullmatch(r"ray(?:\[[\w,]+\])?==(\S+)", t)
            if m:
                ray_version = m[1]
    if project and not ray_version:
        problems.append(f"{where}: Ray is not pinned (every node must run the same Ray)")
    return problems, ray_version


def dockerfile_info(text: str, flavor: str) -> DockerInfo:
    where = f"Dockerfile({flavor})"
    info = DockerInfo(problems=[])
    instrs = parse_dockerfile(text)
    variables: dict[str, str] = {}
    runs: list[tuple[int, list[Cmd]]] = []
    copied: set[str] = set()
    ignore_file = DOCKERFILES[flavor].parent / (DOCKERFILES[flavor].name + ".dockerignore")
    ignore = [ln.strip() for ln in ignore_file.read_text().splitlines()
              if ln.strip() and not ln.startswith("#")] if ignore_file.exists() else []
    venv, path_env, user_index, entry_index = "", "", -1, -1
    for idx, ins in enumerate(instrs):
        args = _expand(ins.args, variables)
        if ins.op == "ARG":
            k, _, v = ins.args.partition("=")
            variables[k.strip()] = v.strip().strip('"')
        elif ins.op == "FROM" and not info.base:
            info.base = args.split()[0]
        elif ins.op == "ENV":
            m = re.search(r"(?:^|\s)PATH=(\S+)", args)
            path_env = m[1] if m else path_env
        elif ins.op == "RUN":
            cmds = shell_commands(args)
            runs.append((idx, cmds))
            for c in cmds:
                if "venv" in c.argv and "-m" in c.argv:
                    venv = c.argv[-1]
                if program(c) == "chown":
                    info.owned_dirs |= {a for a in c.argv[2:] if a.startswith("/")}
            info.problems += command_problems(cmds, f"{where} line {ins.line}")
        elif ins.op in ("COPY", "ADD"):
            parts = [p for p in _exec_form(args) if not p.startswith("--")]
            if any(p.startswith("--from") for p in _exec_form(args)):
                continue
            for src in parts[:-1]:
                rel = src.strip("/").removeprefix("./") or "."
                copied.add(rel)
                if not (ROOT / rel).exists():
                    info.problems.append(f"{where} line {ins.line}: COPY {src}: does not exist in the repository")
                    continue
                files = [ROOT / rel] + ([f for f in (ROOT / rel).rglob("*") if f.suffix in (".py", ".proto", ".pyi")]
                                        if (ROOT / rel).is_dir() else [])
                for f in files:
                    if _dockerignore_excludes(ignore, f.relative_to(ROOT).as_posix()):
                        info.problems.append(f"{where}: {f.relative_to(ROOT)} is COPYed but .dockerignore leaves it out")
                        break
        elif ins.op == "USER":
            info.user, user_index = args.split(":")[0], idx
        elif ins.op == "ENTRYPOINT":
            info.entrypoint, entry_index = _exec_form(args), idx
        elif ins.op == "CMD":
            info.cmd = _exec_form(args)

    if info.entrypoint != ["tiesfed"]:
        info.problems.append(f"{where}: ENTRYPOINT {info.entrypoint}, want [\"tiesfed\"]")
    if info.user in ("root", "0") or user_index < 0 or user_index > entry_index:
        info.problems.append(f"{where}: no non-root USER before the ENTRYPOINT")
    made_user = any(program(c) in ("useradd", "adduser") and info.user in c.argv for _, cs in runs for c in cs)
    if info.user not in ("root", "0") and not made_user:
        info.problems.append(f"{where}: USER {info.user} is never created")
    if not venv:
        info.problems.append(f"{where}: no venv is created")
    elif not path_env.startswith(f"{venv}/bin:"):
        info.problems.append(f"{where}: PATH does not start with the venv's bin ({venv}/bin)")

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    for n in sorted(needed - copied):
        info.problems.append(f"{where}: `pip install .` needs {n}, which is not COPYed")

    index_ok = (lambda u: u == CPU_INDEX) if flavor == "cpu" else (lambda u: bool(CUDA_INDEX.fullmatch(u)))
    problems, info.ray_version = check_pip_order(_pip_installs(runs), index_ok, where)
    info.problems += problems
    if flavor == "cpu" and info.base != "python:3.11-slim":
        info.problems.append(f"{where}: base {info.base}, want python:3.11-slim")
    if flavor == "cuda" and not re.match(r"nvidia/cuda:\S*runtime", info.base):
        info.problems.append(f"{where}: base {info.base}, want an nvidia/cuda runtime image")
    return info


# ============================================================== compose


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool
    bind: bool


def compose_mounts(svc: dict) -> list[Mount]:
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            src, tgt = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            src, tgt, ro = v.get("source", ""), v["target"], bool(v.get("read_only"))
        out.append(Mount(src, tgt, ro, src.startswith((".", "/", "~"))))
    return out


def resolve_in(mounts: list[tuple[str, str, tuple]], path: Optional[str]) -> Optional[tuple]:
    """(what is mounted, path inside it) for a container path, by the longest mount
    point above it: `mounts` are (mount point, subpath inside the source, source key)."""
    if not path:
        return None
    best = None
    for point, sub, key in mounts:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) > len(best[0]):
                best = (point, sub, key)
    if best is None:
        return None
    rel = PurePosixPath(best[1]) / PurePosixPath(path).relative_to(best[0])
    return best[2], rel.as_posix()


def compose_resolve(svc: dict, path: Optional[str]) -> Optional[tuple]:
    return resolve_in([(m.target, ".", ("volume", m.source)) for m in compose_mounts(svc) if not m.bind], path)


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _as_list(x) -> list[str]:
    if x is None:
        return []
    return shlex.split(x) if isinstance(x, str) else [str(a) for a in x]


def _unescape(argv: list[str]) -> list[str]:
    return [a.replace("$$", "$") for a in argv]


def compose_argv(svc: dict, image: DockerInfo) -> list[str]:
    """What the container runs: entrypoint (the image's unless overridden) + command."""
    entry = _as_list(svc["entrypoint"]) if "entrypoint" in svc else image.entrypoint
    command = _as_list(svc["command"]) if "command" in svc else ([] if "entrypoint" in svc else image.cmd)
    return _unescape(entry + command)


def argv_commands(argv: list[str]) -> list[Cmd]:
    return [Cmd(argv=argv)] + nested_commands(argv) if argv else []


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def _depends(svc: dict) -> dict[str, str]:
    dep = svc.get("depends_on") or {}
    if isinstance(dep, list):
        return {d: "service_started" for d in dep}
    return {k: (v or {}).get("condition", "service_started") for k, v in dep.items()}


def _container_ports(svc: dict) -> set[int]:
    out = set()
    for p in svc.get("ports", []):
        s = str(p["target"]) if isinstance(p, dict) else str(p)
        out.add(int(s.split(":")[-1].split("/")[0]))
    return out


@dataclass
class Identity:
    role: str  # server | client | admin
    names: list[str]
    where: tuple  # (source key, path inside it)


@dataclass
class PkiOutputs:
    service: str = ""
    ca: Optional[tuple] = None
    identities: list[Identity] = field(default_factory=list)
    crls: set = field(default_factory=set)  # places holding the CA's crl.pem
    token: Optional[tuple] = None  # the Ray token file


def pki_outputs(name: str, svc: dict, cmds: list[Cmd]) -> PkiOutputs:
    """What a pki job writes, as (volume, path) places: the CA, each identity, the
    CRL and its published copies (cp/mv), the Ray token (a redirect)."""
    out = PkiOutputs(service=name)
    copies = []
    for c in cmds:
        if program(c) == "tiesfed":
            inv = parse_command(_tiesfed_cli(), c.argv)
            if inv.path == ("pki", "init") and inv.args:
                out.ca = compose_resolve(svc, inv.args[0])
                out.crls.add(compose_resolve(svc, inv.args[0].rstrip("/") + "/crl.pem"))
            elif inv.path == ("pki", "issue"):
                for flag, role in (("--server", "server"), ("--client", "client"), ("--admin", "admin")):
                    if inv.opt(flag):
                        out.identities.append(Identity(role, inv.opt(flag).split(","),
                                                       compose_resolve(svc, inv.opt("--out"))))
        elif program(c) in ("cp", "mv") and len(c.argv) >= 3:
            copies.append((compose_resolve(svc, c.argv[-2]), compose_resolve(svc, c.argv[-1])))
        elif any("token_hex" in a or "token_urlsafe" in a for a in c.argv) and c.redirects:
            out.token = compose_resolve(svc, c.redirects[-1])
    for _ in copies:
        out.crls |= {b for a, b in copies if a in out.crls}
    return out


def _root(svc: dict) -> bool:
    return str(svc.get("user", "")).split(":")[0] in ("root", "0")


def compose_problems(compose: dict, image: DockerInfo) -> list[str]:
    problems: list[str] = []
    services: dict[str, dict] = compose.get("services", {})
    declared = set((compose.get("volumes") or {}).keys())

    # --- images: one, built from deploy/docker/Dockerfile
    images = {s.get("image") for s in services.values()}
    if len(images) != 1 or None in images:
        problems.append(f"compose: services use images {sorted(map(str, images))}, want the one built image")
    builds = {n: s["build"] for n, s in services.items() if "build" in s}
    if not builds:
        problems.append("compose: no service builds the image")
    for n, b in builds.items():
        ctx = (COMPOSE_FILE.parent / (b if isinstance(b, str) else b.get("context", "."))).resolve()
        dockerfile = ctx / (b.get("dockerfile", "Dockerfile") if isinstance(b, dict) else "Dockerfile")
        if ctx != ROOT or dockerfile.resolve() != DOCKERFILES["cpu"].resolve():
            problems.append(f"compose {n}: builds {dockerfile} in {ctx}, want deploy/docker/Dockerfile in the repository")

    # --- `$` is Compose's interpolation: a shell's `$` must be written `$$`
    for s in _strings(services):
        if "$" in s.replace("$$", ""):
            problems.append(f"compose: unescaped `$` (Compose would interpolate it): {s.strip()[:60]!r}")

    # --- volumes
    used = set()
    for n, s in services.items():
        for m in compose_mounts(s):
            if m.bind:
                if not (COMPOSE_FILE.parent / m.source).exists():
                    problems.append(f"compose {n}: bind mount {m.source} does not exist")
                continue
            used.add(m.source)
            if m.source not in declared:
                problems.append(f"compose {n}: volume {m.source!r} is not declared")
    for v in sorted(declared - used):
        problems.append(f"compose: volume {v!r} is declared but never mounted")
    for n, deps in ((n, _depends(s)) for n, s in services.items()):
        for d in deps:
            if d not in services:
                problems.append(f"compose {n}: depends on unknown service {d!r}")

    # --- every command line
    cmds = {n: argv_commands(compose_argv(s, image)) for n, s in services.items()}
    for n, cs in cmds.items():
        problems += command_problems(cs, f"compose {n}")
    for n, s in services.items():
        test = _as_list((s.get("healthcheck") or {}).get("test"))
        hc = argv_commands(test[1:]) if test[:1] == ["CMD"] else shell_commands(" ".join(test[1:]))
        problems += command_problems(hc, f"compose {n} healthcheck")

    def find(prog: str, path: tuple[str, ...]) -> list[tuple[str, Invocation]]:
        return [(n, i) for n, cs in cmds.items() for i in invocations(cs, prog, path)]

    # --- roles, by what the services run
    pki_jobs = [n for n, _ in find("tiesfed", ("pki", "init"))]
    coordinators = find("tiesfed", ("coordinator", "serve"))
    clients = find("tiesfed", ("client", "submit"))
    ray_starts = find("ray", ("start",))
    heads = [(n, i) for n, i in ray_starts if i.opts("--head")]
    if len(pki_jobs) != 1 or len(coordinators) != 1 or len(heads) != 1 or not clients:
        problems.append(f"compose: want one pki job, one coordinator, one Ray head and clients; got "
                        f"{pki_jobs}, {[n for n, _ in coordinators]}, {[n for n, _ in heads]}, {[n for n, _ in clients]}")
        return problems
    pki_name = pki_jobs[0]
    pki = pki_outputs(pki_name, services[pki_name], cmds[pki_name])
    coord_name, serve = coordinators[0]
    coord = services[coord_name]
    head_name, head = heads[0]
    head_addr = (head_name, int(head.opt("--port") or DEFAULT_RAY_PORT))
    workers = [n for n, i in ray_starts if not i.opts("--head") and n != coord_name]
    if not workers:
        problems.append("compose: no Ray worker service")

    def identities(role: str) -> list[Identity]:
        return [i for i in pki.identities if i.role == role]

    # --- the coordinator's identity, CRL, port and cluster
    tls = compose_resolve(coord, serve.opt("--tls"))
    server = [i for i in identities("server") if i.where == tls]
    if not server:
        problems.append(f"compose {coord_name}: --tls {serve.opt('--tls')} is not where {pki_name} issues "
                        f"the server identity ({[i.where for i in identities('server')]})")
    crl = compose_resolve(coord, serve.opt("--crl"))
    if crl not in pki.crls:
        problems.append(f"compose {coord_name}: --crl {serve.opt('--crl')} is not a copy of the CA's crl.pem "
                        f"that {pki_name} publishes")
    _, listen_port = host_port(serve.opt("--listen"))
    if listen_port not in _container_ports(coord):
        problems.append(f"compose {coord_name}: --listen port {listen_port} is not published")
    if host_port(serve.opt("--ray-address")) != head_addr:
        problems.append(f"compose {coord_name}: --ray-address {serve.opt('--ray-address')}, the head is "
                        f"{head_addr[0]}:{head_addr[1]}")
    deps = _depends(coord)
    if deps.get(pki_name) != "service_completed_successfully" or deps.get(head_name) != "service_healthy":
        problems.append(f"compose {coord_name}: must wait for {pki_name} (completed) and {head_name} (healthy)")
    if "healthcheck" not in services[head_name]:
        problems.append(f"compose {head_name}: no healthcheck to wait on")
    for n, i in ray_starts:
        if not i.opts("--head") and host_port(i.opt("--address")) != head_addr:
            problems.append(f"compose {n}: ray start --address {i.opt('--address')}, the head is "
                            f"{head_addr[0]}:{head_addr[1]}")
    for w in workers:
        if _depends(services[w]).get(head_name) != "service_healthy":
            problems.append(f"compose {w}: must wait for {head_name} (healthy)")

    # --- parallel model write: every Ray node reads the spool and the base where the coordinator does
    spool, base = compose_resolve(coord, serve.opt("--spool")), compose_resolve(coord, serve.opt("--base"))
    for what, place, path in (("--spool", spool, serve.opt("--spool")), ("--base", base, serve.opt("--base"))):
        if place is None:
            problems.append(f"compose {coord_name}: {what} {path} is not on a volume")
            continue
        for n in [head_name] + workers:
            if compose_resolve(services[n], path) != place:
                problems.append(f"compose {n}: a Ray node must mount {place[1]} of volume {place[0][1]} at {path} "
                                f"({what}) for the parallel model write")

    # --- Ray's token: the Ray nodes and the coordinator read the one pki writes
    for n in [head_name, coord_name] + workers:
        env = _env(services[n])
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"compose {n}: RAY_AUTH_MODE is not token")
        if pki.token is None or compose_resolve(services[n], env.get("RAY_AUTH_TOKEN_PATH")) != pki.token:
            problems.append(f"compose {n}: RAY_AUTH_TOKEN_PATH is not the token {pki_name} writes")

    # --- clients
    round_id, allowed = serve.opt("--round"), set((serve.opt("--clients") or "").split(","))
    server_names = set(server[0].names) if server else set()
    seen_ids = set()
    for n, sub in clients:
        svc = services[n]
        ident = [i for i in identities("client") if i.where == compose_resolve(svc, sub.opt("--tls"))]
        if not ident:
            problems.append(f"compose {n}: --tls {sub.opt('--tls')} is not a client identity {pki_name} issues")
        else:
            seen_ids |= set(ident[0].names)
            if not set(ident[0].names) <= allowed:
                problems.append(f"compose {n}: its id {ident[0].names} is not in the coordinator's --clients")
        for inv in [sub] + [i for i in invocations(cmds[n], "tiesfed", ("client", "fetch"))]:
            host, port = host_port(inv.opt("--target"))
            if host != coord_name or port != listen_port:
                problems.append(f"compose {n}: --target {inv.opt('--target')}, the coordinator is "
                                f"{coord_name}:{listen_port}")
            if (inv.opt("--server-name") or host) not in server_names:
                problems.append(f"compose {n}: {host} is not a name of the server certificate {sorted(server_names)}")
            if inv.opt("--round") != round_id:
                problems.append(f"compose {n}: --round {inv.opt('--round')}, the coordinator opens {round_id}")
            if inv.opt("--tls") != sub.opt("--tls"):
                problems.append(f"compose {n}: submit and fetch use different identities")
            if float(inv.opt("--wait-for-coordinator") or 0) <= 0:
                problems.append(f"compose {n}: starts with the coordinator, so it must --wait-for-coordinator")
            if inv.args and compose_resolve(svc, inv.args[0]) != base:
                problems.append(f"compose {n}: BASE {inv.args[0]} is not the coordinator's --base")
        model = compose_resolve(svc, sub.args[1]) if len(sub.args) > 1 else None
        others = [o for o, _ in clients if o != n and model
                  and model[0] in {("volume", m.source) for m in compose_mounts(services[o])}]
        if model is None or others:
            problems.append(f"compose {n}: MODEL {sub.args[1:]} must be on a volume of its own (shared with {others})")
        if _depends(svc).get(pki_name) != "service_completed_successfully":
            problems.append(f"compose {n}: must wait for {pki_name} (completed)")
    if seen_ids != allowed:
        problems.append(f"compose: the coordinator allows {sorted(allowed)}, the clients are {sorted(seen_ids)}")

    # --- the models job (`seed ZOO_MODEL PATH`) fills the base and every client's model
    from tiesfed.demo.zoo import ZooSpec

    zoo = set(ZooSpec().tasks) | {"base"}
    seeded = set()
    for n, cs in cmds.items():
        for c in cs:
            if program(c) == "seed" and len(c.argv) == 3:
                if c.argv[1] not in zoo:
                    problems.append(f"compose {n}: the demo zoo has no model {c.argv[1]!r} ({sorted(zoo)})")
                seeded.add(compose_resolve(services[n], c.argv[2]))
    for n, sub in clients:
        for path in sub.args[:2]:
            if compose_resolve(services[n], path) not in seeded:
                problems.append(f"compose {n}: nothing fills {path} (the models job seeds {sorted(map(str, seeded))})")

    # --- each party sees only its own secrets
    def mounted_by(place: Optional[tuple]) -> list[str]:
        return [n for n, s in services.items() if place and ("volume", place[0][1]) in
                {("volume", m.source) for m in compose_mounts(s)}]

    if pki.ca is None:
        problems.append(f"compose {pki_name}: makes no CA")
    elif mounted_by(pki.ca) != [pki_name]:
        problems.append(f"compose: the CA's volume {pki.ca[0][1]} is mounted by {mounted_by(pki.ca)}, only "
                        f"{pki_name} may (the CA key never leaves it)")
    for ident in pki.identities:
        users = [u for u in mounted_by(ident.where) if u != pki_name]
        if len(users) > 1:
            problems.append(f"compose: {ident.role} identity {ident.names} is mounted by {users}")
    for n, _ in clients:
        if pki.token and n in mounted_by(pki.token):
            problems.append(f"compose {n}: a client must not get the Ray token")

    # --- users: root only for one-shot jobs that hand their volumes to the image's user
    for n, s in services.items():
        if _root(s):
            chowned = {a for c in cmds[n] if program(c) == "chown" for a in c.argv[2:]}
            for m in compose_mounts(s):
                if not m.read_only and m.target not in chowned:
                    problems.append(f"compose {n}: runs as root but does not chown {m.target}")
            if s.get("restart", "no") not in ("no", "on-failure"):
                problems.append(f"compose {n}: a root service must be a one-shot job")
    for vol in sorted(used):
        mounters = [(n, m) for n, s in services.items() for m in compose_mounts(s) if m.source == vol]
        if any(_root(services[n]) for n, _ in mounters):
            continue
        for n, m in mounters:
            if m.target not in image.owned_dirs:
                problems.append(f"compose {n}: volume {vol} at {m.target}: the image does not make that folder "
                                f"its user's, and no root job hands it over")
    return problems


# ============================================================== Kubernetes


def k8s_docs() -> list[dict]:
    return [d for f in sorted(K8S_DIR.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def _pod_mounts(pod: dict, container: dict) -> list[tuple[str, str, tuple]]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    out = []
    for m in container.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        if "secret" in v:
            key = ("secret", v["secret"].get("secretName"))
        elif "persistentVolumeClaim" in v:
            key = ("pvc", v["persistentVolumeClaim"].get("claimName"))
        else:
            key = ("other", m["name"])
        out.append((m["mountPath"], m.get("subPath", "."), key))
    return out


def _container_argv(container: dict, image: DockerInfo) -> list[str]:
    entry = container.get("command", image.entrypoint)
    args = container.get("args", [] if "command" in container else image.cmd)
    return [str(a) for a in entry + args]


def _secret_keys(secret: dict) -> set[str]:
    return set((secret.get("data") or {}).keys()) | set((secret.get("stringData") or {}).keys())


def _secret_file(pod: dict, container: dict, path: Optional[str], secrets: dict) -> Optional[tuple[str, str]]:
    """(secret name, key) of the file at `path`, when a Secret's volume holds it."""
    place = resolve_in(_pod_mounts(pod, container), path)
    if not place or place[0][0] != "secret":
        return None
    name = place[0][1]
    vol = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == name)
    items = {i["path"]: i["key"] for i in vol["secret"].get("items", [])}
    keys = items if items else {k: k for k in _secret_keys(secrets.get(name, {}))}
    return name, keys.get(place[1], "")


def k8s_problems(docs: list[dict], image: DockerInfo) -> tuple[list[str], dict]:
    problems: list[str] = []
    facts: dict = {}
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)
    secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
    pvcs = {p["metadata"]["name"]: p for p in by_kind.get("PersistentVolumeClaim", [])}
    clusters, deployments, svcs = by_kind.get("RayCluster", []), by_kind.get("Deployment", []), by_kind.get("Service", [])
    if len(clusters) != 1 or len(deployments) != 1 or not svcs:
        return [f"k8s: want one RayCluster, one Deployment and a Service; got {sorted(by_kind)}"], facts
    rc, dep = clusters[0], deployments[0]
    if rc.get("apiVersion") != "ray.io/v1":
        problems.append(f"k8s: RayCluster apiVersion {rc.get('apiVersion')}, want ray.io/v1")
    facts["ray_version"] = str(rc["spec"].get("rayVersion"))

    head_pod = rc["spec"]["headGroupSpec"]["template"]["spec"]
    groups = rc["spec"].get("workerGroupSpecs") or []
    if not groups:
        problems.append("k8s: the RayCluster has no worker group")
    ray_pods = [("head", head_pod, rc["spec"]["headGroupSpec"].get("rayStartParams") or {}, True)]
    ray_pods += [(g["groupName"], g["template"]["spec"], g.get("rayStartParams") or {}, False) for g in groups]
    for name, pod, params, is_head in ray_pods:
        argv = ["ray", "start"] + (["--head"] if is_head else [])
        argv += [f"--{k}" if str(v).lower() == "true" else f"--{k}={v}" for k, v in params.items()]
        problems += [f"k8s RayCluster {name} rayStartParams: {p}"
                     for p in parse_command(_ray_cli(), argv).problems]
    gcs_port = int(ray_pods[0][2].get("port", DEFAULT_RAY_PORT))
    head_ports = {p["containerPort"] for p in head_pod["containers"][0].get("ports", [])}
    if gcs_port not in head_ports:
        problems.append(f"k8s RayCluster head: the GCS port {gcs_port} is not a container port")
    head_addr = (f"{rc['metadata']['name']}-head-svc", gcs_port)  # KubeRay's name for the head Service

    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    if dep["spec"].get("selector", {}).get("matchLabels", {}).items() - labels.items():
        problems.append("k8s Deployment: its selector does not match its pods' labels")
    if dep["spec"].get("replicas", 1) != 1 or dep["spec"].get("strategy", {}).get("type") != "Recreate":
        problems.append("k8s Deployment: one coordinator per spool: replicas 1, strategy Recreate")
    found = [(c, parse_command(_tiesfed_cli(), x.argv)) for c in pod["containers"]
             for x in argv_commands(_container_argv(c, image)) if program(x) == "tiesfed"]
    serving = [(c, i) for c, i in found if i.path == ("coordinator", "serve")]
    for c in pod["containers"]:
        problems += command_problems(argv_commands(_container_argv(c, image)), f"k8s Deployment {c['name']}")
    if len(serving) != 1:
        return problems + ["k8s Deployment: no container runs `tiesfed coordinator serve`"], facts
    container, serve = serving[0]

    # --- TLS identity and CRL from the Secret
    tls = serve.opt("--tls")
    mounts = {m["mountPath"].rstrip("/"): m for m in container.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    m = mounts.get((tls or "").rstrip("/"))
    secret_name = vols.get(m["name"], {}).get("secret", {}).get("secretName") if m else None
    if secret_name is None:
        problems.append(f"k8s Deployment: --tls {tls} is not where a Secret is mounted")
    elif secret_name not in secrets:
        problems.append(f"k8s Deployment: mounts Secret {secret_name!r}, which is not among the manifests")
    else:
        for k in ("cert.pem", "key.pem", "ca.pem", "crl.pem"):
            if k not in _secret_keys(secrets[secret_name]):
                problems.append(f"k8s Secret {secret_name}: no {k}")
        for k in ("cert.pem", "key.pem", "ca.pem"):
            if _secret_file(pod, container, f"{tls}/{k}", secrets) != (secret_name, k):
                problems.append(f"k8s Deployment: {tls}/{k} is not the Secret's {k}")
    crl = _secret_file(pod, container, serve.opt("--crl"), secrets)
    if not crl or crl[1] not in _secret_keys(secrets.get(crl[0], {})):
        problems.append(f"k8s Deployment: --crl {serve.opt('--crl')} is not a key of a mounted Secret")

    # --- ports: --listen = containerPort = the Service's targetPort
    _, listen_port = host_port(serve.opt("--listen"))
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if listen_port not in ports.values():
        problems.append(f"k8s Deployment: --listen port {listen_port} is not a container port ({ports})")
    facts["listen_port"] = listen_port
    fronts = [s for s in svcs if s["spec"].get("selector") and not (s["spec"]["selector"].items() - labels.items())]
    if not fronts:
        problems.append("k8s: no Service selects the coordinator's pods")
    for s in fronts:
        for p in s["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            target = ports.get(target, -1) if isinstance(target, str) else target
            if target != listen_port or p["port"] != listen_port:
                problems.append(f"k8s Service {s['metadata']['name']}: port {p['port']} -> {p.get('targetPort')}, "
                                f"the coordinator listens on {listen_port}")

    # --- the Ray cluster: address, token, the parallel model write
    if host_port(serve.opt("--ray-address")) != head_addr:
        problems.append(f"k8s Deployment: --ray-address {serve.opt('--ray-address')}, the head is "
                        f"{head_addr[0]}:{head_addr[1]}")
    for x in argv_commands(_container_argv(container, image)):
        if program(x) == "ray" and x.argv[1:2] == ["start"]:
            i = parse_command(_ray_cli(), x.argv)
            if host_port(i.opt("--address")) != head_addr:
                problems.append(f"k8s Deployment: ray start --address {i.opt('--address')}, the head is "
                                f"{head_addr[0]}:{head_addr[1]}")
    all_containers = [("Deployment", pod, container)] + [(n, p, p["containers"][0]) for n, p, _, _ in ray_pods]
    for name, _, c in all_containers:
        env = {e["name"]: e for e in c.get("env", [])}
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"k8s {name}: RAY_AUTH_MODE is not token")
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("key") not in _secret_keys(secrets.get(ref.get("name"), {})):
            problems.append(f"k8s {name}: RAY_AUTH_TOKEN is not a key of a Secret among the manifests")
    for what in ("--spool", "--base"):
        path = serve.opt(what)
        place = resolve_in(_pod_mounts(pod, container), path)
        if not place or place[0][0] != "pvc":
            problems.append(f"k8s Deployment: {what} {path} is not on a PersistentVolumeClaim")
            continue
        claim = pvcs.get(place[0][1])
        if claim is None or "ReadWriteMany" not in claim["spec"].get("accessModes", []):
            problems.append(f"k8s: claim {place[0][1]} must be among the manifests, ReadWriteMany")
        for name, rpod, _, _ in ray_pods:
            if resolve_in(_pod_mounts(rpod, rpod["containers"][0]), path) != place:
                problems.append(f"k8s RayCluster {name}: must mount claim {place[0][1]} so that {path} ({what}) is "
                                f"the coordinator's, for the parallel model write")

    # --- one image, not root
    facts["images"] = {c["image"] for _, _, c in all_containers}
    if len(facts["images"]) != 1:
        problems.append(f"k8s: containers run different images {sorted(facts['images'])}")
    for name, p, _ in all_containers:
        if not p.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"k8s {name}: pods must set runAsNonRoot")
    return problems, facts


# ============================================================== ray up


def ray_cluster_problems(cfg: dict) -> tuple[list[str], str]:
    problems: list[str] = []
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(copy.deepcopy(cfg)))
    except Exception as e:  # ray's own schema
        problems.append(f"ray cluster.yaml: {type(e).__name__}: {str(e).splitlines()[0]}")
    cmds = {k: [c for line in cfg.get(k, []) for c in shell_commands(line)]
            for k in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands")}
    for k, cs in cmds.items():
        problems += command_problems(cs, f"ray cluster.yaml {k}")
    heads = [c for c in cmds["head_start_ray_commands"] if program(c) == "ray" and "start" in c.argv]
    workers = [c for c in cmds["worker_start_ray_commands"] if program(c) == "ray" and "start" in c.argv]
    if len(heads) != 1 or len(workers) != 1:
        return problems + ["ray cluster.yaml: want one `ray start` for the head and one for the workers"], ""
    head = parse_command(_ray_cli(), heads[0].argv)
    worker = parse_command(_ray_cli(), workers[0].argv)
    port = int(head.opt("--port") or DEFAULT_RAY_PORT)
    if not head.opts("--head") or host_port(worker.opt("--address")) != ("$RAY_HEAD_IP", port):
        problems.append(f"ray cluster.yaml: workers join {worker.opt('--address')}, the head is $RAY_HEAD_IP:{port}")
    for c in heads + workers:
        if c.env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"ray cluster.yaml: `{' '.join(c.argv[:3])}` without RAY_AUTH_MODE=token")
    if "~/.ray/auth_token" not in (cfg.get("file_mounts") or {}):
        problems.append("ray cluster.yaml: the Ray token is not copied to the nodes")
    # tiesfed from a copy of this repository, after the CPU torch
    mounts = cfg.get("file_mounts") or {}
    repo_targets = [remote for remote, local in mounts.items()
                    if not local.startswith("~") and (ROOT / local / "pyproject.toml").exists()]
    if not repo_targets:
        problems.append("ray cluster.yaml: no file mount copies the repository (run from its root)")
    for remote, local in mounts.items():
        if not local.startswith("~") and not (ROOT / local).exists():
            problems.append(f"ray cluster.yaml: file mount source {local} does not exist")
    installs = _pip_installs([(i, [c]) for i, c in enumerate(cmds["setup_commands"])])
    installs = [(i, [("." if t in repo_targets else t) for t in a]) for i, a in installs]
    p, ray_version = check_pip_order(installs, lambda u: u == CPU_INDEX, "ray cluster.yaml")
    return problems + p, ray_version


# ============================================================== README


def readme_problems(text: str, compose: dict, image: DockerInfo) -> list[str]:
    problems = []
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    services = compose.get("services", {})
    for block in blocks:
        for c in shell_commands(block):
            problems += command_problems([c], "deploy/README.md")
            for tok in c.argv:
                if tok.startswith("deploy/") and not (ROOT / tok.rstrip("/")).exists():
                    problems.append(f"deploy/README.md: {tok} does not exist")
            if c.argv[:2] == ["docker", "compose"] and "run" in c.argv:
                rest = c.argv[c.argv.index("run") + 1:]
                entry = None
                while rest and rest[0].startswith("-"):
                    opt = rest.pop(0)
                    if opt in ("--entrypoint", "-e", "--env", "-u", "--user", "-v", "--volume", "-w", "--name"):
                        val = rest.pop(0)
                        entry = [val] if opt == "--entrypoint" else entry
                if not rest or rest[0] not in services:
                    problems.append(f"deploy/README.md: `docker compose run` of an unknown service {rest[:1]}")
                    continue
                svc = services[rest[0]]
                if len(rest) > 1:
                    base = entry or (_as_list(svc["entrypoint"]) if "entrypoint" in svc else image.entrypoint)
                    argv = base + rest[1:]
                    problems += command_problems(argv_commands(argv), f"deploy/README.md (run {rest[0]})")
                    inv = parse_command(_tiesfed_cli(), argv) if PurePosixPath(argv[0]).name == "tiesfed" else None
                    if inv and inv.opt("--tls") and compose_resolve(svc, inv.opt("--tls")) is None:
                        problems.append(f"deploy/README.md: service {rest[0]} has nothing at --tls {inv.opt('--tls')}")
    low = " ".join(text.lower().split())
    if not ("spool" in low and "base" in low and "writes the model itself" in low):
        problems.append("deploy/README.md: must say that the Ray nodes need the spool and the base for the "
                        "parallel model write, else the coordinator writes the model itself")
    return problems


# ============================================================== the deployment as a whole


@dataclass
class Deploy:
    compose: dict
    k8s: list[dict]
    dockerfiles: dict[str, str]
    ray_cluster: dict
    readme: str


def load_deploy() -> Deploy:
    return Deploy(
        compose=yaml.safe_load(COMPOSE_FILE.read_text()),
        k8s=k8s_docs(),
        dockerfiles={k: p.read_text() for k, p in DOCKERFILES.items()},
        ray_cluster=yaml.safe_load(RAY_CLUSTER_FILE.read_text()),
        readme=README.read_text(),
    )


def all_problems(d: Deploy) -> list[str]:
    infos = {k: dockerfile_info(t, k) for k, t in d.dockerfiles.items()}
    problems = [p for i in infos.values() for p in i.problems]
    problems += compose_problems(d.compose, infos["cpu"])
    k8s, facts = k8s_problems(d.k8s, infos["cpu"])
    problems += k8s
    ray_problems, ray_up_version = ray_cluster_problems(d.ray_cluster)
    problems += ray_problems
    problems += readme_problems(d.readme, d.compose, infos["cpu"])
    # across files: one Ray, one image, one port
    versions = {"Dockerfile": infos["cpu"].ray_version, "Dockerfile.cuda": infos["cuda"].ray_version,
                "ray/cluster.yaml": ray_up_version, "RayCluster.rayVersion": facts.get("ray_version")}
    if len(set(versions.values())) != 1:
        problems.append(f"Ray versions differ: {versions}")
    compose_images = {s.get("image") for s in d.compose.get("services", {}).values()}
    if facts.get("images") and compose_images != facts["images"]:
        problems.append(f"images differ: compose {compose_images}, k8s {facts['images']}")
    return problems


# ============================================================== tests


@pytest.fixture
def deploy() -> Deploy:
    return load_deploy()


def test_every_file_parses():
    for f in sorted(DEPLOY.rglob("*.y*ml")):
        assert list(yaml.safe_load_all(f.read_text())), f
    for f in DOCKERFILES.values():
        assert parse_dockerfile(f.read_text())[0].op == "FROM", f


def test_dockerfiles(deploy):
    for flavor, text in deploy.dockerfiles.items():
        assert dockerfile_info(text, flavor).problems == []


def test_compose(deploy):
    assert compose_problems(deploy.compose, dockerfile_info(deploy.dockerfiles["cpu"], "cpu")) == []


def test_k8s(deploy):
    assert k8s_problems(deploy.k8s, dockerfile_info(deploy.dockerfiles["cpu"], "cpu"))[0] == []


def test_ray_cluster(deploy):
    assert ray_cluster_problems(deploy.ray_cluster)[0] == []


def test_readme(deploy):
    assert readme_problems(deploy.readme, deploy.compose, dockerfile_info(deploy.dockerfiles["cpu"], "cpu")) == []


def test_across_files(deploy):
    assert all_problems(deploy) == []


def test_the_files_say_what_the_checks_read(deploy):
    """The checks find what they check: a check that found nothing would pass."""
    cmds = [c for s in deploy.compose["services"].values()
            for c in argv_commands(compose_argv(s, dockerfile_info(deploy.dockerfiles["cpu"], "cpu")))]
    paths = {parse_command(_tiesfed_cli(), c.argv).path for c in cmds if program(c) == "tiesfed"}
    assert {("pki", "init"), ("pki", "issue"), ("coordinator", "serve"), ("client", "submit"),
            ("client", "fetch")} <= paths
    assert sum(1 for c in cmds if program(c) == "ray") >= 3


# ---------------------------------------------------------------- the checker itself


GOOD_SUBMIT = ["tiesfed", "client", "submit", "base/", "model/", "--tls", "org-a/", "--target", "coordinator:50051",
               "--round", "r1", "--wait-for-coordinator", "300"]


@pytest.mark.parametrize("argv, expected", [
    (GOOD_SUBMIT + ["--bogus-flag", "1"], "unknown option --bogus-flag"),
    (["tiesfed", "client", "sumbit", "base/", "model/"], "no subcommand 'sumbit'"),
    (GOOD_SUBMIT[:7] + GOOD_SUBMIT[9:], "missing required option --target"),
    (GOOD_SUBMIT[:-1] + ["soon"], "--wait-for-coordinator 'soon'"),
    (GOOD_SUBMIT[:-1] + ["-5"], "--wait-for-coordinator '-5'"),
    (GOOD_SUBMIT + ["--device"], "--device needs a value"),
    (GOOD_SUBMIT + ["--quiet=yes"], "--quiet is a flag"),
    (GOOD_SUBMIT[:4] + GOOD_SUBMIT[5:], "expects arguments [BASE MODEL]"),
    (["tiesfed", "coordinator", "serve", "--late-policy", "maybe"], "--late-policy 'maybe'"),
    (["tiesfed", "coordinator", "serve", "--no-such-port", "9090"], "unknown option --no-such-port"),
    (["tiesfed", "pki", "issue", "ca/", "--server", "coordinator"], "missing required option --out"),
])
def test_checker_catches_a_wrong_command_line(argv, expected):
    assert check_tiesfed_argv(GOOD_SUBMIT) == []
    problems = check_tiesfed_argv(argv)
    assert any(expected in p for p in problems), problems


def test_checker_reads_shell_scripts():
    script = """
        set -eu   # a comment: tiesfed --nope
        [ -e /ca/ca.pem ] || tiesfed pki init /ca
        echo 'tiesfed --not-a-command' > /dev/null
        exec tiesfed client fetch base/ -o out/ --target h:1 \\
          --round r1 --bogus
        RAY_AUTH_MODE=token ray start --address=h:6379 --no-such-ray-flag
        sh -c "tiesfed merge base/ m1/ -o out/ --nope"
    """
    problems = command_problems(shell_commands(script), "script")
    assert len(problems) == 3, problems
    assert any("client fetch: unknown option --bogus" in p for p in problems)
    assert any("ray start: unknown option --no-such-ray-flag" in p for p in problems)
    assert any("merge: unknown option --nope" in p for p in problems)


# ---------------------------------------------------------------- every check can fail


def _service(d: Deploy, name: str) -> dict:
    return d.compose["services"][name]


def _sub_command(svc: dict, old: str, new: str) -> None:
    """Replace text in a service's (or container's) command, asserting it was there."""
    key = next(k for k in ("command", "args") if json.dumps(old)[1:-1] in json.dumps(svc.get(k)))
    text = json.dumps(svc[key])
    assert json.dumps(old)[1:-1] in text, (old, svc[key])
    svc[key] = json.loads(text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1]))


def _k8s(d: Deploy, kind: str, name: Optional[str] = None) -> dict:
    return next(x for x in d.k8s if x["kind"] == kind and (name is None or x["metadata"]["name"] == name))


def _coordinator_container(d: Deploy) -> dict:
    return _k8s(d, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _df(flavor: str, old: str, new: str) -> Callable[[Deploy], None]:
    def mutate(d: Deploy) -> None:
        assert old in d.dockerfiles[flavor], old
        d.dockerfiles[flavor] = d.dockerfiles[flavor].replace(old, new)
    return mutate


def _move_torch_after_project(d: Deploy) -> None:
    lines = d.dockerfiles["cpu"].splitlines()
    torch = next(i for i, ln in enumerate(lines) if "torch==" in ln)
    line = lines.pop(torch)
    user = next(i for i, ln in enumerate(lines) if ln.startswith("USER"))
    lines.insert(user, line)
    d.dockerfiles["cpu"] = "\n".join(lines)


def _drop_mount(svc: dict, target: str) -> None:
    before = len(svc["volumes"])
    svc["volumes"] = [v for v in svc["volumes"] if not v.split(":")[1] == target]
    assert len(svc["volumes"]) == before - 1


def _drop_worker_spool(d: Deploy) -> None:
    pod = _k8s(d, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    c = pod["containers"][0]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/spool"]


MUTATIONS: list[tuple[str, Callable[[Deploy], None], str]] = [
    ("compose: unknown tiesfed flag",
     lambda d: _sub_command(_service(d, "client-org-a"), "--round r1", "--round r1 --bogus-flag 1"),
     "unknown option --bogus-flag"),
    ("compose: unknown ray flag",
     lambda d: _service(d, "ray-head")["command"].append("--bogus-port=1"), "unknown option --bogus-port"),
    ("compose: coordinator --tls elsewhere",
     lambda d: _sub_command(_service(d, "coordinator"), "--tls /certs/server", "--tls /certs/ca"),
     "is not where pki issues the server identity"),
    ("compose: coordinator --crl elsewhere",
     lambda d: _sub_command(_service(d, "coordinator"), "/certs/ca/crl.pem", "/certs/ca/crl.pem.old"),
     "--crl /certs/ca/crl.pem.old"),
    ("compose: pki writes the server identity elsewhere",
     lambda d: _sub_command(_service(d, "pki"), "-o /certs/server", "-o /certs/server/v2"),
     "not where pki issues the server identity"),
    ("compose: client targets another port",
     lambda d: _sub_command(_service(d, "client-org-a"), "--target coordinator:50051", "--target coordinator:50052"),
     "--target coordinator:50052"),
    ("compose: client targets another host",
     lambda d: _sub_command(_service(d, "client-org-b"), "--target coordinator:", "--target coordinatr:"),
     "--target coordinatr:50051"),
    ("compose: client of another round",
     lambda d: _sub_command(_service(d, "client-org-c"), "--round r1", "--round r2"), "--round r2"),
    ("compose: client does not wait",
     lambda d: _sub_command(_service(d, "client-org-c"), "--wait-for-coordinator 300", "--wait-for-coordinator 0"),
     "must --wait-for-coordinator"),
    ("compose: client with another's identity",
     lambda d: _service(d, "client-org-b")["volumes"].__setitem__(0, "certs-org-a:/certs/org-b:ro"),
     "identity ['org-a'] is mounted by"),
    ("compose: worker joins another port",
     lambda d: _service(d, "ray-worker")["command"].__setitem__(1, "--address=ray-head:6380"),
     "ray start --address ray-head:6380"),
    ("compose: coordinator joins another cluster",
     lambda d: _sub_command(_service(d, "coordinator"), "--ray-address ray-head:6379", "--ray-address ray:6379"),
     "--ray-address ray:6379"),
    ("compose: a Ray node without the spool",
     lambda d: _drop_mount(_service(d, "ray-worker"), "/spool"), "parallel model write"),
    ("compose: a healthcheck with an unknown flag",
     lambda d: _service(d, "ray-head")["healthcheck"]["test"].append("--bogus"),
     "ray-head healthcheck: ray health-check: unknown option --bogus"),
    ("compose: coordinator not published on its port",
     lambda d: _service(d, "coordinator").__setitem__("ports", ["50052:50052"]), "is not published"),
    ("compose: another image",
     lambda d: _service(d, "client-org-a").__setitem__("image", "tiesfed:other"), "want the one built image"),
    ("compose: unescaped $",
     lambda d: _sub_command(_service(d, "models"), '"$$2/"', '"$2/"'), "unescaped `$`"),
    ("compose: CA volume shared",
     lambda d: _service(d, "coordinator")["volumes"].append("ca:/ca:ro"), "the CA's volume"),
    ("compose: Ray token missing",
     lambda d: _service(d, "ray-worker")["environment"].pop("RAY_AUTH_TOKEN_PATH"), "RAY_AUTH_TOKEN_PATH"),
    ("compose: clients share a model volume",
     lambda d: _service(d, "client-org-b")["volumes"].__setitem__(2, "models-org-a:/models/org-b"),
     "must be on a volume of its own"),
    ("compose: a client the coordinator does not allow",
     lambda d: _sub_command(_service(d, "coordinator"), "--clients org-a,org-b,org-c", "--clients org-a,org-b"),
     "is not in the coordinator's --clients"),
    ("compose: a client gets the Ray token",
     lambda d: _service(d, "client-org-a")["volumes"].append("ray-auth:/ray-auth:ro"), "must not get the Ray token"),
    ("compose: the models job seeds a model the zoo lacks",
     lambda d: _sub_command(_service(d, "models"), "seed vflip", "seed vflop"), "the demo zoo has no model 'vflop'"),
    ("compose: the models job seeds elsewhere",
     lambda d: _sub_command(_service(d, "models"), "/models/org-c/model", "/models/org-c/weights"),
     "nothing fills /models/org-c/model"),
    ("compose: python -c imports what tiesfed lacks",
     lambda d: _sub_command(_service(d, "models"), "import build_zoo;", "import build_zoo, make_zoo;"),
     "tiesfed.demo.zoo has no make_zoo"),
    ("k8s: rolling update", lambda d: _k8s(d, "Deployment")["spec"].__setitem__("strategy", {"type": "RollingUpdate"}),
     "strategy Recreate"),
    ("k8s: Service targets another port",
     lambda d: _k8s(d, "Service")["spec"]["ports"][0].__setitem__("targetPort", 50052), "the coordinator listens"),
    ("k8s: --listen off the container port",
     lambda d: _sub_command(_coordinator_container(d), "--listen 0.0.0.0:50051", "--listen 0.0.0.0:50052"),
     "--listen port 50052"),
    ("k8s: Secret mounted where --tls does not look",
     lambda d: _coordinator_container(d)["volumeMounts"][0].__setitem__("mountPath", "/certs/tls"),
     "--tls /certs/server is not where a Secret is mounted"),
    ("k8s: Secret without key.pem",
     lambda d: _k8s(d, "Secret", "tiesfed-server-tls")["stringData"].pop("key.pem"), "no key.pem"),
    ("k8s: coordinator joins another cluster",
     lambda d: _sub_command(_coordinator_container(d), "--ray-address tiesfed-ray-head-svc:6379",
                            "--ray-address tiesfed-head:6379"), "--ray-address tiesfed-head:6379"),
    ("k8s: a worker group without the spool", _drop_worker_spool, "parallel model write"),
    ("k8s: bad rayStartParams",
     lambda d: _k8s(d, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("no-such", "1"),
     "unknown option --no-such"),
    ("Dockerfile: COPY of a missing path", _df("cpu", "COPY tiesfed/ tiesfed/", "COPY tiesfed/ nowhere/ tiesfed/"),
     "COPY nowhere/: does not exist"),
    ("Dockerfile: torch after the project", _move_torch_after_project, "installed before torch"),
    ("Dockerfile: torch from the plain index", _df("cpu", f"--index-url {CPU_INDEX} ", ""), "torch from index"),
    ("Dockerfile: another entrypoint", _df("cpu", 'ENTRYPOINT ["tiesfed"]', 'ENTRYPOINT ["python"]'),
     "ENTRYPOINT ['python']"),
    ("Dockerfile: root", _df("cuda", "USER tiesfed", "USER root"), "no non-root USER"),
    ("Dockerfile: spool not the user's", _df("cpu", "chown tiesfed:tiesfed /spool ", "chown tiesfed:tiesfed "),
     "volume spool at /spool"),
    ("Dockerfile.cuda: another Ray", _df("cuda", "RAY_VERSION=2.60.0", "RAY_VERSION=2.59.0"), "Ray versions differ"),
    ("ray up: worker joins another port",
     lambda d: d.ray_cluster["worker_start_ray_commands"].__setitem__(
         1, d.ray_cluster["worker_start_ray_commands"][1].replace(":6379", ":6380")), "workers join"),
    ("ray up: schema", lambda d: d.ray_cluster.__setitem__("setup_comands", []), "setup_comands"),
    ("README: unknown flag",
     lambda d: setattr(d, "readme", d.readme.replace("org-b,org-c'", "org-b,org-c --bogus'")),
     "unknown option --bogus"),
    ("README: compose run with an unknown flag",
     lambda d: setattr(d, "readme", d.readme.replace("--target coordinator:50051 --round r1\n",
                                                     "--target coordinator:50051 --round r1 --nope\n")),
     "unknown option --nope"),
]


@pytest.mark.parametrize("mutate, expected", [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_each_check_can_fail(mutate, expected):
    d = load_deploy()
    mutate(d)
    problems = all_problems(d)
    assert any(expected in p for p in problems), problems
