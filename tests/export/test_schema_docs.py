"""docs/BUNDLE.md and python/export/bundle.schema.json say the same thing.

    PYTHONPATH=$PWD/python:$PWD .venv/bin/python tests/export/test_schema_docs.py   # prints the field table

The page's field table has one row per key of the schema (key, required, type: exactly what the schema
says; the meaning column is free text), so adding a key to one and not the other fails here; every
```json example in the page is a complete manifest that validates; every writer's output validates
(tests/export and tests/native load bundles through the validator).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from export.manifest import SCHEMA_FILE, schema_errors

DOC = Path(__file__).resolve().parents[2] / "docs" / "BUNDLE.md"
TABLE_HEADING = "## Every key"


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _type(schema: dict, node: dict) -> str:
    if node.get("$ref", "").endswith("/sha256"):
        return "sha256 hex"
    node = _resolve(schema, node)
    if "const" in node:
        return json.dumps(node["const"])
    if "enum" in node:
        return " or ".join(json.dumps(e) for e in node["enum"])
    if "prefixItems" in node:
        return "[" + ", ".join(_type(schema, p) for p in node["prefixItems"]) + "]"
    t = node.get("type", "any")
    if t == "array" and "items" in node:
        return f"array of {_type(schema, node['items'])}"
    if t == "object" and isinstance(node.get("additionalProperties"), dict) and "properties" not in node:
        inner = _resolve(schema, node["additionalProperties"])
        return "object of " + ("artifact" if "properties" in inner else _type(schema, node["additionalProperties"]))
    return " or ".join(t) if isinstance(t, list) else t


def _walk(schema: dict, node: dict, prefix: str, out: dict) -> None:
    node = _resolve(schema, node)
    if node.get("type") == "array" and "items" in node:
        _walk(schema, node["items"], prefix + "[]", out)
        return
    if isinstance(node.get("additionalProperties"), dict) and "properties" in _resolve(
            schema, node["additionalProperties"]):
        _walk(schema, node["additionalProperties"], prefix + ".KEY", out)
        return
    required = set(node.get("required", ()))
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        out[path] = ("yes" if key in required else "no", _type(schema, sub))
        _walk(schema, sub, path, out)


def schema_rows() -> dict[str, tuple[str, str]]:
    """key path -> (required, type); top-level keys say which kinds require them."""
    schema = json.loads(SCHEMA_FILE.read_text())
    per_kind = {}
    for kind in ("model", "ensemble"):
        per_kind[kind] = {}
        _walk(schema, schema["$defs"][kind], "", per_kind[kind])
    rows = {}
    for kind, fields in per_kind.items():
        for path, (req, typ) in fields.items():
            if "." in path or "[" in path:
                rows[path] = (req, typ)
                continue
            kinds = [k for k in per_kind if per_kind[k].get(path, ("no",))[0] == "yes"]
            types = list(dict.fromkeys(per_kind[k][path][1] for k in per_kind if path in per_kind[k]))
            rows[path] = ({0: "no", 1: kinds[0] if kinds else "no", 2: "both"}[len(kinds)], " or ".join(types))
    return rows


def doc_rows() -> dict[str, tuple[str, str]]:
    text = DOC.read_text()
    assert TABLE_HEADING in text, f"docs/BUNDLE.md lost its '{TABLE_HEADING}' section"
    section = text.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            key = cells[0].strip("`")
            assert key not in rows, f"docs/BUNDLE.md documents {key} twice"
            rows[key] = (cells[1], cells[2].replace("\\|", "|").strip("`"))
    return rows


def test_every_schema_key_is_documented_and_every_documented_key_is_in_the_schema():
    want, got = schema_rows(), doc_rows()
    assert sorted(set(want) - set(got)) == [], "keys in bundle.schema.json missing from docs/BUNDLE.md's table"
    assert sorted(set(got) - set(want)) == [], "keys in docs/BUNDLE.md's table that bundle.schema.json lacks"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert wrong == {}, "(documented, schema) required/type differ"


def test_the_table_check_fails_when_a_key_is_added_to_one_side(monkeypatch, tmp_path):
    doc = tmp_path / "BUNDLE.md"
    doc.write_text(DOC.read_text().replace("| `max_batch` |", "| `max_batch_size` |"))
    monkeypatch.setattr(__import__(__name__), "DOC", doc)
    with pytest.raises(AssertionError):
        test_every_schema_key_is_documented_and_every_documented_key_is_in_the_schema()


def _examples() -> list[dict]:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)
    return [json.loads(b) for b in blocks]


def test_the_example_manifests_in_the_page_validate():
    examples = _examples()
    assert {m["kind"] for m in examples} == {"model", "ensemble"}
    for m in examples:
        assert [e.message for e in schema_errors(m)] == []


def _print_table() -> None:
    print("| Key | Required | Type | Meaning |\n|---|---|---|---|")
    for key, (req, typ) in schema_rows().items():
        print(f"| `{key}` | {req} | `{typ}` | |")


if __name__ == "__main__":
    _print_table()
