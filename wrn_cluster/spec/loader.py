"""Loading a job spec: YAML with a line map, guards, ``--set`` overrides and messages.

``load(path, overrides)`` returns a ``JobSpec`` or raises ``SpecError`` holding one readable
``FILE:LINE: field.path: message`` line per problem; ``json_schema``, ``to_yaml`` and ``flatten``
write a spec out.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from wrn_cluster.spec.classify import ClassifyJob
from wrn_cluster.spec.detect import DetectJob
from wrn_cluster.spec.sections import FieldError
from wrn_cluster.spec.tune import TuneJob

JobSpec = Annotated[ClassifyJob | DetectJob | TuneJob, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[ClassifyJob | DetectJob | TuneJob] = TypeAdapter(JobSpec)
KINDS = ("classify", "detect", "tune")


@dataclass(frozen=True)
class Problem:
    source: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class SpecError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


_SECRET_KEY = re.compile(
    r"(secret|password|passwd|token|access[_-]?key|credential|api[_-]?key)", re.I
)
_SECRET_VALUE = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s:]+:[^/@\s]+@"), "a URL with a password in it"),
]


def _secret_problems(tree: Any, path: tuple, source: str, lines: dict) -> list[Problem]:
    problems: list[Problem] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            sub = (*path, key)
            if isinstance(key, str) and _SECRET_KEY.search(key):
                problems.append(
                    Problem(
                        source,
                        _line_of(lines, sub),
                        _dotted(sub),
                        "credentials never live in a spec; remove this key and set them in the "
                        "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                        "MLFLOW_TRACKING_TOKEN) or the cluster's secrets",
                    )
                )
            else:
                problems += _secret_problems(value, sub, source, lines)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            problems += _secret_problems(value, (*path, i), source, lines)
    elif isinstance(tree, str):
        for pattern, what in _SECRET_VALUE:
            if pattern.search(tree):
                problems.append(
                    Problem(
                        source,
                        _line_of(lines, path),
                        _dotted(path),
                        f"this value looks like {what}; credentials never live in a spec: "
                        "set them in the environment or the cluster's secrets",
                    )
                )
    return problems


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _node_lines(node: yaml.Node, path: tuple, out: dict) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*path, key)] = key_node.start_mark.line + 1
            _node_lines(value_node, (*path, key), out)
            out[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, (*path, i), out)


# A job spec is a few hundred values; aliases of aliases can expand a small file to billions.
MAX_VALUES = 10_000


class _CyclicAlias(Exception):
    pass


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_nodes: set[int]) -> int:
    """Values the YAML holds once its aliases are expanded; raises _CyclicAlias for an alias
    inside its own anchor. Linear in the document, however much it would expand."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_nodes:
        raise _CyclicAlias
    open_nodes.add(key)
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    size = 1 + sum(_expanded_size(child, memo, open_nodes) for child in children)
    open_nodes.discard(key)
    memo[key] = min(size, MAX_VALUES + 1)
    return memo[key]


def _size_problem(node: yaml.Node, source: str) -> Problem | None:
    try:
        size = _expanded_size(node, {}, set())
    except _CyclicAlias:
        return Problem(source, None, "", "a YAML alias refers to its own anchor; remove the cycle")
    if size > MAX_VALUES:
        return Problem(
            source,
            None,
            "",
            f"the YAML expands to more than {MAX_VALUES} values (aliases of aliases); "
            "write the spec out without nested aliases",
        )
    return None


def _line_of(lines: dict, path: tuple) -> int | None:
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)


def _known_fields(path: tuple, kind: str | None) -> list[str]:
    """Field names of the section at ``path``, for 'did you mean' suggestions."""
    cls: Any = {"classify": ClassifyJob, "detect": DetectJob, "tune": TuneJob}.get(kind or "")
    if cls is None:
        return ["kind"]
    for part in path:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        cls = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if cls is None:
            return []
    return list(cls.model_fields)


