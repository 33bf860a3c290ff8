"""Tests of secateur.server.storage on real files and a real GCS emulator."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud.storage.blob import Blob
from google.cloud.storage.bucket import Bucket

from secateur.server.storage import (
    InvalidUriError,
    Storage,
    StorageError,
    StorageExistsError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageUnreachableError,
)
from secateur.server.storage import local as storage_local

# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_model_dir(root: Path) -> Path:
    """A small SavedModel-shaped tree."""
    model = root / "model"
    (model / "variables").mkdir(parents=True)
    (model / "assets").mkdir()
    (model / "saved_model.pb").write_bytes(b"graph-bytes")
    (model / "fingerprint.pb").write_bytes(b"fp")
    (model / "variables" / "variables.index").write_bytes(b"index")
    (model / "variables" / "variables.data-00000-of-00001").write_bytes(b"\x00\x01" * 1000)
    (model / "assets" / "vocab.txt").write_text("a\nb\n")
    return model


def tree_contents(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def blob_names(client: Any, bucket: str, prefix: str = "") -> list[str]:
    return sorted(b.name for b in client.list_blobs(bucket, prefix=prefix))


def upload(client: Any, bucket: str, name: str, data: bytes) -> None:
    client.bucket(bucket).blob(name).upload_from_string(data)


# --------------------------------------------------------------------------- errors, URIs


def test_error_tree_and_messages() -> None:
    for cls in (
        StorageNotFoundError,
        StoragePermissionError,
        StorageExistsError,
        StorageUnreachableError,
        InvalidUriError,
    ):
        assert issubclass(cls, StorageError)
    assert issubclass(InvalidUriError, ValueError)
    with pytest.raises(InvalidUriError) as info:
        Storage().normalize("s3://bucket/model")
    assert info.value.uri == "s3://bucket/model"
    assert str(info.value).endswith("Received: s3://bucket/model")
    assert "s3://" in str(info.value)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/model",
        "http://example.com/model",
        "https://example.com/model",
        "hdfs://nn/model",
        "",
        "   ",
        "gs://",
        "gs:///object",
        "gs://Bad_Bucket/x",
        "gs://ab/x",
        "gs://bucket/a/../b",
        "file://remotehost/data",
        "file://relative/path",
        "/data/with\x00nul",
    ],
)
def test_invalid_uris(uri: str) -> None:
    store = Storage()
    with pytest.raises(InvalidUriError) as info:
        store.exists(uri)
    assert str(info.value).endswith(f"Received: {info.value.uri}")
    with pytest.raises(ValueError):
        store.normalize(uri)


def test_normalize(tmp_path: Path) -> None:
    store = Storage()
    (tmp_path / "a").mkdir()
    real = os.path.realpath(tmp_path)
    assert store.normalize(str(tmp_path / "a" / ".." / "a")) == f"{real}/a"
    assert store.normalize(f"file://{tmp_path}/a") == f"{real}/a"
    assert store.normalize(f"file://localhost{tmp_path}/a/") == f"{real}/a"
    assert store.normalize("gs://bucket/path/to/") == "gs://bucket/path/to"
    assert store.normalize("gs://bucket/") == "gs://bucket"
    assert store.normalize("gs://bucket") == "gs://bucket"


# --------------------------------------------------------------------------- allow-list


def test_allow_list_inside_and_outside(tmp_path: Path) -> None:
    allowed = tmp_path / "data"
    allowed.mkdir()
    (allowed / "x.bin").write_bytes(b"ok")
    (tmp_path / "secret.bin").write_bytes(b"no")
    store = Storage(allowed_prefixes=[str(allowed)])
    assert store.read_bytes(str(allowed / "x.bin")) == b"ok"
    assert store.exists(str(allowed))
    assert store.is_allowed(f"file://{allowed}/x.bin")
    with pytest.raises(StoragePermissionError) as info:
        store.read_bytes(str(tmp_path / "secret.bin"))
    assert info.value.uri == str(tmp_path / "secret.bin")
    assert "allowed prefixes" in str(info.value)


def test_allow_list_dotdot_escape(tmp_path: Path) -> None:
    allowed = tmp_path / "data"
    allowed.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"no")
    store = Storage(allowed_prefixes=[str(allowed)])
    for uri in (f"{allowed}/../secret.bin", f"file://{allowed}/../secret.bin"):
        with pytest.raises(StoragePermissionError):
            store.read_bytes(uri)
        assert not store.is_allowed(uri)


def test_allow_list_symlink_escape(tmp_path: Path) -> None:
    allowed = tmp_path / "data"
    allowed.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"no")
    (allowed / "link").symlink_to(outside)
    (allowed / "filelink").symlink_to(outside / "secret.bin")
    store = Storage(allowed_prefixes=[str(allowed)])
    with pytest.raises(StoragePermissionError):
        store.read_bytes(str(allowed / "link" / "secret.bin"))
    with pytest.raises(StoragePermissionError):
        store.read_bytes(str(allowed / "filelink"))
    # A tree inside the allow-list holding a link out of it cannot be copied.
    model = allowed / "model"
    model.mkdir()
    (model / "ok.txt").write_text("ok")
    (model / "escape").symlink_to(outside / "secret.bin")
    dest = tmp_path / "dl"
    with pytest.raises(StoragePermissionError):
        store.download(str(model), str(dest))
    assert not (dest / "model").exists()
    assert [p.name for p in dest.iterdir()] == []
    # glob leaves out matches that resolve outside the allow-list.
    assert store.glob(f"{allowed}/*") == [str(allowed / "model")]


def test_allow_list_prefix_boundary(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "database").mkdir()
    (tmp_path / "database" / "x").write_bytes(b"x")
    store = Storage(allowed_prefixes=[str(tmp_path / "data")])
    assert store.is_allowed(str(tmp_path / "data"))
    assert store.is_allowed(str(tmp_path / "data" / "deep" / "x"))
    assert not store.is_allowed(str(tmp_path / "database"))
    with pytest.raises(StoragePermissionError):
        store.read_bytes(str(tmp_path / "database" / "x"))


def test_allow_list_gs_prefixes() -> None:
    store = Storage(allowed_prefixes=["gs://models", "gs://shared/team-a/"])
    assert store.is_allowed("gs://models")
    assert store.is_allowed("gs://models/vgg/1/saved_model.pb")
    assert not store.is_allowed("gs://models2/vgg")
    assert store.is_allowed("gs://shared/team-a/x")
    assert not store.is_allowed("gs://shared/team-ab/x")
    assert not store.is_allowed("gs://shared")
    assert not store.is_allowed("/tmp/x")
    with pytest.raises(InvalidUriError):
        store.is_allowed("gs://shared/team-a/../team-b/x")


def test_every_public_method_checks_allow_list(tmp_path: Path) -> None:
    allowed = tmp_path / "data"
    allowed.mkdir()
    src = make_model_dir(tmp_path)
    outside = str(tmp_path / "other")
    store = Storage(allowed_prefixes=[str(allowed), "gs://ok-bucket"])
    calls = [
        lambda u: store.normalize(u),
        lambda u: store.exists(u),
        lambda u: store.download(u, str(tmp_path / "dl")),
        lambda u: store.glob(u + "/*"),
        lambda u: store.read_bytes(u),
        lambda u: store.write_bytes(u, b"x"),
        lambda u: store.list_versions(u),
        lambda u: store.next_version(u),
        lambda u: store.publish_dir(str(src), u),
        lambda u: store.delete(u),
    ]
    for call in calls:
        for uri in (outside, "gs://other-bucket/x"):
            with pytest.raises(StoragePermissionError):
                call(uri)
    assert not (tmp_path / "other").exists()


def test_allowed_prefixes_must_be_a_sequence() -> None:
    with pytest.raises(TypeError):
        Storage(allowed_prefixes="/data")
    with pytest.raises(InvalidUriError):
        Storage(allowed_prefixes=["s3://x"])


# --------------------------------------------------------------------------- local


def test_local_read_write_exists_delete(tmp_path: Path) -> None:
    store = Storage()
    target = tmp_path / "new" / "dir" / "f.bin"
    store.write_bytes(str(target), b"one")
    store.write_bytes(f"file://{target}", b"two")
    assert store.read_bytes(str(target)) == b"two"
    assert store.exists(str(target)) and store.exists(str(tmp_path / "new"))
    assert sorted(os.listdir(target.parent)) == ["f.bin"]  # no temp files left
    with pytest.raises(StorageNotFoundError) as info:
        store.read_bytes(str(tmp_path / "missing.bin"))
    assert info.value.uri == str(tmp_path / "missing.bin")
    with pytest.raises(StorageNotFoundError):
        store.read_bytes(str(tmp_path / "new"))  # a directory
    store.delete(str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    with pytest.raises(StorageNotFoundError):
        store.delete(str(tmp_path / "new"))
    store.delete(str(tmp_path / "new"), missing_ok=True)


def test_local_download_file_and_tree(tmp_path: Path) -> None:
    store = Storage()
    model = make_model_dir(tmp_path / "src")
    dest = tmp_path / "dest"
    got = store.download(str(model / "saved_model.pb"), str(dest))
    assert got == str(dest / "saved_model.pb")
    assert Path(got).read_bytes() == b"graph-bytes"
    got_dir = store.download(f"file://{model}", str(dest))
    assert got_dir == str(dest / "model")
    assert tree_contents(Path(got_dir)) == tree_contents(model)
    # Downloading again replaces the copy (no stale files).
    (dest / "model" / "stale.txt").write_text("old")
    store.download(str(model), str(dest))
    assert tree_contents(dest / "model") == tree_contents(model)
    assert sorted(p.name for p in dest.iterdir()) == ["model", "saved_model.pb"]
    with pytest.raises(StorageNotFoundError):
        store.download(str(tmp_path / "nothing"), str(dest))
    # Into its own parent: nothing to do; into itself: refused.
    assert store.download(str(model), str(model.parent)) == str(model)
    assert tree_contents(model) == tree_contents(dest / "model")
    with pytest.raises(StorageError):
        store.download(str(model), str(model / "variables"))
    assert sorted(os.listdir(model / "variables")) == [
        "variables.data-00000-of-00001",
        "variables.index",
    ]


def test_local_glob(tmp_path: Path) -> None:
    store = Storage()
    for name in ("a1.keras", "a2.keras", "b1.keras", ".hidden.keras", "a1.h5"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a3.keras").write_bytes(b"x")
    assert store.glob(f"{tmp_path}/a*.keras") == [
        str(tmp_path / "a1.keras"),
        str(tmp_path / "a2.keras"),
    ]
    assert store.glob(f"{tmp_path}/?1.*") == [
        str(tmp_path / "a1.h5"),
        str(tmp_path / "a1.keras"),
        str(tmp_path / "b1.keras"),
    ]
    assert store.glob(f"{tmp_path}/[ab]2.keras") == [str(tmp_path / "a2.keras")]
    assert store.glob(f"{tmp_path}/*/a3.keras") == [str(tmp_path / "sub" / "a3.keras")]
    assert store.glob(str(tmp_path / "a1.h5")) == [str(tmp_path / "a1.h5")]
    assert store.glob(f"file://{tmp_path}/b*") == [f"file://{tmp_path}/b1.keras"]
    with pytest.raises(StorageNotFoundError):
        store.glob(f"{tmp_path}/*.onnx")
    with pytest.raises(StorageNotFoundError):
        store.glob(str(tmp_path / "missing.keras"))


def test_local_versions_and_next_version(tmp_path: Path) -> None:
    store = Storage()
    base = tmp_path / "served"
    assert store.list_versions(str(base)) == []
    assert store.next_version(str(base)) == 1
    for name in ("1", "3", "10", "abc", ".tmp-x", "2x"):
        (base / name).mkdir(parents=True)
    (base / "7").write_bytes(b"a file, not a version")
    assert store.list_versions(str(base)) == [1, 3, 10]
    assert store.next_version(f"file://{base}") == 11


def test_local_publish_versions(tmp_path: Path) -> None:
    store = Storage(allowed_prefixes=[str(tmp_path / "served")])
    model = make_model_dir(tmp_path / "src")
    base = tmp_path / "served" / "vgg"
    first = store.publish_dir(str(model), str(base))
    assert first == os.path.join(os.path.realpath(base), "1")
    second = store.publish_dir(str(model), f"file://{base}")
    assert second == os.path.join(os.path.realpath(base), "2")
    assert tree_contents(Path(first)) == tree_contents(model)
    assert tree_contents(Path(second)) == tree_contents(model)
    assert store.list_versions(str(base)) == [1, 2]
    assert sorted(os.listdir(base)) == ["1", "2"]  # no temp dirs left
    assert store.publish_dir(str(model), str(base), version=7).endswith("/7")
    assert store.next_version(str(base)) == 8


def test_local_publish_existing_version_changes_nothing(tmp_path: Path) -> None:
    store = Storage()
    model = make_model_dir(tmp_path / "src")
    base = tmp_path / "served"
    store.publish_dir(str(model), str(base), version=3)
    (model / "saved_model.pb").write_bytes(b"other graph")
    before = tree_contents(base)
    with pytest.raises(StorageExistsError) as info:
        store.publish_dir(str(model), str(base), version=3)
    assert info.value.uri.endswith("/3")
    assert tree_contents(base) == before
    assert sorted(os.listdir(base)) == ["3"]


def test_local_publish_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage()
    model = make_model_dir(tmp_path / "src")
    base = tmp_path / "served"
    store.publish_dir(str(model), str(base))
    calls = []
    original = storage_local._copy_file

    def flaky(src: str, dst: str) -> None:
        calls.append(src)
        if len(calls) == 3:
            raise OSError(5, "Input/output error (injected)")
        original(src, dst)

    monkeypatch.setattr(storage_local, "_copy_file", flaky)
    with pytest.raises(StorageError):
        store.publish_dir(str(model), str(base))
    assert len(calls) >= 3  # shutil.copytree copies the rest before raising
    assert sorted(os.listdir(base)) == ["1"]
    # A base directory created by the failed publish is removed too.
    with pytest.raises(StorageError):
        calls.clear()
        store.publish_dir(str(model), str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()


def test_local_publish_rechecks_before_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version that appears while the tree is being copied is not overwritten."""
    store = Storage()
    model = make_model_dir(tmp_path / "src")
    base = tmp_path / "served"
    base.mkdir()
    original = storage_local._copy_file

    def racing(src: str, dst: str) -> None:
        (base / "1").mkdir(exist_ok=True)
        (base / "1" / "theirs.txt").write_text("other writer")
        original(src, dst)

    monkeypatch.setattr(storage_local, "_copy_file", racing)
    with pytest.raises(StorageExistsError):
        store.publish_dir(str(model), str(base), version=1)
    assert sorted(os.listdir(base)) == ["1"]
    assert os.listdir(base / "1") == ["theirs.txt"]


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="root reads unreadable files"
)
def test_local_publish_unreadable_file(tmp_path: Path) -> None:  # pragma: no cover
    store = Storage()
    model = make_model_dir(tmp_path / "src")
    (model / "variables" / "variables.index").chmod(0)
    with pytest.raises(StorageError):
        store.publish_dir(str(model), str(tmp_path / "served"))
    assert not (tmp_path / "served").exists()


