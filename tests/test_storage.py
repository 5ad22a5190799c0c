"""samsr.storage against a real moto S3 server (session fixture `s3`) and a local temp dir."""
from __future__ import annotations

import os

import pytest
from botocore.exceptions import ClientError

from samsr import storage
from samsr.storage import ObjectNotFound, StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    s3 = request.getfixturevalue("s3")
    return storage.join(s3.bucket("roots"), f"run-{request.node.name.split('[')[0]}")


def test_write_read_exists_size_delete(root):
    uri = storage.join(root, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00\x01hello")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"\x00\x01hello"
    assert storage.size(uri) == 7
    storage.write_text(storage.join(root, "t.json"), '{"ü": 1}')
    assert storage.read_text(storage.join(root, "t.json")) == '{"ü": 1}'
    storage.write_bytes(uri, b"new")            # overwrite
    assert storage.read_bytes(uri) == b"new"
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)                         # already gone: no error
    with pytest.raises(ObjectNotFound, match="b.bin"):
        storage.read_bytes(uri)
    with pytest.raises(ObjectNotFound, match="b.bin"):
        storage.size(uri)


def test_list_files_recursive_sorted_suffixes(root):
    names = ["a.PNG", "b.png", "c.jpg", "sub/d.Png", "sub/deeper/e.txt", "sub/deeper/f.jpeg"]
    for n in reversed(names):
        storage.write_bytes(storage.join(root, n), n.encode())
    storage.write_bytes(root.rstrip("/") + "-sibling/x.png", b"x")   # same string prefix, other dir
    everything = storage.list_files(root)
    assert everything == sorted(storage.join(root, n) for n in names)
    assert storage.list_files(root, [".png"]) == [storage.join(root, n) for n in ("a.PNG", "b.png", "sub/d.Png")]
    assert storage.list_files(root, [".JPG", ".jpeg"]) == [storage.join(root, n) for n in ("c.jpg", "sub/deeper/f.jpeg")]
    assert storage.list_files(storage.join(root, "sub")) == [storage.join(root, n) for n in names[3:]]
    assert storage.list_files(storage.join(root, "nothing-here")) == []
    assert storage.list_files(storage.join(root, "b.png")) == [storage.join(root, "b.png")]
    assert [storage.relative_key(root, u) for u in everything] == sorted(names)


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "d" / "out.json"
    storage.write_text(str(target), "old")
    for i in range(3):
        storage.write_bytes(str(target), b"v%d" % i)
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), 12345)   # fails mid-write
    assert target.read_bytes() == b"v2"           # old content intact
    assert os.listdir(target.parent) == ["out.json"]


LONG_NAME = "n" * 246 + ".png"     # 250 bytes: near the 255-byte limit of a file name on ext4, xfs, apfs


def test_local_names_near_the_file_system_limit_can_be_written(tmp_path):
    target = tmp_path / "d" / LONG_NAME
    storage.write_bytes(str(target), b"long")         # the temp name must not be longer than the name itself
    assert target.read_bytes() == b"long"
    storage.write_bytes(str(target), b"again")        # and replaced atomically
    assert target.read_bytes() == b"again" and os.listdir(target.parent) == [LONG_NAME]
    # a temp file left by a killed writer is hidden and never listed as an output
    (target.parent / ".0123456789ab.samsr-tmp").write_bytes(b"partial")
    assert storage.list_files(str(tmp_path)) == [str(target)]


def test_fetch_to_local_of_an_object_with_a_long_name(s3, tmp_path):
    uri = storage.join(s3.bucket("weights"), "long", LONG_NAME)
    storage.write_bytes(uri, b"w" * 100)
    got = storage.fetch_to_local(uri, tmp_path / "cache")
    assert got.name == LONG_NAME and got.read_bytes() == b"w" * 100
    assert os.listdir(got.parent) == [LONG_NAME]


def test_missing_bucket_and_object_errors_name_uri_and_endpoint(s3):
    uri = storage.join(s3.bucket("errs"), "nope", "x.png")
    with pytest.raises(ObjectNotFound) as info:
        storage.read_bytes(uri)
    assert uri in str(info.value) and s3.url in str(info.value)
    assert storage.list_files("s3://no-such-bucket-xyz/p") == []
    assert not storage.exists("s3://no-such-bucket-xyz/p/q")
    with pytest.raises(StorageError, match="no bucket"):
        storage.read_bytes("s3:///key")


