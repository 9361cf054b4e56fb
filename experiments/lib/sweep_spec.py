"""Sweep specifications for ``experiments.sweep``: parsing, typing, slugs.

A spec is either a grid, ``"client.learning_rate=0.1,0.3 seed=0,1"`` (the
cartesian product of each key's comma-separated values, in the order written),
or, from a file (``--sweep=@FILE``), an explicit list with one member per line
(``key=value key=value``). In a file, ``#`` starts a comment line and blank
lines are skipped; if any key on any line lists more than one value the whole
file is read as one grid (its lines joined), otherwise every line is a member.

Values are typed by the config field they override, as ml_collections'
``--config.KEY=VALUE`` flags are: ``int``, ``float`` (``1`` becomes ``1.0``),
``bool`` (``true``/``false``/``1``/``0``), ``str`` (taken verbatim), tuples
(a Python literal). Quotes (``'...'`` or ``"..."``) keep commas and spaces
inside one value and make it a string where the field has no fixed type.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import itertools
import re
from typing import Any, Callable, Mapping, Sequence

_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_INT = re.compile(r"^[+-]?\d+$")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
MAX_SLUG_CHARS = 120


class SpecError(ValueError):
  """A sweep spec the user must fix (the command exits with code 2)."""


@dataclasses.dataclass(frozen=True)
class RawValue:
  """One value as written: its text (quotes removed), whether it was quoted."""

  text: str
  quoted: bool = False


@dataclasses.dataclass(frozen=True)
class ParsedSpec:
  """A spec before typing: one ``{key: RawValue}`` dict per member."""

  members: list[dict[str, RawValue]]
  kind: str  # "grid" or "list"
  text: str  # the spec as given (a file's content for ``@FILE``)
  source: str | None = None  # the file of ``@FILE``, else None


@dataclasses.dataclass(frozen=True)
class Member:
  """One sweep member: its folder name and typed ``{dotted key: value}``."""

  slug: str
  overrides: dict[str, Any]


def _assignments(line: str) -> list[tuple[str, list[RawValue]]]:
  """Splits ``'a=1,2 b=x'`` into ``[('a', [1, 2]), ('b', [x])]`` (raw)."""
  result: list[tuple[str, list[RawValue]]] = []
  key: str | None = None
  values: list[RawValue] = []
  chars: list[str] = []
  quoted = False
  quote: str | None = None
  start = 0

  def word(end: int) -> str:
    return line[start:end].strip()

  def end_value(end: int) -> None:
    nonlocal chars, quoted
    if not chars and not quoted:
      raise SpecError(
          f"empty value in {word(end)!r} (write 'key=v1,v2' with no spaces "
          "around ',' or '=', or quote the value)")
    values.append(RawValue("".join(chars), quoted))
    chars, quoted = [], False

  for position, char in enumerate(line + " "):
    if quote is not None:
      if char == quote:
        quote = None
      else:
        chars.append(char)
    elif char.isspace():
      if key is None and not chars:
        start = position + 1
        continue
      if key is None:
        raise SpecError(f"expected KEY=VALUE[,VALUE...], got {word(position)!r}"
                        " (no spaces around ',' or '=' unless quoted)")
      end_value(position)
      result.append((key, values))
      key, values, start = None, [], position + 1
    elif char in "'\"":
      if key is None:
        raise SpecError(f"quotes are not allowed in a key: {word(position)!r}")
      quote, quoted = char, True
    elif char == "=" and key is None:
      key = "".join(chars)
      if not _KEY.match(key):
        raise SpecError(f"not a config key: {key!r} (in {line.strip()!r})")
      chars = []
    elif char == "," and key is not None:
      end_value(position)
    else:
      chars.append(char)
  if quote is not None:
    raise SpecError(f"unterminated {quote} quote in {line.strip()!r}")
  return result


def parse_grid(text: str) -> list[dict[str, RawValue]]:
  """Members of a grid spec: the cartesian product of each key's values.

  Args:
    text: ``"key=v1,v2 key2=w1"`` (any whitespace, newlines included, between
      keys).

  Returns:
    One ``{key: RawValue}`` per member, the last key varying fastest.
  """
  assignments = _assignments(text)
  if not assignments:
    raise SpecError("the sweep spec is empty")
  keys = [key for key, _ in assignments]
  for key in keys:
    if keys.count(key) > 1:
      raise SpecError(f"key {key!r} appears more than once in the grid")
  return [dict(zip(keys, combination)) for combination in
          itertools.product(*(values for _, values in assignments))]


def parse_member_lines(lines: Sequence[str]) -> list[dict[str, RawValue]]:
  """Members of an explicit list: one ``key=value key=value`` line each."""
  members = []
  for line in lines:
    assignments = _assignments(line)
    keys = [key for key, _ in assignments]
    for key, values in assignments:
      if len(values) != 1 or keys.count(key) > 1:
        raise SpecError(f"a member line needs one value per key: {line!r}")
    members.append({key: values[0] for key, values in assignments})
  if not members:
    raise SpecError("the sweep spec is empty")
  return members


def parse_spec(spec: str,
               read_text: Callable[[str], str] | None = None) -> ParsedSpec:
  """Parses ``--sweep``: a grid, or ``@FILE`` holding a grid or member lines.

  Args:
    spec: the flag's value.
    read_text: reads a file's text (default: the file system); for tests.
  """
  if not spec.startswith("@"):
    return ParsedSpec(parse_grid(spec), "grid", spec)
  path = spec[1:]
  if read_text is None:
    def read_text(file_path: str) -> str:
      with open(file_path) as f:
        return f.read()
  try:
    text = read_text(path)
  except OSError as e:
    raise SpecError(f"cannot read the sweep file {path!r}: {e}") from None
  lines = [line for line in text.splitlines()
           if line.strip() and not line.lstrip().startswith("#")]
  is_grid = any(len(values) > 1 for line in lines
                for _, values in _assignments(line))
  if is_grid:
    return ParsedSpec(parse_grid("\n".join(lines)), "grid", text, path)
  return ParsedSpec(parse_member_lines(lines), "list", text, path)


def parse_value(raw: RawValue) -> Any:
  """Untyped parse: a quoted value is a str; else bool, int, float or str."""
  text = raw.text
  if raw.quoted:
    return text
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  if _INT.match(text):
    return int(text)
  try:
    return float(text)
  except ValueError:
    return text


def typed_value(key: str, raw: RawValue, current: Any) -> Any:
  """``raw`` parsed as the type of the config field's ``current`` value."""
  text = raw.text
  kind = type(current).__name__
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "false", "0"):
      return text.lower() in ("true", "1")
  elif isinstance(current, int):
    if _INT.match(text):
      return int(text)
  elif isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      pass
  elif isinstance(current, str):
    return text
  elif isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
      value = None
    if isinstance(value, (tuple, list)):
      return tuple(value)
  else:
    return parse_value(raw)
  raise SpecError(f"{key} is a {kind} (currently {current!r}); cannot use "
                  f"{text!r}")