def _describe_error(error: ErrorDetails, kind: str | None) -> tuple[tuple, str]:
    loc = tuple(error["loc"])
    if loc and loc[0] in KINDS:
        loc = loc[1:]
    kind_of_error = error["type"]
    value = error.get("input")
    if kind_of_error == "extra_forbidden":
        known = _known_fields(loc[:-1], kind)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(known)}"
        return loc, f"unknown key {loc[-1]!r}; {hint}"
    if kind_of_error == "missing":
        return loc, "required, but missing; add it"
    if kind_of_error in ("union_tag_invalid", "union_tag_not_found"):
        return (
            ("kind",),
            f"got {value.get('kind') if isinstance(value, dict) else value!r}; "
            f"kind must be one of {', '.join(KINDS)}",
        )
    if kind_of_error == "value_error":
        ctx_error = error.get("ctx", {}).get("error")
        if isinstance(ctx_error, FieldError):
            return tuple(ctx_error.field.split(".")), ctx_error.message
        message = str(ctx_error) if ctx_error else error["msg"]
        return loc, f"{message} (got {value!r})" if not isinstance(value, dict) else message
    shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
    message = error["msg"].rstrip(".")
    # Lower-case the first letter only: the rest may quote a pattern or a value.
    return loc, f"{message[:1].lower()}{message[1:]}{shown}"


def _set_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise SpecError(
            [Problem("--set", None, assignment, "expected KEY=VALUE, e.g. optimizer.lr=0.05")]
        )
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise SpecError([Problem("--set", None, key, f"{prefix} is not a section")])
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def parse(
    text: str, source: str = "<spec>", overrides: list[str] | tuple[str, ...] = ()
) -> ClassifyJob | DetectJob | TuneJob:
    """Validate YAML text (plus ``--set`` overrides); raise SpecError listing every problem."""
    try:
        node = yaml.compose(text)
        too_big = _size_problem(node, source) if node is not None else None
        if too_big:
            raise SpecError([too_big])
        tree = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown place"
        raise SpecError(
            [
                Problem(
                    source,
                    mark.line + 1 if mark else None,
                    "",
                    f"YAML syntax error at {where}: "
                    f"{err.problem}; fix the indentation or quoting there",
                )
            ]
        ) from None
    except yaml.YAMLError as err:  # the reader's: control characters YAML does not allow
        first = (str(err).strip().splitlines() or ["unreadable"])[0]
        raise SpecError(
            [Problem(source, None, "", f"not YAML text ({first}); remove that character")]
        ) from None
    except RecursionError:
        raise SpecError(
            [Problem(source, None, "", "nested too deeply for a job spec; flatten it")]
        ) from None
    if not isinstance(tree, dict):
        raise SpecError(
            [Problem(source, 1, "", "a job spec is a YAML mapping with at least kind, name, data")]
        )
    lines: dict = {}
    if node is not None:
        _node_lines(node, (), lines)
    for assignment in overrides:
        _set_override(tree, assignment)
    problems = _secret_problems(tree, (), source, lines)
    if problems:
        raise SpecError(problems)
    kind = tree.get("kind") if isinstance(tree.get("kind"), str) else None
    try:
        return _ADAPTER.validate_python(tree)
    except ValidationError as err:
        overridden = {tuple(a.split("=", 1)[0].strip().split(".")) for a in overrides}
        seen: set[Problem] = set()
        for error in err.errors(include_url=False):
            loc, message = _describe_error(error, kind)
            where = "--set" if any(loc[: len(o)] == o for o in overridden) else source
            problem = Problem(
                where, None if where == "--set" else _line_of(lines, loc), _dotted(loc), message
            )
            if str(problem) not in {str(p) for p in seen}:
                seen.add(problem)
        raise SpecError(sorted(seen, key=lambda p: (p.line or 0, p.field))) from None


def load(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> ClassifyJob | DetectJob | TuneJob:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError([Problem(str(path), None, "", "no such file; check the path")]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise SpecError([Problem(str(path), None, "", f"cannot read the spec: {err}")]) from None
    return parse(text, str(path), overrides)


def json_schema() -> dict:
    schema = _ADAPTER.json_schema()
    schema["title"] = "wrn-cluster job spec"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def to_yaml(spec: BaseModel) -> str:
    return yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False)


def flatten(spec: BaseModel) -> dict[str, Any]:
    """The spec as dotted keys, e.g. {"optimizer.lr": 0.1}, for tracking params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", json.loads(spec.model_dump_json()))
    return out
