#!/usr/bin/env python3
"""Static checks of the Kubernetes deployment under k8s/ (no cluster needed).

    python3 scripts/check_k8s.py [--binary PATH | --source] [--no-render]

What it checks, and exits 1 naming the file and the problem when one fails:

1. Every YAML file under k8s/ parses (PyYAML), and every document has apiVersion, kind and metadata.name.
2. Every kustomization's resources, patches and generator files exist.
3. Every container that runs `iro` uses only subcommands and flags that exist, gives a value to each flag that
   takes one, and (outside patches) passes every required flag. The CLI comes from the newest built binary
   (`target/release/iro` or `target/debug/iro`, `<sub> --help` parsed) when it is at least as new as src/cli/;
   otherwise from the sources: src/cli/*.rs scanned for clap's `#[arg(long ...)]` fields and the `Command` enum.
   The report says which one was used.
4. Every Secret, ConfigMap, PersistentVolumeClaim, ServiceAccount, Role and Service a manifest names exists in
   k8s/base (the secret templates included) or, for an overlay, in its own resources; secret items name keys
   the template has; service URLs in env values name a Service port that exists.
5. Every environment variable named IRO_* is one the Rust sources read.
6. Each run config TOML (base and overlays) parses (tomllib), has only sections and fields that
   common/src/config.rs declares (unknown fields are errors there too), with enum values it knows; and, when the
   binary is fresh, passes `iro check-config`.
7. Each overlay, rendered (with `kubectl kustomize` or `kustomize build` when one is installed, else with a
   built-in approximation of kustomize's patching, which the report names), is consistent with its run config:
   the coordinator's RUN_NAME equals run.id; cluster.train_ranks <= the number of workers; an s3:// store comes
   with the iro-s3 secret in the coordinator and the workers, a local-folder store is mounted in both; every
   model and data path of the config lies under a volume the workers mount; every `$(VAR)` in a command or env
   value is defined (env values only by variables defined earlier); every volumeMount has its volume; files the
   iro flags point at (--config, --token-file, --status-token-file, --tls-*) are provided by a mounted ConfigMap or Secret; Service selectors
   and port names match a pod.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("check_k8s: PyYAML is missing: pip install pyyaml")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
CLI_DIR = ROOT / "src" / "cli"
CONFIG_RS = ROOT / "common" / "src" / "config.rs"
RUST_SOURCE_DIRS = [ROOT / d for d in ("src", "common/src", "coordinator/src", "worker/src")]
RUN_CONFIG_MAP = "iro-run-config"
S3_SECRET = "iro-s3"
WORKLOAD_KINDS = {"Pod", "Job", "StatefulSet", "Deployment", "DaemonSet", "ReplicaSet", "CronJob"}


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.notes: list[str] = []

    def add(self, where: Path | str, message: str) -> None:
        self.items.append(f"{rel(where)}: {message}")

    def note(self, message: str) -> None:
        self.notes.append(message)


def rel(path: Path | str) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except (ValueError, OSError):
        return str(path)


def kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# ------------------------------------------------------------------------------------------------ CLI spec


@dataclass
class Flag:
    name: str
    takes_value: bool
    required: bool


@dataclass
class Command:
    flags: dict[str, Flag] = field(default_factory=dict)
    subcommands: dict[str, "Command"] = field(default_factory=dict)
    positionals: int = 0


@dataclass
class CliSpec:
    root: Command
    source: str  # what the spec was read from, for the report
    binary: Path | None = None


def find_binary(explicit: str | None, problems: Problems) -> Path | None:
    """The newest built `iro`, if it is at least as new as every src/cli source (else it is stale)."""
    if explicit:
        p = Path(explicit)
        return p if p.is_file() and os.access(p, os.X_OK) else None
    # CARGO_TARGET_DIR, when set, is where cargo put the build (relative paths are from the repository root).
    target_dirs = [ROOT / "target"]
    if os.environ.get("CARGO_TARGET_DIR"):
        target_dirs.insert(0, ROOT / os.environ["CARGO_TARGET_DIR"])
    candidates = [t / d / "iro" for t in target_dirs for d in ("release", "debug")]
    built = [p for p in candidates if p.is_file() and os.access(p, os.X_OK)]
    if not built:
        problems.note("no built binary (target/{release,debug}/iro)")
        return None
    newest = max(built, key=lambda p: p.stat().st_mtime)
    sources = list(CLI_DIR.glob("*.rs")) + [ROOT / "src" / "main.rs"]
    newest_source = max(sources, key=lambda p: p.stat().st_mtime)
    if newest_source.stat().st_mtime > newest.stat().st_mtime:
        problems.note(f"{rel(newest)} is older than {rel(newest_source)}: not trusted for the CLI")
        return None
    return newest


HELP_FLAG = re.compile(r"^\s+(?:-[A-Za-z0-9], )?--([A-Za-z0-9][A-Za-z0-9-]*)(?:[ =]<([^>]+)>)?")


def run_help(binary: Path, words: list[str]) -> str:
    out = subprocess.run(
        [str(binary), *words, "--help"], capture_output=True, text=True, timeout=60, env={**os.environ, "NO_COLOR": "1"}
    )
    if out.returncode != 0:
        raise RuntimeError(f"`{binary.name} {' '.join(words)} --help` exited {out.returncode}: {out.stderr.strip()[:300]}")
    return out.stdout


def parse_help(text: str) -> tuple[dict[str, Flag], list[str], int]:
    """Flags, subcommand names and the number of positionals of one `--help` page."""
    flags: dict[str, Flag] = {}
    subs: list[str] = []
    section = ""
    usage = ""
    for line in text.splitlines():
        if line.startswith("Usage:"):
            usage = line
            continue
        if line and not line.startswith(" "):
            section = line.rstrip(":").strip()
            continue
        if section == "Commands":
            m = re.match(r"^\s+([a-z0-9][a-z0-9-]*)\s", line + " ")
            if m and m.group(1) != "help":
                subs.append(m.group(1))
        elif section in ("Options", "Arguments") or section.endswith("Options"):
            m = HELP_FLAG.match(line)
            if m:
                flags[m.group(1)] = Flag(m.group(1), takes_value=m.group(2) is not None, required=False)
    # Required flags are the ones the usage line names outside brackets.
    bare = re.sub(r"\[[^\]]*\]", "", usage)
    for name in re.findall(r"--([A-Za-z0-9][A-Za-z0-9-]*)", bare):
        if name in flags:
            flags[name].required = True
    positionals = len([p for p in re.findall(r"<([A-Z_]+)>", re.sub(r"--[A-Za-z0-9-]+ <[^>]+>", "", bare)) if p != "COMMAND"])
    return flags, subs, positionals


def spec_from_binary(binary: Path) -> CliSpec:
    def load(words: list[str], inherited: dict[str, Flag]) -> Command:
        flags, subs, positionals = parse_help(run_help(binary, words))
        cmd = Command(flags={**inherited, **flags}, positionals=positionals)
        for sub in subs:
            cmd.subcommands[sub] = Lazy(lambda s=sub: load([*words, s], global_flags))
        return cmd

    root_flags, _, _ = parse_help(run_help(binary, []))
    global_flags = {k: v for k, v in root_flags.items() if k not in ("help", "version")}
    root = load([], {})
    return CliSpec(root, f"`{rel(binary)} <sub> --help`", binary)


class Lazy(Command):
    """A subcommand whose --help is only run when a manifest uses it."""

    def __init__(self, loader):  # noqa: D401
        self._loader = loader
        self._cmd: Command | None = None

    def _get(self) -> Command:
        if self._cmd is None:
            self._cmd = self._loader()
        return self._cmd

    @property
    def flags(self):  # type: ignore[override]
        return self._get().flags

    @property
    def subcommands(self):  # type: ignore[override]
        return self._get().subcommands

    @property
    def positionals(self):  # type: ignore[override]
        return self._get().positionals


def strip_rust_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(re.sub(r"(?<!:)//.*$", "", line) for line in text.splitlines())


def rust_items(text: str, keyword: str) -> dict[str, tuple[list[str], str]]:
    """`struct`/`enum` name -> (the attributes just before it, its braced body)."""
    items = {}
    for m in re.finditer(rf"((?:#\[[^\n]*\]\s*)*)(?:pub(?:\([^)]*\))?\s+)?{keyword}\s+(\w+)[^{{;]*\{{", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        items[m.group(2)] = (re.findall(r"#\[([^\n]*)\]", m.group(1)), text[m.end() : i - 1])
    return items


def split_members(body: str) -> list[tuple[list[str], str]]:
    """Top-level members of a struct or enum body: (attributes, declaration) pairs."""
    members, attrs, buf, depth = [], [], "", 0
    i = 0
    while i < len(body):
        c = body[i]
        if depth == 0 and body.startswith("#[", i):
            j, d = i + 2, 1
            while d and j < len(body):
                d += {"[": 1, "]": -1}.get(body[j], 0)
                j += 1
            attrs.append(body[i + 2 : j - 1])
            i = j
            continue
        if c in "{(<[":
            depth += 1
        elif c in "})>]":
            depth -= 1
        if c == "," and depth == 0:
            if buf.strip():
                members.append((attrs, buf.strip()))
            attrs, buf = [], ""
        else:
            buf += c
        i += 1
    if buf.strip():
        members.append((attrs, buf.strip()))
    return members


def args_of_struct(body: str, structs: dict) -> tuple[dict[str, Flag], int]:
    flags: dict[str, Flag] = {}
    positionals = 0
    for attrs, decl in split_members(body):
        m = re.match(r"(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:\s*(.+)$", decl, flags=re.S)
        if not m:
            continue
        fname, ftype = m.group(1), m.group(2).strip()
        arg = " ".join(a for a in attrs if a.startswith("arg(") or a.startswith("clap("))
        if any(a.startswith("command(flatten)") or "flatten" in a for a in attrs):
            inner = structs.get(re.sub(r".*::", "", ftype))
            if inner:
                more, _ = args_of_struct(inner[1], structs)
                flags.update(more)
            continue
        if any(a.startswith("command(subcommand)") for a in attrs):
            continue
        if re.search(r"\blong\b", arg):
            explicit = re.search(r'\blong\s*=\s*"([^"]+)"', arg)
            name = explicit.group(1) if explicit else fname.replace("_", "-")
            is_bool = ftype == "bool"
            optional = (
                is_bool
                or ftype.startswith("Option<")
                or ftype.startswith("Vec<")
                or "default_value" in arg
                or "required = false" in arg
            )
            flags[name] = Flag(name, takes_value=not is_bool, required=not optional)
        else:
            positionals += 1
    return flags, positionals


def spec_from_sources() -> CliSpec:
    text = "\n".join(strip_rust_comments(p.read_text()) for p in sorted(CLI_DIR.glob("*.rs")))
    structs = rust_items(text, "struct")
    enums = rust_items(text, "enum")
    cli = structs.get("Cli")
    if cli is None or "Command" not in enums:
        raise RuntimeError(f"{rel(CLI_DIR)}: no `struct Cli` / `enum Command` found")
    global_flags = {k: v for k, v in args_of_struct(cli[1], structs)[0].items()}
    for name in ("help",):
        global_flags[name] = Flag(name, False, False)

    def command_from_enum(enum_name: str) -> Command:
        cmd = Command(flags=dict(global_flags))
        for attrs, decl in split_members(enums[enum_name][1]):
            m = re.match(r"(\w+)\s*(\((.*)\)|\{(.*)\})?\s*$", decl, flags=re.S)
            if not m:
                continue
            variant = m.group(1)
            explicit = next((re.search(r'name\s*=\s*"([^"]+)"', a) for a in attrs if a.startswith("command(")), None)
            sub_name = explicit.group(1) if explicit else kebab(variant)
            if any(a.startswith("command(subcommand)") for a in attrs) and m.group(3):
                cmd.subcommands[sub_name] = command_from_enum(re.sub(r".*::", "", m.group(3).strip()))
                continue
            sub = Command(flags=dict(global_flags))
            if m.group(3):  # Variant(path::Args)
                st = structs.get(re.sub(r".*::", "", m.group(3).strip()))
                if st:
                    flags, sub.positionals = args_of_struct(st[1], structs)
                    sub.flags.update(flags)
            elif m.group(4):  # Variant { fields }
                flags, sub.positionals = args_of_struct(m.group(4), structs)
                sub.flags.update(flags)
            cmd.subcommands[sub_name] = sub
        return cmd

    root = command_from_enum("Command")
    root.flags["version"] = Flag("version", False, False)
    return CliSpec(root, f"{rel(CLI_DIR)}/*.rs (`#[arg(long ...)]` fields and the `Command` enum)")


def check_iro_argv(argv: list[str], spec: CliSpec, where: str, full: bool, problems: Problems) -> str | None:
    """Validates `iro SUB --flag value ...`; returns the subcommand path (e.g. 'worker')."""
    cmd, path, i = spec.root, [], 0
    while i < len(argv) and not argv[i].startswith("-") and cmd.subcommands:
        word = argv[i]
        if word not in cmd.subcommands:
            problems.add(where, f"`iro {' '.join(path + [word])}`: no such subcommand "
                                f"(known: {', '.join(sorted(cmd.subcommands))})")
            return None
        cmd, path, i = cmd.subcommands[word], path + [word], i + 1
    if not path:
        problems.add(where, "`iro` is run without a subcommand")
        return None
    seen: set[str] = set()
    positionals = 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("--"):
            name, _, inline = word[2:].partition("=")
            flag = cmd.flags.get(name)
            if flag is None:
                problems.add(where, f"`iro {' '.join(path)}` has no flag --{name} "
                                    f"(it has: {', '.join('--' + f for f in sorted(cmd.flags))})")
                # Its value, if it has one, is not a positional argument.
                i += 2 if not inline and i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
                continue
            seen.add(name)
            if flag.takes_value and not inline:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    problems.add(where, f"`iro {' '.join(path)} --{name}` needs a value")
                else:
                    i += 1
            elif not flag.takes_value and inline:
                problems.add(where, f"`iro {' '.join(path)} --{name}` takes no value")
        elif word.startswith("-") and word != "-":
            problems.add(where, f"`iro {' '.join(path)}`: short flag {word} not checked; use the long form")
        else:
            positionals += 1
        i += 1
    if full:
        for name, flag in cmd.flags.items():
            if flag.required and name not in seen:
                problems.add(where, f"`iro {' '.join(path)}` is missing its required flag --{name}")
        if positionals > cmd.positionals:
            problems.add(where, f"`iro {' '.join(path)}` takes {cmd.positionals} positional argument(s), got {positionals}")
    return " ".join(path)


# ------------------------------------------------------------------------------------------------ YAML


@dataclass
class Doc:
    path: Path
    index: int
    body: dict

    @property
    def kind(self) -> str:
        return self.body.get("kind", "")

    @property
    def name(self) -> str:
        return (self.body.get("metadata") or {}).get("name", "")

    @property
    def where(self) -> str:
        return f"{rel(self.path)} [document {self.index + 1}, {self.kind} {self.name}]"


def load_yaml_files(problems: Problems) -> dict[Path, list[Doc]]:
    files: dict[Path, list[Doc]] = {}
    for path in sorted(list(K8S.rglob("*.yaml")) + list(K8S.rglob("*.yml"))):
        try:
            raw = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as e:
            problems.add(path, f"does not parse as YAML: {e}")
            continue
        docs = []
        for i, body in enumerate(raw):
            if body is None:
                continue
            if not isinstance(body, dict):
                problems.add(path, f"document {i + 1} is a {type(body).__name__}, not a mapping")
                continue
            doc = Doc(path, i, body)
            for key in ("apiVersion", "kind"):
                if not isinstance(body.get(key), str) or not body.get(key):
                    problems.add(path, f"document {i + 1} has no {key}")
            meta = body.get("metadata")
            if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta.get("name"):
                problems.add(path, f"document {i + 1} ({body.get('kind', '?')}) has no metadata.name")
            docs.append(doc)
        files[path] = docs
    return files


def pod_specs(body: dict) -> list[dict]:
    kind = body.get("kind")
    spec = body.get("spec") or {}
    if kind == "Pod":
        return [spec]
    if kind == "CronJob":
        return [(((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}]
    if kind in WORKLOAD_KINDS:
        return [((spec.get("template") or {}).get("spec")) or {}]
    return []


def containers(pod: dict) -> list[dict]:
    return [c for c in (pod.get("initContainers") or []) + (pod.get("containers") or []) if isinstance(c, dict)]


def iro_argv(container: dict) -> list[str] | None:
    argv = [str(x) for x in (container.get("command") or []) + (container.get("args") or [])]
    for i, word in enumerate(argv):
        if os.path.basename(word) == "iro":
            return argv[i + 1 :]
    return None


@dataclass
class Kustomization:
    dir: Path
    body: dict
    resource_files: list[Path] = field(default_factory=list)
    patch_files: list[Path] = field(default_factory=list)
    inline_patches: list[tuple[dict, str]] = field(default_factory=list)
    bases: list[Path] = field(default_factory=list)
    config_maps: dict[str, dict[str, Path]] = field(default_factory=dict)
    secrets: dict[str, dict[str, Path]] = field(default_factory=dict)


def load_kustomization(d: Path, problems: Problems) -> Kustomization | None:
    path = d / "kustomization.yaml"
    if not path.is_file():
        return None
    body = yaml.safe_load(path.read_text()) or {}
    k = Kustomization(d, body)
    for entry in body.get("resources") or []:
        target = (d / entry).resolve()
        if target.is_dir():
            if (target / "kustomization.yaml").is_file():
                k.bases.append(target)
            else:
                problems.add(path, f"resource {entry} is a folder without kustomization.yaml")
        elif target.is_file():
            k.resource_files.append(target)
        else:
            problems.add(path, f"resource {entry} does not exist")
    for entry in (body.get("patches") or []) + (body.get("patchesStrategicMerge") or []):
        if isinstance(entry, str):
            entry = {"path": entry}
        if "path" in entry:
            target = (d / entry["path"]).resolve()
            if target.is_file():
                k.patch_files.append(target)
            else:
                problems.add(path, f"patch {entry['path']} does not exist")
        elif "patch" in entry:
            k.inline_patches.append((entry.get("target") or {}, entry["patch"]))
    for gen_key, dest in (("configMapGenerator", k.config_maps), ("secretGenerator", k.secrets)):
        for gen in body.get(gen_key) or []:
            files = {}
            for f in gen.get("files") or []:
                key, _, src = f.partition("=") if "=" in f else (Path(f).name, "", f)
                src_path = (d / src).resolve()
                if not src_path.is_file():
                    problems.add(path, f"{gen_key} {gen.get('name')}: file {src} does not exist")
                files[key] = src_path
            for lit in gen.get("literals") or []:
                files[lit.partition("=")[0]] = None
            dest[gen.get("name", "")] = files
    for img in body.get("images") or []:
        if "name" not in img:
            problems.add(path, "an images entry has no name")
    return k


# ------------------------------------------------------------------------------------------------ references


@dataclass
class Index:
    """Names by kind that a kustomization root (and its bases) define."""

    names: dict[str, set[str]] = field(default_factory=dict)
    secret_keys: dict[str, set[str]] = field(default_factory=dict)
    config_map_keys: dict[str, set[str]] = field(default_factory=dict)
    service_ports: dict[str, set[int]] = field(default_factory=dict)
    # StatefulSet name -> (its governing Service, replicas): a pod's DNS name is {name}-{i}.{service}.
    stateful_sets: dict[str, tuple[str, int]] = field(default_factory=dict)

    def add(self, kind: str, name: str) -> None:
        self.names.setdefault(kind, set()).add(name)

    def has(self, kind: str, name: str) -> bool:
        return name in self.names.get(kind, set())

    def merged(self, other: "Index") -> "Index":
        out = copy.deepcopy(self)
        for kind, names in other.names.items():
            out.names.setdefault(kind, set()).update(names)
        out.stateful_sets.update(other.stateful_sets)
        for attr in ("secret_keys", "config_map_keys", "service_ports"):
            for k, v in getattr(other, attr).items():
                getattr(out, attr).setdefault(k, set()).update(v)
        return out


def index_docs(docs: list[Doc], k: Kustomization | None) -> Index:
    idx = Index()
    for d in docs:
        idx.add(d.kind, d.name)
        if d.kind == "StatefulSet":
            spec = d.body.get("spec") or {}
            idx.stateful_sets[d.name] = (spec.get("serviceName", ""), int(spec.get("replicas", 1)))
        if d.kind == "Secret":
            idx.secret_keys.setdefault(d.name, set()).update((d.body.get("stringData") or {}).keys())
            idx.secret_keys[d.name].update((d.body.get("data") or {}).keys())
        if d.kind == "ConfigMap":
            idx.config_map_keys.setdefault(d.name, set()).update((d.body.get("data") or {}).keys())
        if d.kind == "Service":
            ports = idx.service_ports.setdefault(d.name, set())
            for p in (d.body.get("spec") or {}).get("ports") or []:
                ports.add(int(p.get("port", 0)))
    if k:
        for name, files in k.config_maps.items():
            idx.add("ConfigMap", name)
            idx.config_map_keys.setdefault(name, set()).update(files.keys())
        for name, files in k.secrets.items():
            idx.add("Secret", name)
            idx.secret_keys.setdefault(name, set()).update(files.keys())
    return idx


URL = re.compile(r"\b(?:https?|grpc)://([a-z0-9]([-a-z0-9]*[a-z0-9])?)(?:\.([-a-z0-9.]+))?:(\d+)")


def pod_service(idx: "Index", host: str, rest: str | None) -> tuple[str | None, str | None]:
    """For `{set}-{i}.{service}...`, a StatefulSet pod's DNS name: (the service, a problem or None)."""
    m = re.fullmatch(r"(.+)-(\d+)", host)
    if not m or m.group(1) not in idx.stateful_sets or not rest:
        return None, None
    service, replicas = idx.stateful_sets[m.group(1)]
    if rest.split(".")[0] != service:
        return service, f"pod `{host}` is reached through its StatefulSet's Service `{service}`, not `{rest.split('.')[0]}`"
    if int(m.group(2)) >= replicas:
        return service, f"pod `{host}` does not exist: StatefulSet `{m.group(1)}` has {replicas} replica(s)"
    return service, None


