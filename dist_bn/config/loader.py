"""Load a config: a YAML file plus `key.path=value` overrides, checked against a
`dist_bn.config.schema.Schema` and filled with its defaults.

The launcher calls `load_config` with the whole file's schema before it
starts anything, and every rank of the training job calls it again with the
job's schema and the same file and overrides. Every problem is a
`ConfigError` whose message is one line: where (the file, or "command line"
for an override), the key, and what is wrong.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from dist_bn.config.schema import Schema
from dist_bn.config.values import CONTROL_CHARACTERS, EnvMap, ValueProblem, closest, printable, show

OVERRIDE_SOURCE = "command line"

Config = dict[str, dict[str, Any]]


class ConfigError(ValueError):
    """A config problem, described in one line for the person who wrote the config."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping.

    Plain safe_load keeps the last duplicate silently, so a second `train:`
    section would quietly drop the first one's keys.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable key: let SafeLoader report it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from a PyYAML error: 'line L, column C: problem'."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    problem = " ".join(problem.split())
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return problem


def _read(path: str | os.PathLike, source: str, sections) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a UTF-8 text file") from None
    except OSError as err:
        raise ConfigError(f"{source}: cannot read: {err.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {_yaml_problem(err)}") from None
    if data is None:  # an empty file: every default
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections ({', '.join(sections)}), got {show(data)}")
    return data


def _unknown_section(where: str, section: Any, sections) -> ConfigError:
    hint = closest(str(section), list(sections))
    return ConfigError(
        f"{where}: {section}: unknown section"
        + (f" (did you mean {hint}?)" if hint else "")
        + f"; allowed sections: {', '.join(sections)}")


def _unknown_key(where: str, section: str, name: Any, schema: Schema) -> ConfigError:
    allowed = schema.section_keys(section)
    hint = closest(str(name), allowed)
    return ConfigError(
        f"{where}: {section}.{name}: unknown key"
        + (f" (did you mean {section}.{hint}?)" if hint else "")
        + f"; allowed keys in {section}: {', '.join(allowed)}")


def _check_known_keys(tree: dict, source: str, schema: Schema) -> None:
    """Reject unknown sections and keys, and sections that are not mappings;
    drop the sections of other programs (`schema.foreign`)."""
    by_key = schema.by_key
    for section in list(tree):
        if section in schema.foreign:
            del tree[section]
            continue
        if section not in schema.sections:
            raise _unknown_section(source, section, [*schema.sections, *schema.foreign])
        body = tree[section]
        if body is None:  # a section whose keys are all commented out
            tree[section] = {}
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: {section}: must be a mapping of keys, got {show(body)}")
        for name in body:
            if f"{section}.{name}" not in by_key:
                raise _unknown_key(source, section, name, schema)


_KEY_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'a.b=value' into ('a.b', value), the value read as YAML (so 3, true,
    [a, b] and null mean what they do in the file)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    control = CONTROL_CHARACTERS.search(text)
    if control:
        # Refused before YAML reads it: YAML folds a newline into a space, so the
        # value would look clean while the raw text (echoed into generated files
        # and logs) still carries the line break.
        raise ConfigError(f"{OVERRIDE_SOURCE}: {printable(repr(text))}: contains the control character "
                          f"{printable(repr(control.group()))}; an override must be one printable line")
    if not sep or not key:
        raise ConfigError(f"{OVERRIDE_SOURCE}: {text!r}: not a key=value override (e.g. train.batch_size=8)")
    if not _KEY_PATH.fullmatch(key):
        raise ConfigError(f"{OVERRIDE_SOURCE}: {text!r}: {key!r} is not a dotted key path (e.g. train.batch_size)")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{OVERRIDE_SOURCE}: {key}: value {raw!r} is not valid YAML: {_yaml_problem(err)}") from None
    return key, value


def format_override(key: str, value: Any) -> str:
    """The override text that `parse_override` reads back as exactly (key, value)."""
    if isinstance(value, str):
        try:
            if yaml.load(value, Loader=_UniqueKeyLoader) == value:
                return f"{key}={value}"
        except yaml.YAMLError:
            pass
    return f"{key}={json.dumps(value)}"  # JSON is YAML; this quotes strings safely


def _apply_overrides(tree: dict, overrides: Iterable[str], source: str, schema: Schema) -> set[str]:
    """Set each override into `tree` (in order, last wins); return the keys touched.
    Overrides of foreign sections are skipped (their program checks them)."""
    touched = set()
    by_key = schema.by_key
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        section = parts[0]
        if section in schema.foreign:
            continue
        if section not in schema.sections:
            raise _unknown_section(OVERRIDE_SOURCE, section, [*schema.sections, *schema.foreign])
        if len(parts) == 1:
            example = f"{section}.{schema.section_keys(section)[0]}=..."
            raise ConfigError(f"{OVERRIDE_SOURCE}: {section}: is a section; override one key at a time, e.g. {example}")
        field_key = f"{section}.{parts[1]}"
        if field_key not in by_key:
            raise _unknown_key(OVERRIDE_SOURCE, section, parts[1], schema)
        field = by_key[field_key]
        body = tree.setdefault(section, {})
        if len(parts) == 2:
            body[parts[1]] = value
        elif len(parts) == 3 and isinstance(field.type, EnvMap):
            current = body.get(parts[1])
            if current is not None and not isinstance(current, dict):
                _check_field(field, current, source)  # reports the file's bad value
            body[parts[1]] = {**(current or {}), parts[2]: value}
        else:
            raise ConfigError(
                f"{OVERRIDE_SOURCE}: {key}: {field_key} has no sub-keys; write {field_key}=VALUE")
        touched.add(field_key)
    return touched


def _check_field(field, value: Any, where: str) -> Any:
    try:
        return field.check(value)
    except ValueProblem as problem:
        raise ConfigError(f"{where}: {field.key}: {problem}") from None


def load_config(path: str | os.PathLike, overrides: Iterable[str], schema: Schema) -> Config:
    """Read the YAML config at `path`, apply `overrides` ('key.path=value', in
    order), validate every key of `schema` and its rules, and fill defaults.

    Returns {section: {key: value}} with every key of `schema` present (no
    foreign section). Raises ConfigError. Touches nothing on disk besides
    reading `path`.
    """
    source = os.fspath(path)
    if CONTROL_CHARACTERS.search(source):
        raise ConfigError(f"{printable(repr(source))}: the config file name contains a control character; "
                          "rename the file")
    tree = _read(path, source, [*schema.sections, *schema.foreign])
    _check_known_keys(tree, source, schema)
    overridden = _apply_overrides(tree, list(overrides), source, schema)

    config: Config = {section: {} for section in schema.sections}
    for field in schema.fields:
        body = tree.get(field.section, {})
        if field.name in body:
            where = OVERRIDE_SOURCE if field.key in overridden else source
            value = _check_field(field, body[field.name], where)
        else:
            value = copy.deepcopy(field.default)
        config[field.section][field.name] = value

    for rule in schema.rules:
        problem = rule.check(config)
        if problem:
            where = OVERRIDE_SOURCE if overridden.intersection(rule.keys) else source
            raise ConfigError(f"{where}: {rule.keys[0]}: {problem}")
    return config
