"""Loading a preset: YAML, ``--set`` overrides coerced to each field's type, relative paths resolved, and
the field reference ``--print-config`` prints.

Paths: a relative path in a preset is resolved against the repository when the preset lives in it, or
against the preset's own folder otherwise; a relative path given with ``--set`` against the working
directory. A flow therefore finds ``data/demo/manifest.jsonl`` from any folder. Inside a Ray job, whose
working directory is Ray's temporary copy of the code, a relative *state* path is refused.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from components.config.errors import ConfigError
from components.config.schema import REPO, Config

STATE_PATHS = ("state_dir", "curate.output", "curate.cache_output", "train.data", "train.storage_path")
"""Where the platform writes (or reads what it wrote): refused when relative inside a Ray job."""
INPUT_PATHS = ("curate.source", "curate.root", "model.source", "model.single_file_config", "evaluate.prompts",
               "curate.captioner.model")
"""Inputs that may be local paths (or s3://, pkg:, a hub id, ``tiny``: left as they are)."""
SOURCE_PATHS = ("location", "root")
"""Keys of each ``curate.sources`` entry that may be local paths."""


def _is_local_path(value: str, key: str) -> bool:
    if value.startswith(("s3://", "pkg:", "models:/", "http://", "https://", "hf://")):
        return False
    if value in ("tiny", "inception"):
        return False
    if key in ("model.source", "model.single_file_config", "curate.captioner.model"):
        # a hub id ("org/name") looks like a relative path
        return value.startswith(("./", "../", "/", "~"))
    return True


def in_ray_package_copy(path: Path = REPO) -> bool:
    """True when ``path`` is inside the working-directory copy Ray makes for a submitted job
    (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>/``), which Ray deletes with the job."""
    return any(part.startswith("_ray_pkg_") for part in Path(path).parts)


def _field_annotation(dotted: list[str]):
    """The annotation of the field at ``dotted`` in Config, or None for an unknown key."""
    model: type[BaseModel] = Config
    annotation = None
    for i, key in enumerate(dotted):
        field = model.model_fields.get(key)
        if field is None:
            return None
        annotation = field.annotation
        if i < len(dotted) - 1:
            if typing.get_origin(annotation) is list:  # curate.sources.<name>.<key>: the entry's model
                (annotation,) = typing.get_args(annotation)
                return _field_annotation_in(annotation, dotted[i + 2:]) if len(dotted) > i + 2 else annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return None
            model = annotation
    return annotation


def _is_list_of_sections(dotted: list[str]) -> bool:
    """True when the field at ``dotted`` is a list of named sections (``curate.sources``)."""
    return _list_item_model(_field_annotation(dotted)) is not None


def _field_annotation_in(model, dotted: list[str]):
    """``_field_annotation`` from ``model`` down (the entries of a list of sections)."""
    annotation = None
    for key in dotted:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or key not in model.model_fields:
            return None
        annotation = model.model_fields[key].annotation
        model = annotation
    return annotation


def _takes_text(annotation) -> tuple[bool, bool]:
    """(the field takes text as it is, None is allowed)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)]
    textual = bool(kinds) and all(
        a is str or (isinstance(a, type) and issubclass(a, enum.StrEnum)) or typing.get_origin(a) is Literal
        for a in kinds
    )
    return textual, optional


def coerce_override(dotted: str, raw: str):
    """An override's value, typed by the field it sets: text fields take the text as written
    (``train.run_name=20241130`` stays a string, ``tracking.experiment=off`` is not False), ``null``
    clears an optional one; everything else is parsed as YAML (numbers, booleans, lists)."""
    if not raw.strip():  # `--set key=$UNSET_VARIABLE`: never read as "clear it" (that may turn auth off)
        raise ConfigError(f"--set {dotted}= has no value: give one, or null to clear the field")
    textual, optional = _takes_text(_field_annotation(dotted.split(".")))
    if textual:
        if optional and raw.strip() in ("null", "~", "None"):
            return None
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {dotted}: not a YAML value ({str(err).splitlines()[0]})") from None


def _named(entries: list, name: str):
    """The entry of a list of sections (``curate.sources``) called ``name``, or None."""
    found = [e for e in entries if isinstance(e, dict) and e.get("name") == name]
    return found[0] if found else None


def _get(tree: dict, dotted: str):
    node: Any = tree
    for key in dotted.split("."):
        if isinstance(node, list):
            node = _named(node, key)
            continue
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(tree: dict[str, Any], dotted: str, value) -> None:
    """Set ``dotted`` in ``tree``; in a list of named sections (``curate.sources``), a key is the name of
    an entry: ``curate.sources.laion.location=...`` changes the source ``laion`` only."""
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            entry = _named(node, key)
            if entry is None:
                names = ", ".join(str(e.get("name")) for e in node if isinstance(e, dict)) or "none"
                raise ConfigError(f"--set {dotted}: {'.'.join(keys[:i])} has no entry named {key!r} (names: {names})")
            node = entry
            continue
        if key not in node and _is_list_of_sections(keys[:i + 1]) and i + 1 < len(keys) - 1:
            # The preset leaves the list out (the tiny preset reads one source through the shorthand keys).
            listed = ".".join(keys[:i + 1])
            raise ConfigError(f"--set {dotted}: this preset lists no {listed}, so there is no entry named "
                              f"{keys[i + 1]!r}; it reads one source: set its keys instead "
                              "(e.g. --set curate.source=<folder, s3:// prefix or manifest>)")
        node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    if isinstance(node, list):
        raise ConfigError(f"--set {dotted}: set a key of one entry ({dotted}.<key>=...), or the whole list")
    node[keys[-1]] = value


def _resolve_paths(tree: dict, base: Path, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = _get(tree, key)
        if isinstance(value, str) and _is_local_path(value, key):
            path = Path(value).expanduser()
            if not path.is_absolute():
                _set(tree, key, str((base / path).resolve()))
        if key == "curate.sources" and isinstance(value, list):  # each source's location and root
            for entry in value:
                if isinstance(entry, dict):
                    _resolve_paths(entry, base, SOURCE_PATHS)


def _read_preset(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:  # a refused tag (!!python/object), a syntax error
        first = " ".join(str(err).split())[:200]
        raise ConfigError(f"{path}: not a valid preset ({first})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset, apply ``key.path=value`` overrides (typed by their field), resolve relative paths
    (module docstring), validate the whole tree. Every failure is one ``ConfigError`` line."""
    tree: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path).resolve()
        tree = _read_preset(path)
        base = REPO if path.is_relative_to(REPO) else path.parent
    tree.setdefault("state_dir", Config.model_fields["state_dir"].default)
    written = {k: _get(tree, k) for k in STATE_PATHS}  # as the user wrote them, before resolution
    _resolve_paths(tree, base, STATE_PATHS + INPUT_PATHS + ("curate.sources",))
    given: list[str] = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, raw = (s.strip() for s in item.split("=", 1))
        _set(tree, key, coerce_override(key, raw))
        given.append(key)
        if key in STATE_PATHS:
            written[key] = _get(tree, key)
    given += ["curate.sources"] if any(k.startswith("curate.sources.") for k in given) else []
    _resolve_paths(tree, Path.cwd(), tuple(k for k in STATE_PATHS + INPUT_PATHS + ("curate.sources",) if k in given))
    relative = sorted(k for k, v in written.items()
                      if isinstance(v, str) and _is_local_path(v, k) and not Path(v).expanduser().is_absolute())
    if relative and (in_ray_package_copy(Path.cwd()) or in_ray_package_copy(base)):
        raise ConfigError(
            f"{', '.join(relative)} relative inside a Ray job: it would land in Ray's temporary copy of the "
            "working directory, which Ray deletes; give an absolute path on shared storage or an s3:// URI "
            "(e.g. --set state_dir=/mnt/terminus)"
        )
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        loc = list(first["loc"])
        sources = _get(tree, "curate.sources")
        if loc[:2] == ["curate", "sources"] and len(loc) > 2 and isinstance(loc[2], int) and isinstance(sources, list):
            entry = sources[loc[2]] if loc[2] < len(sources) else None  # name the source, as --set does
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                loc[2] = entry["name"]
        where = ".".join(str(p) for p in loc)
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"invalid config at {where or '(top level)'}: {msg} ({err.error_count()} error(s); "
                          "--print-config lists every key)") from None