def test_publish_rejects_bad_version_and_missing_dir(tmp_path: Path) -> None:
    store = Storage()
    model = make_model_dir(tmp_path / "src")
    with pytest.raises(InvalidUriError):
        store.publish_dir(str(model), str(tmp_path / "served"), version=-1)
    with pytest.raises(StorageNotFoundError):
        store.publish_dir(str(tmp_path / "nope"), str(tmp_path / "served"))
    assert not (tmp_path / "served").exists()


# --------------------------------------------------------------------------- GCS


def test_gcs_read_write_exists(gcs_bucket: str, gcs_client: Any) -> None:
    store = Storage()  # lazy client from STORAGE_EMULATOR_HOST
    uri = f"gs://{gcs_bucket}/models/vgg/config.json"
    store.write_bytes(uri, b'{"a": 1}')
    assert store.read_bytes(uri) == b'{"a": 1}'
    assert store.exists(uri)
    assert store.exists(f"gs://{gcs_bucket}/models/vgg")  # a "directory"
    assert store.exists(f"gs://{gcs_bucket}/models/vgg/")
    assert store.exists(f"gs://{gcs_bucket}")
    assert not store.exists(f"gs://{gcs_bucket}/models/vg")
    assert not store.exists(f"gs://{gcs_bucket}/missing")
    assert not store.exists("gs://no-such-bucket-here/x")
    assert blob_names(gcs_client, gcs_bucket) == ["models/vgg/config.json"]


