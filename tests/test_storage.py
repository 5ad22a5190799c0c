"""samsr.storage against a real moto S3 server (session fixture `s3`) and a local temp dir."""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import time

import pytest

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


MB = 1 << 20


def _blob(n: int, seed: int = 0) -> bytes:
    """`n` deterministic, incompressible-looking bytes."""
    out, i = bytearray(), 0
    while len(out) < n:
        out += hashlib.sha256(b"%d-%d" % (seed, i)).digest() * 1024
        i += 1
    return bytes(out[:n])


@pytest.fixture
def spool_dir(tmp_path, monkeypatch):
    """Where open_write spools S3 streams (TMPDIR): a fresh folder, to check it is left empty."""
    folder = tmp_path / "spool"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_open_write_and_open_read_round_trip(root, spool_dir):
    data = _blob(3 * MB + 17)
    uri = storage.join(root, "stream", "obj.bin")
    with storage.open_write(uri) as f:
        for i in range(0, len(data), 1_000_003):
            f.write(data[i:i + 1_000_003])
    assert storage.size(uri) == len(data)
    with storage.open_read(uri) as f:
        assert f.read(10) == data[:10]
        f.seek(2 * MB)
        assert f.read(5) == data[2 * MB:2 * MB + 5]
        f.seek(0)
        got = b"".join(iter(lambda: f.read(MB), b""))
    assert got == data and storage.read_bytes(uri) == data
    dest = storage.copy_to_local(uri, spool_dir.parent / "copy" / "obj.bin")
    assert dest.read_bytes() == data and os.listdir(dest.parent) == ["obj.bin"]
    assert os.listdir(spool_dir) == []


def test_large_s3_writes_are_multipart_and_small_ones_one_put(s3, spool_dir):
    client, bucket = s3.client(), s3.bucket("multipart")
    big = _blob(18 * MB, seed=1)                      # pyarrow's part is 10 MB: two parts
    storage.write_bytes(f"{bucket}/bytes.bin", big)
    with storage.open_write(f"{bucket}/stream.bin") as f:
        for i in range(0, len(big), 3 * MB):
            f.write(big[i:i + 3 * MB])
    with storage.open_write(f"{bucket}/small.bin") as f:
        f.write(b"small")
    etags = {k: client.head_object(Bucket="multipart", Key=k)["ETag"].strip('"')
             for k in ("bytes.bin", "stream.bin", "small.bin")}
    assert etags["bytes.bin"].endswith("-2") and etags["stream.bin"].endswith("-2")
    assert "-" not in etags["small.bin"]              # one PUT, no multipart upload
    assert storage.read_bytes(f"{bucket}/bytes.bin") == big
    assert storage.read_bytes(f"{bucket}/stream.bin") == big
    assert client.list_multipart_uploads(Bucket="multipart").get("Uploads", []) == []
    assert os.listdir(spool_dir) == []


def test_open_read_fetches_ranges_as_it_goes(s3):
    uri = storage.join(s3.bucket("ranges"), "big.bin")
    data = _blob(24 * MB, seed=2)
    storage.write_bytes(uri, data)
    with storage.open_read(uri) as f:
        assert f.read(MB) == data[:MB]
        s3.client().delete_object(Bucket="ranges", Key="big.bin")
        with pytest.raises(OSError):     # the rest was never fetched: the next range finds no object
            f.read(MB)


@pytest.mark.parametrize("size", [100, 12 * MB])      # in one PUT / spilled to a spool file
def test_failed_open_write_leaves_no_object_and_keeps_the_old_one(root, spool_dir, size):
    fresh, kept = storage.join(root, "abort", "fresh.bin"), storage.join(root, "abort", "kept.bin")
    storage.write_bytes(kept, b"old")
    for uri in (fresh, kept):
        with pytest.raises(RuntimeError, match="producer died"):
            with storage.open_write(uri) as f:
                f.write(_blob(size, seed=3))
                raise RuntimeError("producer died")
    assert not storage.exists(fresh) and storage.read_bytes(kept) == b"old"
    assert storage.list_files(storage.join(root, "abort")) == [kept]
    assert os.listdir(spool_dir) == []
    if not storage.is_s3(root):
        assert sorted(os.listdir(os.path.dirname(kept))) == ["kept.bin"]


def test_write_to_a_missing_bucket_and_reads_of_missing_objects(s3, tmp_path):
    uri = "s3://no-such-bucket-xyz/a/b.bin"
    with pytest.raises(ObjectNotFound) as info:
        storage.write_bytes(uri, b"x")
    assert uri in str(info.value) and s3.url in str(info.value)
    with pytest.raises(ObjectNotFound, match="no-such-bucket-xyz"):
        with storage.open_write(uri) as f:
            f.write(b"x")
    missing = storage.join(s3.bucket("errs"), "nope.bin")
    for call in (storage.open_read, lambda u: storage.copy_to_local(u, tmp_path / "x.bin")):
        with pytest.raises(ObjectNotFound) as info:
            call(missing)
        assert missing in str(info.value) and s3.url in str(info.value)
    assert not (tmp_path / "x.bin").exists()
    with pytest.raises(StorageError, match="names a bucket"):
        storage.write_bytes(s3.bucket("errs"), b"x")


def test_dead_endpoint_fails_in_seconds_naming_uri_and_endpoint(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")   # nothing listens on port 9
    uri = "s3://any-bucket/x.bin"
    for call in (storage.read_bytes, storage.exists, lambda u: storage.write_bytes(u, b"x")):
        t0 = time.monotonic()
        with pytest.raises(StorageError) as info:
            call(uri)
        assert time.monotonic() - t0 < 60
        assert not isinstance(info.value, ObjectNotFound)
        assert uri in str(info.value) and "http://127.0.0.1:9" in str(info.value)


def test_one_filesystem_per_configuration(s3, monkeypatch):
    fs_a, path = storage.filesystem(storage.join(s3.bucket("shared"), "a"))
    fs_b, _ = storage.filesystem("s3://other/b")
    assert fs_a is fs_b and path == "shared/a"             # one cached instance for our I/O and Ray Data
    with fs_a.open_output_stream("shared/from-arrow.bin") as f:
        f.write(b"arrow")
    assert storage.read_bytes("s3://shared/from-arrow.bin") == b"arrow"
    blob = pickle.dumps(fs_a)                               # what Ray ships to its workers
    assert b"testing" not in blob                           # no credentials: each process uses its own chain
    with pickle.loads(blob).open_input_file("shared/from-arrow.bin") as f:
        assert f.read() == b"arrow"                         # the endpoint travels
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    fs_c, _ = storage.filesystem("s3://shared/a")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    fs_d, _ = storage.filesystem("s3://shared/a")
    assert len({id(fs_a), id(fs_c), id(fs_d)}) == 3         # other credentials or retries: other instances