def check_references(doc: Doc, idx: Index, problems: Problems) -> None:
    """Names that `doc` refers to must exist in `idx`."""

    def need(kind: str, name: str, what: str) -> None:
        if not name:
            return
        if idx.has(kind, name):
            return
        problems.add(doc.where, f"{what} names {kind} `{name}`, which no manifest of the base (or this overlay) defines")

    body = doc.body
    if body.get("kind") == "RoleBinding":
        ref = body.get("roleRef") or {}
        need(ref.get("kind", "Role"), ref.get("name", ""), "roleRef")
        for s in body.get("subjects") or []:
            if s.get("kind") == "ServiceAccount":
                need("ServiceAccount", s.get("name", ""), "subject")
    if body.get("kind") == "StatefulSet":
        need("Service", (body.get("spec") or {}).get("serviceName", ""), "spec.serviceName")
    for pod in pod_specs(body):
        need("ServiceAccount", pod.get("serviceAccountName", ""), "serviceAccountName")
        for vol in pod.get("volumes") or []:
            if "secret" in vol:
                name = vol["secret"].get("secretName", "")
                need("Secret", name, f"volume {vol.get('name')}")
                keys = idx.secret_keys.get(name)
                for item in vol["secret"].get("items") or []:
                    if keys is not None and item.get("key") not in keys:
                        problems.add(doc.where, f"volume {vol.get('name')}: Secret `{name}` has no key `{item.get('key')}` "
                                                f"(its keys: {', '.join(sorted(keys))})")
            if "configMap" in vol:
                need("ConfigMap", vol["configMap"].get("name", ""), f"volume {vol.get('name')}")
            if "persistentVolumeClaim" in vol:
                need("PersistentVolumeClaim", vol["persistentVolumeClaim"].get("claimName", ""), f"volume {vol.get('name')}")
            for src in (vol.get("projected") or {}).get("sources") or []:
                if "secret" in src:
                    need("Secret", src["secret"].get("name", ""), f"projected volume {vol.get('name')}")
                if "configMap" in src:
                    need("ConfigMap", src["configMap"].get("name", ""), f"projected volume {vol.get('name')}")
        for c in containers(pod):
            for ef in c.get("envFrom") or []:
                if "secretRef" in ef:
                    need("Secret", ef["secretRef"].get("name", ""), f"container {c.get('name')} envFrom")
                if "configMapRef" in ef:
                    need("ConfigMap", ef["configMapRef"].get("name", ""), f"container {c.get('name')} envFrom")
            for env in c.get("env") or []:
                vf = env.get("valueFrom") or {}
                if "secretKeyRef" in vf:
                    need("Secret", vf["secretKeyRef"].get("name", ""), f"env {env.get('name')}")
                if "configMapKeyRef" in vf:
                    need("ConfigMap", vf["configMapKeyRef"].get("name", ""), f"env {env.get('name')}")
                for m in URL.finditer(str(env.get("value") or "")):
                    svc, port = m.group(1), int(m.group(4))
                    via, problem = pod_service(idx, svc, m.group(3))
                    if problem:
                        problems.add(doc.where, f"env {env.get('name')} ({m.group(0)}): {problem}")
                    svc = via or svc
                    need("Service", svc, f"env {env.get('name')} ({m.group(0)})")
                    ports = idx.service_ports.get(svc)
                    if ports is not None and port not in ports:
                        problems.add(doc.where, f"env {env.get('name')}: Service `{svc}` has no port {port} "
                                                f"(it has {', '.join(map(str, sorted(ports)))})")


