"""Tests of Location (a URI parsed once) and of Storage taking Locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from secateur.server.storage import (
    AllowList,
    InvalidUriError,
    Location,
    Storage,
    StorageNotFoundError,
    StoragePermissionError,
)


def test_parse_keeps_the_users_spelling_but_compares_normalised(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    real = os.path.realpath(tmp_path)
    plain = Location.parse(str(tmp_path / "a" / ".." / "a"))
    as_uri = Location.parse(f"file://localhost{tmp_path}/a/")
    assert plain == as_uri
    assert plain.scheme == "file" and plain.is_local and plain.bucket == ""
    assert plain.uri == plain.path == plain.tf_path == f"{real}/a"
    assert plain.text == str(tmp_path / "a" / ".." / "a")
    assert as_uri.text == f"file://localhost{tmp_path}/a/"
    assert Location.parse(plain) is plain


def test_gs_location_parts() -> None:
    loc = Location.parse("gs://bkt/models/vgg/")
    assert (loc.scheme, loc.bucket, loc.path) == ("gs", "bkt", "models/vgg")
    assert loc.uri == loc.tf_path == "gs://bkt/models/vgg"
    assert loc.text == "gs://bkt/models/vgg/"
    assert loc.name == "vgg"
    assert loc.parent == Location.parse("gs://bkt/models")
    assert loc.parent.parent == Location.parse("gs://bkt")
    assert loc.parent.parent.parent == Location.parse("gs://bkt")  # a root is its own parent
    assert loc.child("3").uri == "gs://bkt/models/vgg/3"
    assert loc.child("3").text == "gs://bkt/models/vgg/3"
    assert Location.parse("gs://bkt").child("x/y").uri == "gs://bkt/x/y"
    with pytest.raises(InvalidUriError):
        Location.parse("gs://bkt/a/../b")


def test_within_never_crosses_schemes_or_buckets(tmp_path: Path) -> None:
    base = Location.parse("gs://bkt/m")
    assert Location.parse("gs://bkt/m/x").within(base)
    assert base.within(base)
    assert not Location.parse("gs://bkt/m2").within(base)
    assert not Location.parse("gs://ckt/m/x").within(base)
    local = Location.parse(str(tmp_path))
    assert local.child("x").within(local)
    assert local.child("x").parent == local
    assert not local.within(base) and not base.within(local)
    assert not Location.parse(f"{tmp_path}x").within(local)


def test_allow_list_names_the_users_spelling(tmp_path: Path) -> None:
    allow = AllowList([str(tmp_path / "data")])
    assert allow.prefixes == (os.path.join(os.path.realpath(tmp_path), "data"),)
    spelled = f"file://{tmp_path}/data/../secret"
    with pytest.raises(StoragePermissionError) as info:
        allow.check(Location.parse(spelled))
    assert info.value.uri == spelled
    assert AllowList(None).permits(Location.parse("gs://any/where"))


def test_storage_takes_locations_and_finds_locations(tmp_path: Path) -> None:
    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(name.encode())
    store = Storage([str(tmp_path)])
    pattern = store.locate(f"file://{tmp_path}/*.bin")
    found = store.find(pattern)
    assert [m.text for m in found] == [f"file://{tmp_path}/a.bin", f"file://{tmp_path}/b.bin"]
    assert store.read_bytes(found[1]) == b"b.bin"
    assert store.download(found[0], str(tmp_path / "dl")) == str(tmp_path / "dl" / "a.bin")
    with pytest.raises(StorageNotFoundError) as info:
        store.find(f"{tmp_path}/*.none")
    assert info.value.uri == f"{tmp_path}/*.none"
    # A Location made elsewhere is still checked against this storage's allow-list.
    with pytest.raises(StoragePermissionError):
        Storage([str(tmp_path / "other")]).read_bytes(found[0])


def test_errors_escape_control_characters_and_name_the_field(tmp_path: Path) -> None:
    odd = f"{tmp_path}/m\r\x1b[2Kx.keras"
    with pytest.raises(StorageNotFoundError) as info:
        Storage().read_bytes(odd)
    assert info.value.uri == odd
    assert str(info.value).endswith(f"Received: {odd!r}")
    assert "\x1b" not in str(info.value) and "\r" not in str(info.value)
    with pytest.raises(InvalidUriError) as bad:
        Storage().locate("s3://bucket/m.keras", field="model_uri")
    assert bad.value.field == "model_uri"
    with pytest.raises(StoragePermissionError) as denied:
        Storage([str(tmp_path / "data")]).locate(str(tmp_path), field="output_uri")
    assert denied.value.field == "output_uri"
