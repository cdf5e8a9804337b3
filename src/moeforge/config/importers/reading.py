"""Reading an original tool's settings file into a flat mapping of its keys.

The tools kept their settings in different shapes: JSON ``config.json`` files (Dense2MoE's MoE config, often
copied with its README's ``//`` comments; MoE-adapter's; a MoICE-patched model config), YAML, and shell or
Python variables (LLaMA-MoE v2's ``convert_mixtral_v2.sh`` / ``convert_llama_to_mixtral.py``). Only the
values matter here; which tool wrote them is decided by :mod:`moeforge.config.importers` from the keys.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import yaml

from moeforge.errors import MoeforgeError

SHELL_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_]\w*)=(.+?)\s*$")
LINE_COMMENT = re.compile(r'("(?:[^"\\]|\\.)*")|//[^\n]*')
TRAILING_COMMA = re.compile(r",(\s*[}\]])")
SHELL_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def read_settings(path: Path) -> dict[str, Any]:
    """The key → value mapping in ``path``; a one-line error for a missing, unreadable or shapeless file."""
    if not path.is_file():
        raise MoeforgeError(f"{path} does not exist: pass the original tool's config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise MoeforgeError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x}); save it as UTF-8") from None
    if path.suffix == ".sh":
        return _shell_assignments(text)
    if path.suffix == ".py":
        return _python_assignments(path, text)
    if path.suffix in (".yaml", ".yml"):
        return _mapping(path, _yaml(path, text))
    return _mapping(path, _json(path, text))


def _json(path: Path, text: str) -> Any:
    """JSON, forgiving what people paste from READMEs: ``//`` comments, a trailing comma, no outer braces."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    cleaned = TRAILING_COMMA.sub(r"\1", LINE_COMMENT.sub(lambda m: m.group(1) or "", text)).strip()
    if not cleaned.startswith(("{", "[")):
        cleaned = "{" + cleaned.rstrip(",") + "}"
    try:
        return json.loads(cleaned)
    except json.JSONDecodeError as error:
        raise MoeforgeError(f"{path} line {error.lineno}: not valid JSON ({error.msg}); fix the file or save it as YAML") from None


def _yaml(path: Path, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise MoeforgeError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None


def _mapping(path: Path, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise MoeforgeError(f'{path}: the top level must be a mapping of settings like {{"num_experts": 8}}')
    return {str(key): value for key, value in data.items()}


def _shell_assignments(text: str) -> dict[str, Any]:
    """``num_experts=8`` lines of a shell script (``${var}`` expanded in double quotes); commands are skipped."""
    found: dict[str, Any] = {}
    for line in text.splitlines():
        match = SHELL_ASSIGNMENT.match(line)
        if not match:
            continue
        name, raw = match.groups()
        raw = re.sub(r"\s+#.*$", "", raw) if raw[:1] not in "\"'" else raw
        if raw[:1] == '"':
            raw = SHELL_VARIABLE.sub(lambda m: str(found.get(m.group(1) or m.group(2), m.group(0))), raw)
        try:
            found[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            if re.fullmatch(r"[\w./:-]+", raw):
                found[name] = raw
    return found


def _python_assignments(path: Path, text: str) -> dict[str, Any]:
    """``num_experts = 8`` at module level or under ``if __name__ == "__main__":`` with a literal or f-string
    value (f-string fields filled from earlier ones); everything else is code, not settings."""
    try:
        tree = ast.parse(text, str(path))
    except SyntaxError as error:
        raise MoeforgeError(f"{path} line {error.lineno}: not valid Python ({error.msg})") from None
    statements = list(tree.body)
    for node in tree.body:
        if isinstance(node, ast.If):
            statements.extend(node.body)
    found: dict[str, Any] = {}
    for node in statements:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = _python_value(node.value, found)
            if value is not None:
                found[node.targets[0].id] = value
    return found


def _python_value(node: ast.expr, known: dict[str, Any]) -> Any:
    if isinstance(node, ast.JoinedStr):
        parts = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                parts.append(str(part.value))
            elif isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) and part.value.id in known:
                parts.append(str(known[part.value.id]))
            else:
                return None
        return "".join(parts)
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None
