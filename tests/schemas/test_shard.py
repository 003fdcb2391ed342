"""The shard contract: Arrow schema as single source, keys, rows, derived JSON Schema, versions."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pyarrow as pa
import pytest

import schemas.shard as shard
from schemas.shard import (
    ARROW_SCHEMA,
    FIELDS,
    SCHEMA_VERSION,
    check_arrow_schema,
    check_schema_version,
    empty_row,
    json_schema,
    sample_key,
    shard_name,
    table_from_rows,
    validate_row,
)
from stages.output.writer import write_unit
from tests.shard_fixtures import unit_rows

REQUESTED = """key source_id status error partner_key partner_source_id lam lam_hat margin method lam_mode
kept_patches grid image_size model pretrained merge_total merge_schedule attn_layer prop_attn seed prompt answer
conversations label partner_label unit index winner_sha256 loser_sha256 mask_sha256 image_format schema_version
orig_size resize_mode saliency input_index jpeg_quality fingerprint activation norm_mean norm_std interpolation
method_params""".split()


def test_fields_come_from_the_arrow_schema_and_cover_the_contract():
    assert FIELDS == tuple(ARROW_SCHEMA.names)
    assert set(REQUESTED) == set(FIELDS)
    assert len(set(FIELDS)) == len(FIELDS)
    assert ARROW_SCHEMA.metadata[b"mergemix.schema_version"] == SCHEMA_VERSION.encode()


def test_every_field_is_documented_in_the_table_and_the_arrow_metadata():
    doc = shard.__doc__
    for field in ARROW_SCHEMA:
        assert f"| {field.name} " in doc, field.name
        assert field.metadata[b"doc"].strip(), field.name


def test_keys_are_zero_padded_dot_free_and_sort_in_order():
    keys = [sample_key(u, i) for u in (0, 1, 12) for i in (0, 1, 999, 1000)]
    assert keys[0] == "000000_000000" and sample_key(12, 34) == "000012_000034"
    assert all("." not in k and shard.KEY_RE.match(k) for k in keys)
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert shard_name(123) == "000123"
    for bad in ((-1, 0), (0, 1_000_000), (1_000_000, 0)):
        with pytest.raises(ValueError):
            sample_key(*bad)


def test_empty_row_has_every_field_and_rejects_typos():
    row = empty_row(key="000000_000000", lam=0.5)
    assert tuple(row) == FIELDS
    assert row["schema_version"] == SCHEMA_VERSION and row["lam"] == 0.5 and row["answer"] is None
    with pytest.raises(KeyError, match="lamda"):
        empty_row(lamda=0.5)


def test_rows_need_every_field_and_the_right_types():
    row = empty_row(key="000000_000000", status="ok", unit=0, index=0)
    del row["answer"]
    with pytest.raises(KeyError, match="answer"):
        table_from_rows([row])
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        table_from_rows([empty_row(key="000000_000000", status="ok", unit=0, index=0, lam="half")])
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, ValueError)):  # grid must have exactly 2 values
        table_from_rows([empty_row(key="000000_000000", status="ok", unit=0, index=0, grid=[1, 2, 3])])


def test_records_validate_against_the_json_schema_derived_from_arrow(tmp_path):
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert list(schema["properties"]) == list(FIELDS)
    rows, images = unit_rows(0, 4, failed=(1,))
    write_unit(tmp_path, 0, rows, images, image_format="png", fingerprint="fp")  # fills hashes and geometry
    records = [json.loads(json.dumps(r)) for r in table_from_rows(rows).to_pylist()]
    for record in records:
        jsonschema.validate(record, schema)
    bad = dict(records[0], status="maybe")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(records[0], grid=[4]), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(records[0], extra=1), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(records[0], key="0.1"), schema)


def test_saved_json_schema_file_is_current():
    """schemas/sample.schema.json is derived from ARROW_SCHEMA; regenerate it when the schema changes:
    python -c "import json; from schemas.shard import json_schema; print(json.dumps(json_schema(), indent=2))" > schemas/sample.schema.json"""
    saved = json.loads((Path(shard.__file__).parent / "sample.schema.json").read_text())
    assert saved == json_schema()


def test_schema_versions_with_another_major_are_refused_with_the_fix():
    check_schema_version(SCHEMA_VERSION, "x")
    check_schema_version(f"{shard.SCHEMA_MAJOR}.99", "x")  # newer minor only adds nullable fields
    with pytest.raises(ValueError, match=r"shards/000001.parquet has schema version 99.0.*regenerate"):
        check_schema_version("99.0", "shards/000001.parquet")
    with pytest.raises(ValueError, match="no mergemix schema version"):
        check_schema_version(None, "f")
    other = ARROW_SCHEMA.with_metadata({b"mergemix.schema_version": b"0.1"})
    with pytest.raises(ValueError, match="schema version 0.1"):
        check_arrow_schema(other, "f")
    renamed = pa.schema([f if f.name != "lam" else f.with_name("lambda") for f in ARROW_SCHEMA], metadata=ARROW_SCHEMA.metadata)
    with pytest.raises(ValueError, match=r"lacks columns \['lam'\]"):
        check_arrow_schema(renamed, "f")


def test_files_of_an_older_minor_lack_only_the_fields_added_since():
    """A 1.0 Parquet file has no 1.1 columns and stays readable; a 1.1 file without them is damaged."""
    added = [f.name for f in ARROW_SCHEMA if f.metadata.get(b"since") == b"1.1"]
    assert added == ["activation", "norm_mean", "norm_std", "interpolation"]
    old = pa.schema([f for f in ARROW_SCHEMA if f.name not in added], metadata={b"mergemix.schema_version": b"1.0"})
    check_arrow_schema(old, "shards/000000.parquet")
    with pytest.raises(ValueError, match="lacks columns"):
        check_arrow_schema(old.with_metadata(ARROW_SCHEMA.metadata), "f")


def test_validate_row_catches_value_problems():
    ok = empty_row(key="000000_000000", status="ok", unit=0, index=0, lam=0.3, lam_hat=0.25, winner_sha256="a",
                   loser_sha256="b", mask_sha256="c", image_format="png", grid=[2, 2], image_size=[16, 16])
    assert validate_row(ok) == []
    assert any("lam_hat" in p for p in validate_row(dict(ok, lam_hat=1.5)))
    assert any("lam" in p for p in validate_row(dict(ok, lam=float("nan"))))
    assert any("mask_sha256" in p for p in validate_row(dict(ok, mask_sha256=None)))
    assert any("bad key" in p for p in validate_row(dict(ok, key="a.b")))
    assert any("without error" in p for p in validate_row(empty_row(key="000000_000001", status="failed", unit=0, index=1)))
