import json

import pytest

from compress.data.text import builtin, load
from compress.errors import UsageError


def test_builtin_calibration_and_evaluation_never_overlap():
    cal, ev = builtin("calibration"), builtin("evaluation")
    assert cal.texts and ev.texts and not set(cal.texts) & set(ev.texts)
    assert "pydoc_data" in ev.description and "odd" in ev.description


def test_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph")
    assert load(str(tmp_path / "a.txt"), "evaluation").texts == ["first paragraph", "second paragraph"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "hello"}) + "\n" + json.dumps({"body": "world"}) + "\n")
    assert load(str(tmp_path / "b.jsonl"), "evaluation", "body").texts == ["hello", "world"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x y z", "u v"]}), tmp_path / "c.parquet")
    assert load(str(tmp_path / "c.parquet"), "evaluation").texts == ["x y z", "u v"]
    (tmp_path / "b.jsonl").unlink()
    assert len(load(str(tmp_path), "evaluation").texts) == 4  # a folder: .txt + .parquet


def test_bad_datasets(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(UsageError, match="no field 'text'"):
        load(str(tmp_path / "b.jsonl"), "evaluation")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(UsageError, match="holds no text"):
        load(str(tmp_path / "empty.txt"), "evaluation")
    with pytest.raises(UsageError, match="not found"):
        load(str(tmp_path / "missing.jsonl"), "evaluation")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UsageError, match="bad.jsonl:1"):
        load(str(tmp_path / "bad.jsonl"), "evaluation")


def test_licenses_is_an_evaluation_domain_with_a_fallback(tmp_path, monkeypatch):
    from compress.data import text

    lic = load("licenses", "evaluation")
    assert lic.texts and lic.description.startswith("licenses:")
    assert not set(lic.texts) & set(builtin("calibration").texts)
    with pytest.raises(UsageError, match="evaluation domain"):
        load("licenses", "calibration")
    monkeypatch.setattr(text, "LICENSES", tmp_path / "absent")  # no Debian folder: Python's own license
    fallback = load("licenses", "evaluation")
    assert "LICENSE.txt" in fallback.description and any("Python Software Foundation" in t for t in fallback.texts)


def test_a_mix_names_each_source_once(tmp_path):
    from compress.data.text import parts

    assert parts("builtin+generated") == ["builtin", "generated"] and parts("builtin") == ["builtin"]
    (tmp_path / "a+b.txt").write_text("one\n\ntwo")
    assert parts(str(tmp_path / "a+b.txt")) == [str(tmp_path / "a+b.txt")]  # an existing path is one source
    for bad in ("builtin+", "builtin+builtin", "+generated"):
        with pytest.raises(UsageError, match="each source once"):
            parts(bad)
    with pytest.raises(UsageError, match="one text at a time"):
        load("builtin+generated", "evaluation")
    with pytest.raises(UsageError, match="not found"):
        load(f"builtin+{tmp_path / 'missing.txt'}", "calibration")