def rust_string_literals() -> set[str]:
    found: set[str] = set()
    for d in RUST_SOURCE_DIRS:
        for p in d.rglob("*.rs"):
            found.update(re.findall(r'"(IRO_[A-Z0-9_]+)"', p.read_text(errors="replace")))
    return found


# ------------------------------------------------------------------------------------------------ run config


@dataclass
class ConfigSchema:
    sections: dict[str, dict[str, str]]  # section -> field -> Rust type
    enums: dict[str, set[str]]


def load_config_schema() -> ConfigSchema:
    text = strip_rust_comments(CONFIG_RS.read_text())
    structs = rust_items(text, "struct")
    enums_raw = rust_items(text, "enum")

    def fields(body: str) -> dict[str, str]:
        out = {}
        for attrs, decl in split_members(body):
            m = re.match(r"pub\s+(\w+)\s*:\s*(.+)$", decl, flags=re.S)
            if not m:
                continue
            rename = next((re.search(r'rename\s*=\s*"([^"]+)"', a) for a in attrs if a.startswith("serde(")), None)
            out[rename.group(1) if rename else m.group(1)] = m.group(2).strip()
        return out

    enums = {}
    for name, (attrs, body) in enums_raw.items():
        snake_case = any("rename_all" in a and "snake_case" in a for a in attrs)
        variants = [re.match(r"\w+", decl).group(0) for _, decl in split_members(body) if re.match(r"\w+", decl)]
        enums[name] = {snake(v) if snake_case else v for v in variants}
    top = fields(structs["RunConfig"][1])
    sections = {sec: fields(structs[ty][1]) for sec, ty in top.items() if ty in structs}
    return ConfigSchema(sections, enums)


