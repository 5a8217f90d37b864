"""dist_bn.config: YAML configs checked against a schema, with one error format.

  values   value types (Int, Float, Choice, ...): check one value, describe it
  schema   Field and Rule rows, a Schema of sections, the Markdown reference
  loader   load_config(path, overrides, schema): YAML + key=value overrides,
           checked and filled with defaults; every problem one ConfigError line

No TensorFlow here: the launcher uses it too and must start fast.
"""
from dist_bn.config.loader import ConfigError, format_override, load_config, parse_override
from dist_bn.config.schema import Field, Rule, Schema, render_markdown
from dist_bn.config.values import ValueProblem, printable

__all__ = ["ConfigError", "Field", "Rule", "Schema", "ValueProblem", "format_override", "load_config",
           "parse_override", "printable", "render_markdown"]
