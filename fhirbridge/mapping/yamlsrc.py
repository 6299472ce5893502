"""Read YAML mapping files keeping the line of every node, so errors and traces name file:line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fhirbridge.errors import MappingConfigError, MappingProblem

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def escape_pointer_token(token: str | int) -> str:
    """RFC 6901 escaping of one JSON-pointer segment."""
    return str(token).replace("~", "~0").replace("/", "~1")


def _collect_lines(
    node: yaml.Node, pointer: str, lines: dict[str, int], line: int | None = None
) -> None:
    # A mapping entry is reported at its key's line (where a reader looks), not its value's.
    lines.setdefault(pointer, line if line is not None else node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *anchor` — keys merged in report the anchor's lines.
                merged.extend(
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                continue
            child = f"{pointer}/{escape_pointer_token(key_node.value)}"
            _collect_lines(value_node, child, lines, key_node.start_mark.line + 1)
        for source in merged:
            _collect_lines(source, pointer, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_lines(item, f"{pointer}/{index}", lines)


def load_yaml(path: Path, display_name: str) -> tuple[Any, dict[str, int]]:
    """Parse one YAML (or JSON) file safely; return its data and a JSON-pointer → line map."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingConfigError(
            [MappingProblem(display_name, "", f"cannot read file: {exc.strerror}")]
        ) from exc
    # Parsed once, by libyaml where PyYAML has it (~10x faster than the pure-Python parser:
    # the pack was a third of the service's start-up), keeping the node tree for the lines.
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise MappingConfigError(
            [MappingProblem(display_name, "", f"malformed YAML: {problem}", line)]
        ) from exc
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        _collect_lines(node, "", lines)
    return data, lines


def line_of(lines: dict[str, int], pointer: str) -> int | None:
    """The line of a pointer, or of its nearest ancestor that has one."""
    while True:
        if pointer in lines:
            return lines[pointer]
        if not pointer:
            return None
        pointer = pointer.rsplit("/", 1)[0]