def check_value(value, rust_type: str, schema: ConfigSchema) -> str | None:
    t = rust_type.replace(" ", "")
    if t.startswith("Vec<") and t.endswith(">"):
        if not isinstance(value, list):
            return f"expected a list, got {type(value).__name__}"
        for v in value:
            err = check_value(v, t[4:-1], schema)
            if err:
                return err
        return None
    if t in ("String", "PathBuf"):
        return None if isinstance(value, str) else f"expected a string, got {type(value).__name__}"
    if t in ("u8", "u16", "u32", "u64", "usize"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else f"expected a non-negative integer, got {value!r}"
    if t in ("f32", "f64"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {value!r}"
    if t == "bool":
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if t in schema.enums:
        return None if value in schema.enums[t] else f"`{value}` is not one of {', '.join(sorted(schema.enums[t]))}"
    return None  # a type this check does not know: iro check-config has the last word


def check_run_config(path: Path, schema: ConfigSchema, binary: Path | None, problems: Problems) -> dict | None:
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        problems.add(path, f"does not parse as TOML: {e}")
        return None
    for section, table in config.items():
        if section not in schema.sections:
            problems.add(path, f"unknown section [{section}] (common/src/config.rs has: {', '.join(schema.sections)})")
            continue
        if not isinstance(table, dict):
            problems.add(path, f"[{section}] must be a table")
            continue
        for key, value in table.items():
            rust_type = schema.sections[section].get(key)
            if rust_type is None:
                problems.add(path, f"unknown field {section}.{key} "
                                   f"(common/src/config.rs: {', '.join(schema.sections[section])})")
                continue
            err = check_value(value, rust_type, schema)
            if err:
                problems.add(path, f"{section}.{key}: {err}")
    if binary is not None:
        env = {**os.environ, "RUST_BACKTRACE": "0", "RUST_LIB_BACKTRACE": "0", "NO_COLOR": "1"}
        out = subprocess.run([str(binary), "check-config", str(path)], capture_output=True, text=True, timeout=120, env=env)
        if out.returncode != 0:
            text = out.stderr.split("Stack backtrace:")[0]
            lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not re.match(r"^\s*(\d+\s*)?\|", ln)]
            problems.add(path, f"`iro check-config` rejects it: {' / '.join(lines) or '(no message)'}")
    return config


# ------------------------------------------------------------------------------------------------ rendering


def find_renderer() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, text=True)
        if out.returncode == 0:
            return ["kubectl", "kustomize"]
    return None


