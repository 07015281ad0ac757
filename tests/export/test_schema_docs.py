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

from export.manifest import schema_errors
from export_testlib import load_schema, schema_rows, schema_type, undocumented_keys

DOC = Path(__file__).resolve().parents[2] / "docs" / "BUNDLE.md"
TABLE_HEADING = "## Every key"


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


def _check_table(schema: dict | None = None) -> None:
    want, got = schema_rows(schema), doc_rows()
    assert sorted(set(want) - set(got)) == [], "keys in bundle.schema.json missing from docs/BUNDLE.md's table"
    assert sorted(set(got) - set(want)) == [], "keys in docs/BUNDLE.md's table that bundle.schema.json lacks"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert wrong == {}, "(documented, schema) required/type differ"


def test_every_schema_key_is_documented_and_every_documented_key_is_in_the_schema():
    _check_table()


def test_the_table_check_fails_when_a_key_is_added_to_one_side(monkeypatch, tmp_path):
    doc = tmp_path / "BUNDLE.md"
    doc.write_text(DOC.read_text().replace("| `max_batch` |", "| `max_batch_size` |"))
    monkeypatch.setattr(__import__(__name__), "DOC", doc)
    with pytest.raises(AssertionError):
        _check_table()


# nested keys of the open artifact entries and provenance: one per sub-object, each side in turn
NESTED = [("compiled_for", "cpu_isa"), ("compiled_for", "capability"), ("program", "sha256"),
          ("quantization", "top1_agreement"), ("parity", "reference"), ("export_options", "pt2_isa")]
PARENT = {"compiled_for": "artifacts.KEY", "program": "artifacts.KEY", "quantization": "artifacts.KEY",
          "parity": "artifacts.KEY", "export_options": "provenance"}


@pytest.mark.parametrize("obj, key", NESTED)
def test_a_nested_key_missing_from_the_table_fails(monkeypatch, tmp_path, obj, key):
    row = f"| `{PARENT[obj]}.{obj}.{key}` |"
    assert row in DOC.read_text()
    doc = tmp_path / "BUNDLE.md"
    doc.write_text("\n".join(line for line in DOC.read_text().splitlines() if not line.startswith(row)))
    monkeypatch.setattr(__import__(__name__), "DOC", doc)
    with pytest.raises(AssertionError, match="missing from docs/BUNDLE.md"):
        _check_table()


@pytest.mark.parametrize("obj, key", NESTED)
def test_a_nested_key_missing_from_the_schema_fails(obj, key):
    schema = load_schema()
    node = schema["$defs"][obj] if obj in schema["$defs"] else schema["$defs"]["artifact"]["properties"][obj]
    del node["properties"][key]
    with pytest.raises(AssertionError, match="that bundle.schema.json lacks"):
        _check_table(schema)


@pytest.mark.slow
def test_every_key_the_exporter_writes_is_in_the_schema(bundle_a):
    """bundle_a: TorchScript + CPU .pt2 (compiled_for, program) through build_bundle (export_options); the
    int8 keys are checked in test_int8.py. Artifact entries are open, so validation alone would pass."""
    from export.manifest import read_manifest

    assert undocumented_keys(read_manifest(bundle_a)) == []


def test_undocumented_keys_finds_a_new_nested_key():
    example = next(m for m in _examples() if m["kind"] == "model")
    assert undocumented_keys(example) == []
    example["artifacts"]["pt2"]["compiled_for"]["new_flag"] = 1
    example["provenance"]["export_options"] = {"pt2_isa": "avx2", "new_option": True}
    example["artifacts"]["onnx"]["quantization"] = {"new_stat": 0.5}
    assert undocumented_keys(example) == ["artifacts.KEY.compiled_for.new_flag", "artifacts.KEY.quantization.new_stat",
                                          "provenance.export_options.new_option"]


def test_the_signature_table_is_the_signature_schema():
    from export.signing import SIGNATURE_SCHEMA_FILE

    schema = json.loads(SIGNATURE_SCHEMA_FILE.read_text())
    want = {k: ("yes" if k in schema["required"] else "no", schema_type(schema, node))
            for k, node in schema["properties"].items()}
    trust = DOC.read_text().split("## Trust", 1)[1].split("\n## ", 1)[0]
    got = {}
    for line in trust.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            got[cells[0].strip("`")] = (cells[1], cells[2].strip("`"))
    assert got == want


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