def test_fetch_to_local_downloads_once(s3, tmp_path):
    uri = storage.join(s3.bucket("weights"), "sam", "sam_vit_b.pth")
    storage.write_bytes(uri, b"weights" * 1000)
    cache = tmp_path / "cache"
    first = storage.fetch_to_local(uri, cache)
    assert first.name == "sam_vit_b.pth" and first.read_bytes() == b"weights" * 1000
    storage.delete(uri)                           # a second call must not touch S3
    assert storage.fetch_to_local(uri, cache) == first
    assert [p.name for p in first.parent.iterdir()] == ["sam_vit_b.pth"]
    with pytest.raises(ObjectNotFound) as info:
        storage.fetch_to_local(storage.join(s3.bucket("weights"), "missing.pth"), cache)
    assert "s3://weights/missing.pth" in str(info.value) and s3.url in str(info.value)
    assert not any(p.name.endswith(".samsr-tmp") for p in cache.rglob("*"))


def test_fetch_to_local_local_paths(tmp_path):
    f = tmp_path / "ckpt.pth"
    f.write_bytes(b"x")
    assert storage.fetch_to_local(str(f)) == f
    with pytest.raises(ObjectNotFound, match=str(tmp_path / "missing.pth")):
        storage.fetch_to_local(str(tmp_path / "missing.pth"))


def test_pyarrow_filesystem_sees_the_same_objects(s3, tmp_path):
    uri = storage.join(s3.bucket("arrow"), "x", "y.bin")
    storage.write_bytes(uri, b"arrow-bytes")
    fs, path = storage.filesystem(uri)
    assert path == "arrow/x/y.bin"
    with fs.open_input_stream(path) as f:
        assert f.read() == b"arrow-bytes"
    fs, path = storage.filesystem(str(tmp_path / "rel"))
    assert path == str(tmp_path / "rel")


def test_endpoint_and_region_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://a:1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert storage.endpoint_url() == "http://a:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://b:2")
    assert storage.endpoint_url() == "http://b:2"
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert storage.region() == "us-east-1"
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert storage.region() == "eu-west-3"


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../../b", "a/../b", "a\\b", "", "a\x00b", "a\nb", "./", "//"])
def test_safe_key_rejects(bad):
    with pytest.raises(StorageError, match="unsafe key"):
        storage.safe_key(bad)


@pytest.mark.parametrize("key,expected", [("a/b.png", "a/b.png"), ("./a//b.png", "a/b.png"),
                                          ("a/./b/", "a/b"), ("x..y.png", "x..y.png")])
def test_safe_key_normalises(key, expected):
    assert storage.safe_key(key) == expected


def test_join_and_relative_key(tmp_path):
    assert storage.join("s3://b/in/", "x", "/y.png") == "s3://b/in/x/y.png"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join(str(tmp_path), "/etc", "p") == str(tmp_path / "etc" / "p")
    assert storage.relative_key("s3://b/in", "s3://b/in/x/y.png") == "x/y.png"
    assert storage.relative_key(str(tmp_path), str(tmp_path / "x" / "y.png")) == "x/y.png"
    with pytest.raises(StorageError, match="not under"):
        storage.relative_key("s3://b/in", "s3://b/input/y.png")
    with pytest.raises(StorageError, match="not under"):
        storage.relative_key(str(tmp_path), "s3://b/in/y.png")
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/s3://x")


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_with_retries_retries_transient_then_succeeds():
    calls, sleeps = [], []
    errors = [_client_error("SlowDown", 503), ConnectionResetError("reset by peer")]

    def flaky():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "ok"

    assert storage.with_retries(flaky, attempts=5, base_delay=0.5, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0     # full jitter under 0.5·2^i


@pytest.mark.parametrize("exc", [_client_error("NoSuchKey", 404), _client_error("404", 404),
                                 FileNotFoundError("x"), ValueError("bug")])
def test_with_retries_does_not_retry_missing_or_bugs(exc):
    calls = []

    def fails():
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)):
        storage.with_retries(fails, attempts=5, sleep=lambda s: None)
    assert len(calls) == 1


def test_with_retries_gives_up_after_attempts():
    calls = []

    def always_throttled():
        calls.append(1)
        raise _client_error("Throttling", 400)

    with pytest.raises(ClientError):
        storage.with_retries(always_throttled, attempts=4, sleep=lambda s: None)
    assert len(calls) == 4