def test_gcs_missing_object_is_not_found(gcs_bucket: str) -> None:
    store = Storage()
    uri = f"gs://{gcs_bucket}/missing/object.bin"
    with pytest.raises(StorageNotFoundError) as info:
        store.read_bytes(uri)
    assert info.value.uri == uri
    assert str(info.value).endswith(f"Received: {uri}")
    with pytest.raises(StorageNotFoundError):
        store.download(f"gs://{gcs_bucket}/missing", "/tmp/never-used-dir")
    with pytest.raises(StorageNotFoundError):
        store.delete(uri)
    store.delete(uri, missing_ok=True)


def test_gcs_injected_client(gcs_bucket: str, gcs_client: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    store = Storage(gcs_client=gcs_client)
    store.write_bytes(f"gs://{gcs_bucket}/x.bin", b"x")
    assert store.read_bytes(f"gs://{gcs_bucket}/x.bin") == b"x"


def test_gcs_download_file_and_tree(gcs_bucket: str, gcs_client: Any, tmp_path: Path) -> None:
    store = Storage(allowed_prefixes=[f"gs://{gcs_bucket}/models"])
    model = make_model_dir(tmp_path / "src")
    for rel, data in tree_contents(model).items():
        upload(gcs_client, gcs_bucket, f"models/vgg/{rel}", data)
    upload(gcs_client, gcs_bucket, "models/vgg-other/x", b"not part of vgg")
    dest = tmp_path / "dest"
    got = store.download(f"gs://{gcs_bucket}/models/vgg/saved_model.pb", str(dest))
    assert got == str(dest / "saved_model.pb")
    assert Path(got).read_bytes() == b"graph-bytes"
    got_dir = store.download(f"gs://{gcs_bucket}/models/vgg/", str(dest))
    assert got_dir == str(dest / "vgg")
    assert tree_contents(Path(got_dir)) == tree_contents(model)
    assert sorted(p.name for p in dest.iterdir()) == ["saved_model.pb", "vgg"]


def test_gcs_glob(gcs_bucket: str, gcs_client: Any) -> None:
    store = Storage()
    for name in (
        "runs/a1/model.keras",
        "runs/a2/model.keras",
        "runs/b1/model.keras",
        "runs/a1/extra/model.keras",
        "runs/.hidden/model.keras",
        "runs/a1.keras",
    ):
        upload(gcs_client, gcs_bucket, name, b"x")
    g = f"gs://{gcs_bucket}"
    assert store.glob(f"{g}/runs/a*/model.keras") == [
        f"{g}/runs/a1/model.keras",
        f"{g}/runs/a2/model.keras",
    ]
    assert store.glob(f"{g}/runs/?1") == [f"{g}/runs/a1", f"{g}/runs/b1"]  # prefixes match
    assert store.glob(f"{g}/runs/[b]*/*.keras") == [f"{g}/runs/b1/model.keras"]
    assert store.glob(f"{g}/runs/*.keras") == [f"{g}/runs/a1.keras"]
    assert store.glob(f"{g}/runs/.h*/model.keras") == [f"{g}/runs/.hidden/model.keras"]
    assert store.glob(f"{g}/runs/a1.keras") == [f"{g}/runs/a1.keras"]
    assert store.glob(f"{g}/runs/a1") == [f"{g}/runs/a1"]
    with pytest.raises(StorageNotFoundError):
        store.glob(f"{g}/runs/*/model.onnx")
    with pytest.raises(StorageNotFoundError):
        store.glob(f"{g}/runs/missing.keras")


def test_gcs_versions(gcs_bucket: str, gcs_client: Any) -> None:
    store = Storage()
    base = f"gs://{gcs_bucket}/served/vgg"
    assert store.list_versions(base) == []
    assert store.next_version(base) == 1
    assert store.list_versions("gs://no-such-bucket-here/served") == []
    for name in ("1/saved_model.pb", "4/a/b", "12/x", "abc/x", ".tmp-1/x", "5"):
        upload(gcs_client, gcs_bucket, f"served/vgg/{name}", b"x")
    assert store.list_versions(base) == [1, 4, 12]
    assert store.next_version(base + "/") == 13


def test_gcs_publish_versions(gcs_bucket: str, gcs_client: Any, tmp_path: Path) -> None:
    store = Storage(allowed_prefixes=[f"gs://{gcs_bucket}/served"])
    model = make_model_dir(tmp_path / "src")
    base = f"gs://{gcs_bucket}/served/vgg"
    assert store.publish_dir(str(model), base) == f"{base}/1"
    assert store.publish_dir(str(model), base) == f"{base}/2"
    assert store.list_versions(base) == [1, 2]
    expected = sorted(tree_contents(model))
    names = blob_names(gcs_client, gcs_bucket)
    assert names == sorted(
        [f"served/vgg/1/{r}" for r in expected] + [f"served/vgg/2/{r}" for r in expected]
    )
    for version in ("1", "2"):
        got = store.download(f"{base}/{version}", str(tmp_path / f"dl{version}"))
        assert tree_contents(Path(got)) == tree_contents(model)


def test_gcs_publish_existing_version_changes_nothing(
    gcs_bucket: str, gcs_client: Any, tmp_path: Path
) -> None:
    store = Storage()
    model = make_model_dir(tmp_path / "src")
    base = f"gs://{gcs_bucket}/served"
    store.publish_dir(str(model), base, version=5)
    before = {
        n: gcs_client.bucket(gcs_bucket).blob(n).download_as_bytes()
        for n in blob_names(gcs_client, gcs_bucket)
    }
    (model / "saved_model.pb").write_bytes(b"other graph")
    with pytest.raises(StorageExistsError) as info:
        store.publish_dir(str(model), base, version=5)
    assert info.value.uri == f"{base}/5"
    after = {
        n: gcs_client.bucket(gcs_bucket).blob(n).download_as_bytes()
        for n in blob_names(gcs_client, gcs_bucket)
    }
    assert after == before


def test_gcs_publish_rechecks_before_copy(
    gcs_bucket: str, gcs_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage()
    model = make_model_dir(tmp_path / "src")
    original_upload = Blob.upload_from_filename

    def racing(self: Blob, filename: str, **kw: Any) -> Any:
        upload(gcs_client, gcs_bucket, "served/1/theirs.txt", b"other writer")
        return original_upload(self, filename, **kw)

    monkeypatch.setattr(Blob, "upload_from_filename", racing)
    with pytest.raises(StorageExistsError):
        store.publish_dir(str(model), f"gs://{gcs_bucket}/served")
    assert blob_names(gcs_client, gcs_bucket) == ["served/1/theirs.txt"]


def test_gcs_saved_model_copied_last(
    gcs_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage()
    model = make_model_dir(tmp_path / "src")
    (model / "zzz.txt").write_text("sorts after saved_model.pb")
    uploads: list[str] = []
    copies: list[str] = []
    original_copy = Bucket.copy_blob
    original_upload = Blob.upload_from_filename

    def spy_copy(self: Bucket, blob: Blob, dest: Bucket, new_name: str, **kw: Any) -> Any:
        copies.append(new_name)
        return original_copy(self, blob, dest, new_name, **kw)

    def spy_upload(self: Blob, filename: str, **kw: Any) -> Any:
        uploads.append(self.name)
        return original_upload(self, filename, **kw)

    monkeypatch.setattr(Bucket, "copy_blob", spy_copy)
    monkeypatch.setattr(Blob, "upload_from_filename", spy_upload)
    store.publish_dir(str(model), f"gs://{gcs_bucket}/served")
    assert len(copies) == len(tree_contents(model)) == len(uploads)
    assert copies[-1] == "served/1/saved_model.pb"
    assert uploads[-1].endswith("/saved_model.pb")
    assert all("/.tmp-" in name for name in uploads)


@pytest.mark.parametrize("stage", ["upload", "copy"])
def test_gcs_publish_failure_leaves_nothing(
    stage: str, gcs_bucket: str, gcs_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage()
    model = make_model_dir(tmp_path / "src")
    base = f"gs://{gcs_bucket}/served"
    store.publish_dir(str(model), base)
    before = blob_names(gcs_client, gcs_bucket)
    calls: list[str] = []
    if stage == "copy":
        original_copy = Bucket.copy_blob

        def flaky_copy(self: Bucket, blob: Blob, dest: Bucket, new_name: str, **kw: Any) -> Any:
            calls.append(new_name)
            if len(calls) == 3:
                raise gexc.ServiceUnavailable("injected")
            return original_copy(self, blob, dest, new_name, **kw)

        monkeypatch.setattr(Bucket, "copy_blob", flaky_copy)
    else:
        original_upload = Blob.upload_from_filename

        def flaky_upload(self: Blob, filename: str, **kw: Any) -> Any:
            calls.append(self.name)
            if len(calls) == 3:
                raise gexc.ServiceUnavailable("injected")
            return original_upload(self, filename, **kw)

        monkeypatch.setattr(Blob, "upload_from_filename", flaky_upload)
    with pytest.raises(StorageUnreachableError):
        store.publish_dir(str(model), base)
    assert len(calls) == 3
    assert blob_names(gcs_client, gcs_bucket) == before
    assert store.list_versions(base) == [1]


def test_gcs_delete_tree(gcs_bucket: str, gcs_client: Any) -> None:
    store = Storage()
    for name in ("a/1/x", "a/1/y/z", "a/10/x", "b/x"):
        upload(gcs_client, gcs_bucket, name, b"x")
    store.delete(f"gs://{gcs_bucket}/a/1")
    assert blob_names(gcs_client, gcs_bucket) == ["a/10/x", "b/x"]
    with pytest.raises(InvalidUriError):
        store.delete(f"gs://{gcs_bucket}")


def test_gcs_missing_bucket_on_write_is_unreachable(gcs_client: Any, tmp_path: Path) -> None:
    store = Storage()
    with pytest.raises(StorageUnreachableError) as info:
        store.write_bytes("gs://no-such-bucket-here/x.bin", b"x")
    assert "bucket" in str(info.value)
    with pytest.raises(StorageUnreachableError):
        store.publish_dir(str(make_model_dir(tmp_path)), "gs://no-such-bucket-here/served")


def test_gcs_unreachable_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    store = Storage()
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError) as info:
        store.read_bytes("gs://some-bucket/model.keras")
    assert time.monotonic() - start < 20
    assert info.value.uri == "gs://some-bucket/model.keras"
    fast = Storage(gcs_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError):
        fast.list_versions("gs://some-bucket/served")
    with pytest.raises(StorageUnreachableError):
        fast.exists("gs://some-bucket/served")
    assert time.monotonic() - start < 20


def test_module_does_not_import_tensorflow() -> None:
    import subprocess

    code = "import sys, secateur.server.storage; print('tensorflow' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
