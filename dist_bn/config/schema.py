"""A config schema as plain data: `Field` rows (key, type, default, doc),
cross-key `Rule` rows, and the sections they live in.

Several programs read one YAML file (the training job its model, data, train
and run sections; the launcher the rest), so a `Schema` can be joined with
another (`+`), and a program's own schema names the `foreign` sections it
leaves to the others: accepted in the file, not checked, not returned.
`render_markdown` writes the reference table that the README holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from dist_bn.config.values import ValueProblem, ValueType, control_character_problem, show


@dataclass(frozen=True)
class Field:
    """One config key. A null default means "unset": the key may also be null."""

    key: str
    type: ValueType
    default: Any
    doc: str

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]

    def check(self, value: Any) -> Any:
        """Normalize `value` or raise ValueProblem. Empty YAML (null) means an empty
        list/mapping for container keys and "unset" for keys whose default is null."""
        if value is None:
            if self.default is None:
                return None
            if isinstance(self.default, (list, dict)):
                return type(self.default)()
        value = self.type.check(value)
        problem = control_character_problem(value)
        if problem:
            raise ValueProblem(problem)
        return value


@dataclass(frozen=True)
class Rule:
    """A check over several keys of the filled-in config: `check(config)`
    returns a problem (reported under keys[0]) or None."""

    keys: tuple[str, ...]
    doc: str
    check: Callable[[Mapping[str, Mapping[str, Any]]], str | None] = field(repr=False)


@dataclass(frozen=True)
class Schema:
    """Sections (name: what it is for), their fields and rules, and the
    sections of other programs that may share the file (`foreign`)."""

    sections: Mapping[str, str]
    fields: tuple[Field, ...]
    rules: tuple[Rule, ...] = ()
    foreign: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # checks done elsewhere, for the reference's rule list

    def __add__(self, other: "Schema") -> "Schema":
        sections = {**self.sections, **other.sections}
        return Schema(sections, self.fields + other.fields, self.rules + other.rules,
                      tuple(s for s in (*self.foreign, *other.foreign) if s not in sections),
                      self.notes + other.notes)

    @property
    def by_key(self) -> dict[str, Field]:
        return {f.key: f for f in self.fields}

    def section_keys(self, section: str) -> list[str]:
        """Key names (without the section) allowed in `section`, in schema order."""
        return [f.name for f in self.fields if f.section == section]


def _yaml_literal(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return "[]" if isinstance(value, list) else "{}"
    return show(value).strip("'")


def render_markdown(schema: Schema) -> str:
    """The schema as a Markdown table (key, type, default, allowed, description),
    followed by the rules between keys and the notes."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for f in schema.fields:
        lines.append(
            f"| `{f.key}` | {cell(f.type.name)} | `{cell(_yaml_literal(f.default))}` "
            f"| {cell(f.type.allowed())} | {cell(f.doc)} |"
        )
    lines += ["", "Rules between keys:", ""]
    lines.extend(f"- {rule.doc}" for rule in schema.rules)
    lines.extend(f"- {note}" for note in schema.notes)
    return "\n".join(lines) + "\n"
