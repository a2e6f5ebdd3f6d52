"""The project's settings toolkit: typed dataclass fields read from YAML files and flags, checked with clear errors.

A settings group is a dataclass whose `Attributes:` docstring section documents its fields (`field_docs`, the CLI's
help) and whose annotations say how a flag's or a YAML file's value is read (`coerce`): `int`, `float`, `bool`, `str`,
lists (comma-separated on the command line) and `X | None` (`none` / `null`). `Checks` collects every problem of one
object, in flag form, and `ConfigError` (a `ValueError`) names them all at once. The recipe (`ia3.recipe.config`) and
the server (`ia3.serve.config`) both build their settings on these.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

RECIPE_FILE = "recipe.yaml"
"""The name of the settings file `ia3 train` writes into a run's folder (and `ia3 eval`, `ia3 serve` read)."""


class ConfigError(ValueError):
    """Invalid settings. `problems` lists each one; the message names them all."""

    def __init__(self, problems: list[str], title: str = "Invalid recipe config") -> None:
        self.problems, self.title = list(problems), title
        body = f" {self.problems[0]}" if len(self.problems) == 1 else "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"{title}:{body}")

    def __reduce__(
        self,
    ) -> tuple[type[ConfigError], tuple[list[str], str]]:  # picklable (multiprocessing) despite the custom __init__
        return type(self), (self.problems, self.title)


# -- fields: docs, types, coercion ---------------------------------------------------------------------------------
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: doc} from the `Attributes:` (or `Args:`) section of a dataclass's Google-style docstring.

    An entry is `name: text` (`a / b: text` documents both), continued on the lines indented deeper than it.
    """
    docs: dict[str, str] = {}
    section: int | None = None  # indentation of the section header
    entry: int | None = None  # indentation of its entries
    names: list[str] = []
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        text, depth = line.strip(), len(line) - len(line.lstrip())
        if section is None:
            if text in ("Attributes:", "Args:"):
                section = depth
            continue
        if not text:
            continue
        if depth <= section:
            break
        match = re.fullmatch(r"(\w+(?:\s*/\s*\w+)*)\s*:\s*(.*)", text)
        if match and (entry is None or depth <= entry):
            entry = depth
            names = [n.strip() for n in match.group(1).split("/")]
            for n in names:
                docs[n] = match.group(2)
        else:
            for n in names:
                docs[n] = f"{docs[n]} {text}".strip()
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass (`typing.get_type_hints`, so string annotations work)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _kinds(hint: Any) -> tuple[list[type], bool]:
    """(the non-None types of an annotation, in order, with `list[str]` as `list`; whether None is allowed)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [typing.get_origin(a) or a for a in args if a is not type(None)]
    unsupported = [k for k in kinds if k not in (bool, int, float, str, list)]
    if unsupported:
        raise TypeError(f"config fields support bool, int, float, str, list[str] and X | None; got {hint}")
    return kinds, type(None) in args


_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list (comma-separated on the command line)",
}
_METAVARS = {bool: "{true,false}", int: "INT", float: "FLOAT", str: "STR", list: "A,B,..."}


def describe(hint: Any) -> str:
    """What values an annotation takes, in words: `an integer or none`."""
    kinds, optional = _kinds(hint)
    return " or ".join([_WORDS[k] for k in kinds] + (["none"] if optional else []))


def metavar(hint: Any) -> str:
    """The CLI's placeholder for a value of this annotation (`INT`, `{true,false}`, `A,B,...`)."""
    return _METAVARS[_kinds(hint)[0][0]]


_NAMES = re.compile(r"\s*[\w.]+(\s*,\s*[\w.]*)*\s*|.*,.*")  # `q`, `q, v`, `a,b,`: names; a comma: a list
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_FAIL = object()