# --- reference -------------------------------------------------------------------------------------


def reference(node: BaseModel | type[BaseModel] = Config, prefix: str = "") -> list[dict]:
    """Every config key with its type, value (a config's, or the default) and documentation, in tree
    order (``--print-config``)."""
    model = node if isinstance(node, type) else type(node)
    rows: list[dict] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(node, type):
            value = "<required>" if field.is_required() else field.get_default(call_default_factory=True)
        else:
            value = getattr(node, name)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.append({"key": key, "section": True, "doc": field.description or ""})
            rows += reference(annotation if isinstance(node, type) else value, key + ".")
            continue
        item = _list_item_model(annotation)
        if item is not None:  # a list of sections (curate.sources): its entries' keys, documented
            rows.append({"key": key, "section": True, "doc": field.description or ""})
            # Each entry by its name, as --set addresses it (curate.sources.laion-hd.location).
            entries = [(f"{key}.<name>", item)] if isinstance(node, type) or not value else [
                (f"{key}.{getattr(entry, 'name', i)}", entry) for i, entry in enumerate(value)]
            for name_i, entry in entries:
                rows += reference(entry, name_i + ".")
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        rows.append({"key": key, "type": _type_name(annotation), "value": value, "doc": field.description or ""})
    return rows


def _list_item_model(annotation) -> type[BaseModel] | None:
    """``M`` when ``annotation`` is ``list[M]`` of a config section, else None."""
    if typing.get_origin(annotation) is list:
        (arg,) = typing.get_args(annotation) or (None,)
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _type_name(annotation) -> str:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(m.value) for m in annotation)
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def reference_text(cfg: Config | None = None) -> str:
    """``reference`` as text: one line per key, ``key = value  (type)  documentation``."""
    lines = []
    for row in reference(cfg if cfg is not None else Config):
        if row.get("section"):
            lines.append(f"\n[{row['key']}]  {row['doc']}")
        else:
            doc = " ".join(row["doc"].split())
            lines.append(f"{row['key']} = {json.dumps(row['value'], default=str)}  ({row['type']})  {doc}")
    return "\n".join(lines).lstrip()

