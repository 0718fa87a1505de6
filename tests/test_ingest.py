"""ingest: every row is an item or a quarantined row with a reason; unreadable catalogs fail
with one message naming the file."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_DIR, sample_rows, write_catalog

from sidpipe.config import CatalogConfig
from sidpipe.data import SAMPLE_CATALOG
from sidpipe.errors import CatalogError
from sidpipe.tasks.ingest import ingest_catalog, normalize_text


def reasons(result) -> dict[str, str]:
    return {q["item_id"]: q["reason"] for q in result.quarantine.to_pylist()}


def test_bundled_sample_is_clean():
    result = ingest_catalog(str(SAMPLE_CATALOG), CatalogConfig())
    assert result.input_rows == 1000 and result.items.num_rows == 1000
    assert result.quarantine.num_rows == 0
    assert result.attribute_columns[:3] == ["gender", "masterCategory", "subCategory"]
    first = result.items.to_pylist()[0]
    assert first["image"].startswith(str(SAMPLE_DIR)) and first["image_fingerprint"].startswith(
        "sha256:"
    )


def test_bad_rows_are_quarantined_with_reasons(tmp_path):
    good = sample_rows(3)
    rows = good + [
        {"item_id": "", "title": "no id"},
        {"item_id": "dup", "title": "same"},
        {"item_id": "dup", "title": "same"},
        {"item_id": "clash", "title": "one"},
        {"item_id": "clash", "title": "two"},
        {"item_id": "bare", "title": ""},
        {"item_id": "lost", "title": "t", "image": "images/missing.jpg"},
        {"item_id": "web", "title": "t", "image": "https://example.com/x.jpg"},
        {"item_id": "ftp", "title": "t", "image": "ftp://host/x.jpg"},
        {"item_id": "blank", "title": "t", "image": "images/empty.jpg"},
    ]
    path = write_catalog(tmp_path, rows)
    (tmp_path / "images" / "empty.jpg").write_bytes(b"")
    result = ingest_catalog(str(path), CatalogConfig())
    why = reasons(result)
    assert result.input_rows == len(rows)
    assert result.items.num_rows + result.quarantine.num_rows == len(rows)
    assert sorted(result.items["item_id"].to_pylist()) == sorted(
        [r["item_id"] for r in good] + ["dup"]
    )
    assert why[None] == "empty item_id"
    assert why["dup"].startswith("duplicate item_id (identical to row")
    assert "conflicting" in why["clash"]
    assert len([q for q in result.quarantine.to_pylist() if q["item_id"] == "clash"]) == 2
    assert why["bare"] == "no title and no image"
    assert why["lost"].startswith("image not found")
    assert "allow_http_images" in why["web"]
    assert "unsupported image reference scheme" in why["ftp"]
    assert why["blank"].startswith("image file is empty")
    raw = json.loads(
        next(q["raw"] for q in result.quarantine.to_pylist() if q["item_id"] == "bare")
    )
    assert raw["item_id"] == "bare"  # the original row is kept for the user to fix


def test_http_images_are_accepted_when_allowed(tmp_path):
    path = write_catalog(tmp_path, [{"item_id": "w", "title": "t", "image": "http://h/x.jpg"}])
    result = ingest_catalog(str(path), CatalogConfig(allow_http_images=True))
    assert result.items["image"].to_pylist() == ["http://h/x.jpg"]


def test_missing_item_id_column_fails_with_file_name(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("id,title\n1,a\n")
    with pytest.raises(
        CatalogError, match=r"items\.csv: no 'item_id' column \(columns: id, title\)"
    ):
        ingest_catalog(str(path), CatalogConfig())


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("items.xlsx", b"x", "unknown catalog format"),
        ("items.csv", b"", "empty CSV"),
        ("items.parquet", b"not parquet", "not a readable Parquet file"),
        ("items.csv", b"\xff\xfe\x00bad", "not UTF-8"),
    ],
)
def test_unreadable_catalogs_fail_clearly(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CatalogError, match=message) as info:
        ingest_catalog(str(path), CatalogConfig())
    assert name in str(info.value)


def test_missing_catalog_file(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        ingest_catalog(str(tmp_path / "nope.csv"), CatalogConfig())


def test_jsonl_with_broken_lines_keeps_the_good_ones(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(
        '{"item_id": "a", "title": "A", "price": 3.5}\n'
        '{"item_id": "b", "title": \n'
        "[1, 2]\n"
        "\n"
        '{"item_id": "c", "title": "C", "price": "cheap"}\n'
    )
    result = ingest_catalog(str(path), CatalogConfig())
    assert result.input_rows == 4
    assert result.items["item_id"].to_pylist() == ["a", "c"]
    assert [q["row"] for q in result.quarantine.to_pylist()] == [2, 3]
    assert "invalid JSON" in result.quarantine["reason"][0].as_py()
    # Mixed types in an attribute column are kept, as text.
    assert result.items["price"].to_pylist() == ["3.5", "cheap"]


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title\na,A\nb,B,extra\n")
    result = ingest_catalog(str(path), CatalogConfig())
    assert result.items["item_id"].to_pylist() == ["a"]
    assert result.quarantine.to_pylist()[0]["reason"] == "CSV row has 3 fields, header has 2"


def test_parquet_catalog_with_integer_ids(tmp_path):
    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": [1, 2], "title": ["a", "b"], "price": [1.0, 2.5]}), path)
    result = ingest_catalog(str(path), CatalogConfig())
    assert result.items["item_id"].to_pylist() == ["1", "2"]
    assert result.items["price"].to_pylist() == [1.0, 2.5]


def test_text_is_normalized():
    assert normalize_text("  Ｆｕｌｌ\u00a0width\t\ttext\x07 ") == "Full width text"
    assert normalize_text("   ") is None
    assert normalize_text(None) is None


def test_item_hash_follows_content_not_location(tmp_path):
    rows = sample_rows(2)
    a = ingest_catalog(str(write_catalog(tmp_path / "a", rows)), CatalogConfig())
    b = ingest_catalog(str(write_catalog(tmp_path / "b", rows)), CatalogConfig())
    assert a.items["item_hash"].to_pylist() == b.items["item_hash"].to_pylist()
    changed = [dict(rows[0], title=rows[0]["title"] + " v2"), rows[1]]
    c = ingest_catalog(str(write_catalog(tmp_path / "c", changed)), CatalogConfig())
    assert c.items["item_hash"][0] != a.items["item_hash"][0]
    assert c.items["item_hash"][1] == a.items["item_hash"][1]


def test_catalog_and_images_on_s3(s3):
    import s3fs

    fs = s3fs.S3FileSystem()
    rows = sample_rows(3)
    fs.pipe(
        f"{s3}/cat/catalog.csv".removeprefix("s3://"),
        (
            "item_id,title,image\n"
            + "".join(f"{r['item_id']},{r['title']},{r['image']}\n" for r in rows)
            + "x,missing,images/none.jpg\n"
        ).encode(),
    )
    for r in rows:
        fs.put(str(SAMPLE_DIR / r["image"]), f"{s3}/cat/{r['image']}".removeprefix("s3://"))
    result = ingest_catalog(f"{s3}/cat/catalog.csv", CatalogConfig())
    assert result.items.num_rows == 3
    assert all(f.startswith("etag:") for f in result.items["image_fingerprint"].to_pylist())
    assert result.items["image"][0].as_py().startswith(f"{s3}/cat/images/")
    assert reasons(result)["x"].startswith("image not found")


def test_columns_named_like_sidpipes_own_fields_are_refused(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title,item_hash\na,A,x\n")
    with pytest.raises(CatalogError, match="item_hash are reserved"):
        ingest_catalog(str(path), CatalogConfig())


def test_unchecked_images_are_fingerprinted_by_location(tmp_path):
    path = write_catalog(
        tmp_path, [{"item_id": "a", "title": "t", "image": "images/none.jpg"}], copy_images=False
    )
    result = ingest_catalog(str(path), CatalogConfig(check_images=False))
    assert result.items["image_fingerprint"][0].as_py().startswith("uri:")