def _as(kind: type, value: Any) -> Any:
    """`value` read as `kind`, or _FAIL."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # also YAML 1.1's `8e-3`, which it reads as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML's `revision: 2024`
            return str(value)
    elif kind is list:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    return _FAIL


def coerce(value: Any, hint: Any, name: str) -> Any:
    """Read `value` (a flag's string or a YAML value) as the annotation `hint` says.

    `none` / `null` (or None) is None for an `X | None` field only; a string is a comma-separated list for a list
    field. For `list[str] | str` (names or a regex), a string stays a string only when it is not a list of plain
    names: `q,v` and `q` are lists, `all-linear` and `.*[.]q` strings. Raises ValueError naming `name` (`--train.lr`).
    """
    kinds, optional = _kinds(hint)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{name} takes {describe(hint)}; got None")
    if isinstance(value, str) and list in kinds and str in kinds:
        kinds = [list] if _NAMES.fullmatch(value) else [k for k in kinds if k is not list]
    for kind in kinds:
        out = _as(kind, value)
        if out is not _FAIL:
            return out
    raise ValueError(f"{name} takes {describe(hint)}; got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    kinds, optional = _kinds(hint)
    if value is None:
        return optional
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind is str and isinstance(value, str):
            return True
        if kind is list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return True
    return False


class Checks:
    """Collects the problems of one config object, each in flag form; a field of the wrong type is named once.

    `flag(name)` gives a field's flag (`--train.lr`); the checks skip fields whose type is already wrong.
    """

    def __init__(self, obj: Any, flag: Callable[[str], str]) -> None:
        self.obj, self.flag = obj, flag
        self.problems: list[str] = []
        self.bad: set[str] = set()  # fields of the wrong type: named once, then skipped by the checks
        for name, hint in field_types(type(obj)).items():
            value = getattr(obj, name)
            if not _matches(value, hint):
                self.problems.append(f"{flag(name)} takes {describe(hint)}; got {value!r}")
                self.bad.add(name)

    def value(self, name: str) -> Any:
        """The field's value."""
        return getattr(self.obj, name)

    def ok(self, name: str) -> bool:
        """The field has the right type and is set (not None): worth checking further."""
        return name not in self.bad and getattr(self.obj, name) is not None

    def require(self, condition: bool, message: str) -> None:
        """Records `message` unless `condition` holds (a rule the other checks do not cover)."""
        if not condition:
            self.problems.append(message)

    def integer(self, name: str, low: int) -> None:
        """An integer field that must be at least `low`."""
        if self.ok(name) and self.value(name) < low:
            self.problems.append(f"{self.flag(name)} must be an integer >= {low}; got {self.value(name)!r}")

    def choice(self, name: str, allowed: typing.Iterable[str]) -> None:
        """A field whose value must be one of `allowed`."""
        if self.ok(name) and self.value(name) not in allowed:
            self.problems.append(f"{self.flag(name)} must be one of {list(allowed)}; got {self.value(name)!r}")

    def text(self, name: str, what: str) -> None:
        """A string field that must not be empty."""
        if self.ok(name) and not self.value(name).strip():
            self.problems.append(f"{self.flag(name)} must be {what}; got {self.value(name)!r}")

    def gguf(self, name: str) -> None:
        """A file name that must end in `.gguf`."""
        if self.ok(name) and not self.value(name).lower().endswith(".gguf"):
            self.problems.append(f"{self.flag(name)} must name a .gguf file; got {self.value(name)!r}")

    def names(self, name: str) -> None:
        """A list of distinct, non-empty names (None allowed)."""
        if self.ok(name):
            names = list(self.value(name))
            if not names or any(not n.strip() for n in names) or len(set(names)) != len(names):
                self.problems.append(f"{self.flag(name)} must be distinct non-empty names; got {self.value(name)!r}")

    def done(self, title: str) -> None:
        """Raises one `ConfigError` titled `title` naming every problem found, if any."""
        if self.problems:
            raise ConfigError(self.problems, title)


# -- suggestions and files ---------------------------------------------------------------------------------------
def close_matches(key: str, keys: list[str]) -> list[str]:
    """The dotted keys `key` (e.g. `train.lrr`) was probably meant as: the same field in another group, else close
    names in its group, else close keys anywhere."""
    group, _, name = key.rpartition(".")
    elsewhere = [k for k in keys if k.rpartition(".")[2] == name and k != key]
    if elsewhere:
        return elsewhere
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == group]
    close = [f"{group}.{c}" if group else c for c in difflib.get_close_matches(name, siblings, n=3, cutoff=0.6)]
    return close or difflib.get_close_matches(key, keys, n=3, cutoff=0.6)


def did_you_mean(key: str, keys: list[str], prefix: str = "") -> str:
    """`; did you mean --a or --b?` for an unknown `key` (`prefix` is put before each match), or `""`."""
    close = close_matches(key, keys)
    return f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


def close_match_hints(unknown: list[str], keys: list[str], prefix: str = "") -> str:
    """`did_you_mean` for one unknown key; for several, `; close matches: a -> b, ...` (those that have one)."""
    if len(unknown) == 1:
        return did_you_mean(unknown[0], keys, prefix)
    hints = [f"{prefix}{u} -> {prefix}{close[0]}" for u in unknown if (close := close_matches(u, keys))]
    return f"; close matches: {', '.join(hints)}" if hints else ""


def read_settings_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a YAML settings file (a `--config` file, a run's `recipe.yaml`) holds; an empty file is `{}`.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or not a mapping (the message names the file).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist"]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"config file {path} cannot be read: {err}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"config file {path} is not valid YAML: {err}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"config file {path} must hold a mapping of sections; got {type(data).__name__}"])
    return data