def render_with_tool(tool: list[str], d: Path) -> list[dict]:
    out = subprocess.run([*tool, str(d)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or out.stdout.strip())
    return [b for b in yaml.safe_load_all(out.stdout) if b]


MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "volumeMounts": "name",
              "env": "name", "ports": "containerPort", "volumeClaimTemplates": "metadata.name"}


def _key_of(item: dict, key: str):
    for part in key.split("."):
        item = (item or {}).get(part) if isinstance(item, dict) else None
    return item


def strategic_merge(base, patch, field_name: str = ""):
    """An approximation of kustomize's strategic merge: maps merge, null deletes, named lists merge by key."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if k.startswith("$patch"):
                continue
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field_name in MERGE_KEYS:
        key = MERGE_KEYS[field_name]
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            k = _key_of(item, key) if isinstance(item, dict) else None
            match = next((i for i, x in enumerate(out) if isinstance(x, dict) and _key_of(x, key) == k), None)
            if match is None:
                out.insert(0, copy.deepcopy(item))  # kustomize puts new list items first
            else:
                out[match] = strategic_merge(out[match], item, "")
        return out
    return copy.deepcopy(patch)


def json6902(body: dict, ops: list[dict]) -> None:
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        parent = body
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if op["op"] == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                parent.pop(last)
        elif op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif op["op"] == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]


def render_builtin(d: Path, problems: Problems) -> list[dict]:
    k = load_kustomization(d, Problems())
    if k is None:
        return []
    docs: list[dict] = []
    for b in k.bases:
        docs.extend(render_builtin(b, problems))
    for f in k.resource_files:
        docs.extend(b for b in yaml.safe_load_all(f.read_text()) if b)
    for gen in k.body.get("configMapGenerator") or []:
        data = {key: (p.read_text() if p else "") for key, p in k.config_maps.get(gen["name"], {}).items()}
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}
        existing = next((x for x in docs if x.get("kind") == "ConfigMap" and x["metadata"]["name"] == gen["name"]), None)
        if existing is not None and gen.get("behavior") in ("replace", "merge"):
            existing["data"] = data if gen["behavior"] == "replace" else {**existing.get("data", {}), **data}
        else:
            docs.append(cm)
    for f in k.patch_files:
        for patch in (p for p in yaml.safe_load_all(f.read_text()) if p):
            for i, x in enumerate(docs):
                if x.get("kind") == patch.get("kind") and x["metadata"]["name"] == patch["metadata"]["name"]:
                    docs[i] = strategic_merge(x, patch)
    for target, text in k.inline_patches:
        patch = yaml.safe_load(text)
        for i, x in enumerate(docs):
            if target.get("kind", x.get("kind")) == x.get("kind") and target.get("name", x["metadata"]["name"]) == x["metadata"]["name"]:
                if isinstance(patch, list):
                    json6902(x, patch)
                else:
                    docs[i] = strategic_merge(x, patch)
    for img in k.body.get("images") or []:
        for x in docs:
            for pod in pod_specs(x):
                for c in containers(pod):
                    name, _, tag = str(c.get("image", "")).partition(":")
                    if name == img["name"]:
                        new = img.get("newName", name)
                        c["image"] = f"{new}:{img.get('newTag', tag or 'latest')}"
    return docs


# ------------------------------------------------------------------------------------------------ overlay consistency


def env_value(container: dict, name: str):
    for env in container.get("env") or []:
        if env.get("name") == name:
            return env.get("value")
    return None


def mount_for(container: dict, path: str) -> dict | None:
    best = None
    for m in container.get("volumeMounts") or []:
        mp = m.get("mountPath", "").rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    return best


def check_rendered(name: str, docs: list[dict], config: dict | None, idx: Index, spec: CliSpec | None,
                   problems: Problems) -> None:
    where = f"k8s/overlays/{name} (rendered)" if name != "base" else "k8s/base (rendered)"
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d.get("kind", ""), []).append(d)
    rendered_cms = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    template_secrets = idx.secret_keys

    coordinator = worker = None
    worker_job = None
    for d in docs:
        for pod in pod_specs(d):
            volumes = {v.get("name"): v for v in pod.get("volumes") or []}
            claim_templates = {(t.get("metadata") or {}).get("name") for t in (d.get("spec") or {}).get("volumeClaimTemplates") or []}
            for c in containers(pod):
                cwhere = f"{where}: {d['kind']} {d['metadata']['name']}, container {c.get('name')}"
                defined: list[str] = []
                for env in c.get("env") or []:
                    for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(env.get("value") or "")):
                        if ref not in defined:
                            problems.add(cwhere, f"env {env.get('name')} uses $({ref}), which is not defined before it")
                    defined.append(env.get("name"))
                for word in (c.get("command") or []) + (c.get("args") or []):
                    for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(word)):
                        if ref not in defined:
                            problems.add(cwhere, f"`{word}` uses $({ref}), which the container's env does not define")
                for m in c.get("volumeMounts") or []:
                    if m.get("name") not in volumes and m.get("name") not in claim_templates:
                        problems.add(cwhere, f"volumeMount {m.get('name')} has no volume")
                argv = iro_argv(c)
                if argv is None:
                    continue
                sub = check_iro_argv(argv, spec, cwhere, True, problems) if spec else (argv[0] if argv else None)
                # Files the flags name must be provided by a mounted ConfigMap or Secret.
                for flag in ("--config", "--token-file", "--status-token-file", "--tls-cert", "--tls-key",
                             "--tls-client-ca", "--tls-ca"):
                    if flag in argv and argv.index(flag) + 1 < len(argv):
                        path = argv[argv.index(flag) + 1]
                        m = mount_for(c, path)
                        if m is None:
                            problems.add(cwhere, f"{flag} {path} is not under any volumeMount")
                            continue
                        vol = volumes.get(m["name"], {})
                        relpath = path[len(m["mountPath"].rstrip("/")) + 1 :]
                        if "configMap" in vol:
                            cm = rendered_cms.get(vol["configMap"].get("name"))
                            keys = set((cm or {}).get("data", {}).keys())
                            items = {i.get("path") for i in vol["configMap"].get("items") or []}
                            if relpath not in (items or keys):
                                problems.add(cwhere, f"{flag} {path}: ConfigMap {vol['configMap'].get('name')} "
                                                     f"mounted at {m['mountPath']} provides no `{relpath}`")
                        elif "secret" in vol:
                            items = {i.get("path") for i in vol["secret"].get("items") or []}
                            keys = items or template_secrets.get(vol["secret"].get("secretName"), set())
                            if relpath not in keys:
                                problems.add(cwhere, f"{flag} {path}: Secret {vol['secret'].get('secretName')} "
                                                     f"mounted at {m['mountPath']} provides no `{relpath}`")
                # Folders iro writes must be writable; the coordinator's state must outlive the pod.
                for flag in ("--state-dir", "--work-dir"):
                    if flag in argv and argv.index(flag) + 1 < len(argv):
                        path = argv[argv.index(flag) + 1]
                        m = mount_for(c, path)
                        vol = volumes.get(m["name"], {}) if m else {}
                        on_claim = m is not None and (m["name"] in claim_templates or "persistentVolumeClaim" in vol)
                        if m is None and flag == "--state-dir":
                            problems.add(cwhere, f"{flag} {path} is on the container's own disk: a rescheduled "
                                                 f"coordinator would lose the run; put it on a PersistentVolumeClaim")
                        elif m is None:
                            if path.startswith("/") and (c.get("securityContext") or {}).get("readOnlyRootFilesystem"):
                                problems.add(cwhere, f"{flag} {path} is on a read-only root filesystem")
                        elif m.get("readOnly") or "configMap" in vol or "secret" in vol:
                            problems.add(cwhere, f"{flag} {path} is on the read-only mount {m['mountPath']}")
                        elif flag == "--state-dir" and not on_claim:
                            problems.add(cwhere, f"{flag} {path} is on volume {m['name']}, not a PersistentVolumeClaim: "
                                                 f"a rescheduled coordinator would lose the run")
                if sub == "coordinator":
                    coordinator = (d, c, pod)
                elif sub == "worker":
                    worker, worker_job = (d, c, pod), d

    # Services must select a pod and name its ports.
    for svc in by_kind.get("Service", []):
        sel = (svc.get("spec") or {}).get("selector") or {}
        matched = []
        for d in docs:
            labels = (((d.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
            if pod_specs(d) and sel and all(labels.get(k) == v for k, v in sel.items()):
                matched.append(d)
        if sel and not matched:
            problems.add(where, f"Service {svc['metadata']['name']} selects {sel}, which no pod template carries")
        for port in (svc.get("spec") or {}).get("ports") or []:
            tp = port.get("targetPort")
            if isinstance(tp, str) and matched:
                names = {p.get("name") for d in matched for pod in pod_specs(d) for c in containers(pod) for p in c.get("ports") or []}
                if tp not in names:
                    problems.add(where, f"Service {svc['metadata']['name']}: targetPort `{tp}` is no container port name")

    if config is None:
        return
    if coordinator is None:
        problems.add(where, "no container runs `iro coordinator`")
    if worker is None:
        problems.add(where, "no container runs `iro worker`")
    if coordinator is None or worker is None:
        return
    run = config.get("run", {})
    cluster = config.get("cluster", {})
    _, cc, _ = coordinator
    _, wc, _ = worker
    run_name = env_value(cc, "RUN_NAME")
    if run_name is not None and run_name != run.get("id", "iro"):
        problems.add(where, f"the coordinator's RUN_NAME is `{run_name}` but the run config's run.id is `{run.get('id', 'iro')}`")
    workers = (worker_job.get("spec") or {}).get("parallelism", 1) if worker_job else 1
    ranks = cluster.get("train_ranks", 1)
    if ranks > workers:
        problems.add(where, f"cluster.train_ranks = {ranks} but only {workers} workers run: the training gang can never form")
    if worker_job and worker_job.get("kind") == "Job":
        spec_ = worker_job.get("spec") or {}
        if spec_.get("completions") not in (None, spec_.get("parallelism")):
            problems.add(where, f"the worker Job's completions ({spec_.get('completions')}) differ from its parallelism ({spec_.get('parallelism')})")
    store = str(run.get("store", "runs"))
    for label, c in (("coordinator", cc), ("worker", wc)):
        secrets = {(ef.get("secretRef") or {}).get("name") for ef in c.get("envFrom") or []}
        if store.startswith("s3://"):
            if S3_SECRET not in secrets:
                problems.add(where, f"run.store is {store} but the {label} does not get the `{S3_SECRET}` secret (envFrom)")
        else:
            if not store.startswith("/"):
                problems.add(where, f"run.store `{store}` is a relative folder: use an absolute path on a shared volume")
            elif mount_for(c, store) is None:
                problems.add(where, f"run.store is the folder {store}, which the {label} does not mount")
    paths = [("policy", "model"), ("data", "train"), ("data", "test"), ("reward", "model"), ("reward", "eval_model"),
             ("value", "init"), ("baselines", "w2s_tuned"), ("baselines", "w2s_untuned")]
    for section, key in paths:
        value = config.get(section, {}).get(key)
        if not value:
            continue
        if not str(value).startswith("/"):
            problems.add(where, f"{section}.{key} = {value} is relative: workers resolve it against their working "
                                f"directory; use an absolute path under a mounted volume")
        elif mount_for(wc, str(value)) is None:
            problems.add(where, f"{section}.{key} = {value} is under no volume the workers mount")
    limits = ((wc.get("resources") or {}).get("limits") or {})
    device = env_value(wc, "WORKER_DEVICE") or ""
    if device.startswith("cuda") and "nvidia.com/gpu" not in limits:
        problems.add(where, f"workers run on {device} but request no nvidia.com/gpu")
    if device == "cpu" and "nvidia.com/gpu" in limits:
        problems.add(where, "workers run on cpu but request a GPU")


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", help="the iro binary whose --help defines the CLI (default: newest fresh build)")
    parser.add_argument("--source", action="store_true", help="read the CLI from src/cli/*.rs even if a binary exists")
    parser.add_argument("--no-render", action="store_true", help="use the built-in patcher even if kustomize exists")
    opts = parser.parse_args()
    problems = Problems()
    checked: list[str] = []

    # 1. YAML
    files = load_yaml_files(problems)
    ndocs = sum(len(v) for v in files.values())
    checked.append(f"{len(files)} YAML files, {ndocs} documents: parse, apiVersion/kind/metadata.name")

    # 2. kustomizations
    roots = [BASE] + sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))
    kusts = {d: load_kustomization(d, problems) for d in roots}
    if kusts.get(BASE) is None:
        problems.add(BASE, "has no kustomization.yaml")
    overlays = [d for d in roots if d != BASE]
    if not overlays:
        problems.add(OVERLAYS, "has no overlay with a kustomization.yaml")
    checked.append(f"{len(roots)} kustomizations (base + {', '.join(d.name for d in overlays)}): "
                   f"resources, patches and generator files exist")

    # 3. CLI
    spec: CliSpec | None = None
    binary = None if opts.source else find_binary(opts.binary, problems)
    if opts.binary and binary is None:
        problems.add(opts.binary, "is not an executable file")
    if binary is not None:
        try:
            spec = spec_from_binary(binary)
            spec.root.subcommands  # noqa: B018  (fails early if --help does not run)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            problems.note(f"{rel(binary)} --help failed ({e}); falling back to the sources")
            spec, binary = None, None
    if spec is None:
        try:
            spec = spec_from_sources()
        except RuntimeError as e:
            problems.add(CLI_DIR, str(e))
    patch_files = {p for k in kusts.values() if k for p in k.patch_files}
    n_iro = 0
    env_literals = rust_string_literals()
    for path, docs in files.items():
        for doc in docs:
            for pod in pod_specs(doc.body):
                for c in containers(pod):
                    for env in c.get("env") or []:
                        n = str(env.get("name", ""))
                        if n.startswith("IRO_") and n not in env_literals:
                            problems.add(doc.where, f"env {n}: no Rust source under src/, common/, coordinator/ or "
                                                    f"worker/ reads a variable of that name")
                    argv = iro_argv(c)
                    if argv is None or spec is None:
                        continue
                    n_iro += 1
                    where = f"{doc.where}, container {c.get('name')}"
                    check_iro_argv(argv, spec, where, path not in patch_files, problems)
    if spec:
        subs = ", ".join(sorted(spec.root.subcommands))
        checked.append(f"{n_iro} `iro` container commands against the CLI from {spec.source} (subcommands: {subs})")
    checked.append("IRO_* environment variables are read by the Rust sources")

    # 4. references
    base_docs = [d for p, docs in files.items() if p.parent == BASE for d in docs]
    base_k = kusts.get(BASE)
    base_idx = index_docs(base_docs, base_k)
    n_refs = 0
    for path, docs in files.items():
        idx = base_idx
        owner = next((k for k in kusts.values() if k and path.parent == k.dir), None)
        if owner and owner.dir != BASE:
            own = [d for f in owner.resource_files for d in files.get(f, [])]
            idx = base_idx.merged(index_docs(own, owner))
        for doc in docs:
            if doc.kind in ("Kustomization", "Secret"):
                continue
            check_references(doc, idx, problems)
            n_refs += 1
    checked.append(f"{n_refs} documents: every Secret/ConfigMap/PVC/ServiceAccount/Role/Service they name exists "
                   f"in k8s/base or the overlay's own resources; secret keys and service ports exist")

    # 5. run configs
    schema = load_config_schema()
    configs: dict[Path, dict | None] = {}
    config_binary = binary
    if binary is not None and CONFIG_RS.stat().st_mtime > binary.stat().st_mtime:
        problems.note(f"{rel(binary)} is older than {rel(CONFIG_RS)}: `iro check-config` not used")
        config_binary = None
    for d, k in kusts.items():
        if k is None:
            continue
        files_ = k.config_maps.get(RUN_CONFIG_MAP)
        if not files_:
            if d == BASE:
                problems.add(d / "kustomization.yaml", f"has no configMapGenerator `{RUN_CONFIG_MAP}`")
            continue
        for key, src in files_.items():
            if src is None or not src.is_file():
                continue
            if src.suffix != ".toml":
                problems.add(src, "the run config should be a .toml file")
            configs[d] = check_run_config(src, schema, config_binary, problems)
    for d in overlays:
        if d not in configs:
            problems.add(d / "kustomization.yaml", f"does not replace the `{RUN_CONFIG_MAP}` ConfigMap with its own run config")
    how = "tomllib + the fields and enums of common/src/config.rs"
    if config_binary is not None:
        how += f" + `{rel(config_binary)} check-config`"
    checked.append(f"{len(configs)} run configs ({', '.join(rel(k.config_maps[RUN_CONFIG_MAP][next(iter(k.config_maps[RUN_CONFIG_MAP]))]) for d, k in kusts.items() if k and d in configs)}): {how}")

    # 6. rendered overlays
    tool = None if opts.no_render else find_renderer()
    for d in roots:
        name = "base" if d == BASE else d.name
        try:
            docs = render_with_tool(tool, d) if tool else render_builtin(d, problems)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            problems.add(d / "kustomization.yaml", f"`{' '.join(tool or [])} {rel(d)}` fails: {e}")
            continue
        except (KeyError, IndexError, ValueError, TypeError) as e:
            problems.add(d / "kustomization.yaml", f"the built-in patcher cannot render it ({e!r}); try with kustomize installed")
            continue
        idx = base_idx
        k = kusts.get(d)
        if k and d != BASE:
            idx = base_idx.merged(index_docs([dd for f in k.resource_files for dd in files.get(f, [])], k))
        check_rendered(name, docs, configs.get(d), idx, spec, problems)
    if tool:
        renderer = f"`{' '.join(tool)}`"
    else:
        why = "--no-render" if opts.no_render else "no kustomize or kubectl found"
        renderer = f"the built-in approximation of kustomize's patching ({why})"
    checked.append(f"{len(roots)} renderings with {renderer}: RUN_NAME = run.id, train_ranks <= workers, store "
                   f"reachable (S3 secret or shared mount), model/data paths mounted, $(VAR)s defined, mounts have "
                   f"volumes, --config/--token-file provided, --state-dir on a PVC and --work-dir writable, Service selectors and port names")

    print("check_k8s: checked")
    for line in checked:
        print(f"  - {line}")
    for note in problems.notes:
        print(f"  note: {note}")
    if problems.items:
        print(f"\ncheck_k8s: {len(problems.items)} problem(s):", file=sys.stderr)
        for p in problems.items:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("check_k8s: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