def config_leaves(config: Mapping[str, Any],
                  prefix: str = "") -> dict[str, Any]:
  """``{dotted key: value}`` for every non-dict field of a (Config)dict."""
  leaves: dict[str, Any] = {}
  for name, value in config.items():
    if hasattr(value, "items"):
      leaves.update(config_leaves(value, f"{prefix}{name}."))
    else:
      leaves[f"{prefix}{name}"] = value
  return leaves


def unknown_key_message(key: str, valid_keys: Sequence[str],
                        where: str = "--sweep") -> str:
  """Names ``key`` and the closest valid keys (difflib), for the user."""
  close = difflib.get_close_matches(key, valid_keys, n=4, cutoff=0.6)
  if not close:  # the same section, or else the last component, is a hint
    section = key.rsplit(".", 1)[0] + "." if "." in key else None
    close = [k for k in valid_keys if section and k.startswith(section)][:8]
    if not close:
      close = difflib.get_close_matches(
          key.rsplit(".", 1)[-1], [k.rsplit(".", 1)[-1] for k in valid_keys],
          n=4, cutoff=0.6)
      close = [k for k in valid_keys if k.rsplit(".", 1)[-1] in close][:4]
  hint = (f"; did you mean {', '.join(close)}?" if close
          else "; run experiments.run --helpfull to list the config's keys")
  return f"unknown config key {key!r} in {where}{hint}"


def format_value(value: Any) -> str:
  """The text of a typed value as a ``--config.KEY=TEXT`` flag takes it."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def member_slug(overrides: Mapping[str, Any]) -> str:
  """A readable folder name, ``client.learning_rate=0.3,seed=1``, sanitised.

  Floats drop a trailing ``.0``; in values, characters other than letters,
  digits and ``._+-`` become ``_``; a name over :data:`MAX_SLUG_CHARS` is cut
  and ends in a hash of the unsanitised text, so members stay apart.
  """
  raw, parts = [], []
  for key, value in overrides.items():
    text = format_value(value)
    if isinstance(value, float) and text.endswith(".0"):
      text = text[:-2]
    raw.append(f"{key}={text}")
    parts.append(f"{key}={_SLUG_UNSAFE.sub('_', text)}")
  slug = ",".join(parts)
  if len(slug) > MAX_SLUG_CHARS:
    digest = hashlib.sha1("\n".join(raw).encode()).hexdigest()[:8]
    slug = f"{slug[:MAX_SLUG_CHARS - 9]}-{digest}"
  return slug


def resolve_members(parsed: ParsedSpec, config: Mapping[str, Any],
                    fixed_keys: Sequence[str] = ()) -> list[Member]:
  """Types and validates a parsed spec against the config it sweeps.

  Args:
    parsed: from :func:`parse_spec`.
    config: the base config (after the command line's own overrides).
    fixed_keys: keys already overridden on the command line; sweeping one
      of them is refused (which value wins would be unclear).

  Returns:
    The members in spec order, each with a unique slug.

  Raises:
    SpecError: an unknown key (with the closest valid keys), a whole section
      given as a key, a value of the wrong type, a key also fixed on the
      command line, or a member listed twice.
  """
  leaves = config_leaves(config)
  members: list[Member] = []
  for raw_member in parsed.members:
    overrides = {}
    for key, raw in raw_member.items():
      if key not in leaves:
        inner = [k for k in leaves if k.startswith(key + ".")]
        if inner:
          raise SpecError(f"{key!r} is a config section, not a value; sweep "
                          f"one of its keys: {', '.join(inner[:6])}")
        raise SpecError(unknown_key_message(key, sorted(leaves)))
      if key in fixed_keys:
        raise SpecError(f"{key!r} is both swept and set by --config.{key}; "
                        "drop one of them")
      overrides[key] = typed_value(key, raw, leaves[key])
    members.append(Member(member_slug(overrides), overrides))
  seen: dict[str, Member] = {}
  for index, member in enumerate(members):
    slug = member.slug
    if slug in seen:
      if seen[slug].overrides == member.overrides:
        raise SpecError(f"member {slug} appears more than once in the sweep")
      slug = f"{slug}-{index}"
      member = members[index] = Member(slug, member.overrides)
    seen[slug] = member
  return members
