"""samsr.locations: up-front location checks (local and a real moto S3) and the shared exit codes."""
import time

import pytest

from samsr import locations as loc
from samsr.locations import LocationError


@pytest.mark.parametrize("inp,out,word", [
    ("data/in", "data/in", "is the input"), ("data/in", "data/in/sr", "inside the input"),
    ("data/in/", "./data/in//sr/", "inside the input"), ("data/in/sub", "data/in", "inside the output"),
    ("s3://b/in", "s3://b/in/", "is the input"), ("s3://b/in", "s3://b//in/sr", "inside the input"),
    ("s3://b/in/x", "s3://b/in", "inside the output"), ("s3://b", "s3://b/out", "inside the input"),
])
def test_overlapping_locations_are_refused(inp, out, word):
    with pytest.raises(LocationError, match=word):
        loc.refuse_overlap(inp, out)


@pytest.mark.parametrize("inp,out", [("data/in", "data/in-sr"), ("data/in", "data/out"), ("s3://b/in", "s3://b/in-sr"),
                                     ("s3://b/in", "s3://c/in"), ("s3://b/in", "b/in")])
def test_separate_locations_pass(inp, out):
    loc.refuse_overlap(inp, out)


def test_relative_and_absolute_forms_compare_equal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert loc.normalize("in/./a//") == str(tmp_path / "in" / "a")
    with pytest.raises(LocationError):
        loc.refuse_overlap(str(tmp_path / "in"), "in/sr")


def test_missing_local_input_and_file_output(tmp_path):
    with pytest.raises(LocationError, match="does not exist.*looked at"):
        loc.require_input(str(tmp_path / "nope"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(LocationError, match="is a file"):
        loc.require_output(str(tmp_path / "f"))
    loc.require_input(str(tmp_path))
    loc.require_output(str(tmp_path / "new"))


def test_missing_bucket_and_unreachable_endpoint(s3, monkeypatch):
    bucket = s3.bucket("loc-ok")
    loc.require_input(bucket + "/any/prefix")
    loc.require_output(bucket + "/out")
    with pytest.raises(LocationError, match="bucket 'loc-missing-xyz' does not exist.*endpoint http://127.0.0.1"):
        loc.require_output("s3://loc-missing-xyz/out")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")   # nothing listens on port 9
    t0 = time.monotonic()
    with pytest.raises(LocationError, match="cannot be reached.*127.0.0.1:9"):
        loc.require_input(bucket + "/x")
    assert time.monotonic() - t0 < 60


def test_exit_codes():
    assert loc.exit_code(done=5, failed_good=0, known_bad=2) == loc.EXIT_OK
    assert loc.exit_code(done=5, failed_good=1) == loc.EXIT_INCOMPLETE
    assert loc.exit_code(done=0, failed_good=0, known_bad=3) == loc.EXIT_INCOMPLETE


def test_timeouts_come_from_the_environment_and_bad_values_are_refused_by_name(monkeypatch):
    from samsr import timeouts

    monkeypatch.setenv("SAMSR_PREFLIGHT_TIMEOUT_S", "42.5")
    monkeypatch.setenv("SAMSR_S3_CONNECT_TIMEOUT_S", "7")
    monkeypatch.delenv("SAMSR_S3_REQUEST_TIMEOUT_S")
    assert timeouts.preflight() == 42.5 and timeouts.s3() == (7.0, timeouts.S3_REQUEST_S)
    monkeypatch.delenv("SAMSR_PREFLIGHT_TIMEOUT_S")
    assert timeouts.preflight() == timeouts.PREFLIGHT_S == 5.0
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv("SAMSR_PREFLIGHT_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match=f"SAMSR_PREFLIGHT_TIMEOUT_S='{bad}' must be a positive number"):
            timeouts.preflight()
