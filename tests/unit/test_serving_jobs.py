"""Volume job settings and URI checks of the endpoint (pure; the endpoint itself is
tested against a real ``mitoseg serve`` in tests/integration/test_service.py)."""

from __future__ import annotations

import sys

import pytest

from mitoseg.serving.jobs import JobError, VolumeJobSettings, check_uri, resolve_job_settings


def test_settings_from_arguments_over_environment() -> None:
    env = {"MITOSEG_VOLUME_ALLOW": "/data, s3://lab/", "MITOSEG_VOLUME_WORKERS": "3"}
    got = resolve_job_settings({"volume_workers": "2", "model_tag": "x"}, env)
    assert got == VolumeJobSettings(allow=["/data", "s3://lab"], workers=2)
    dotted = resolve_job_settings({"volume_allow": "/data/x/../y/"}, {})
    assert dotted.allow == ["/data/y"]
    assert resolve_job_settings({}, {"MITOSEG_VOLUME_MAX_VOXELS": ""}) == VolumeJobSettings()


@pytest.mark.parametrize(
    ("arguments", "env", "message"),
    [
        ({"volume_workers": "0"}, {}, "volume_workers: Input should be greater than or equal to 1"),
        ({}, {"MITOSEG_VOLUME_MAX_VOXELS": "-5"}, "MITOSEG_VOLUME_MAX_VOXELS: Input should be "
         "greater than 0"),
        ({}, {"MITOSEG_VOLUME_MAX_JOBS": "many"}, "MITOSEG_VOLUME_MAX_JOBS: Input should be a "
         "valid integer"),
        ({"volume_allow": "data/"}, {}, "volume_allow: allow-list prefix data/: a local path "
         "must be absolute"),
    ],
    ids=["workers-0", "max-voxels-negative", "max-jobs-not-int", "allow-relative"],
)  # fmt: skip
def test_bad_settings_name_their_source(arguments: dict, env: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        resolve_job_settings(arguments, env)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("uri", "allow", "expected"),
    [
        ("/data/a/../b.zarr", [], "/data/b.zarr"),
        ("s3://lab/v.zarr/", ["s3://lab"], "s3://lab/v.zarr"),
        ("/data/v.zarr", ["/data/"], "/data/v.zarr"),
        ("/data", ["/data"], "/data"),
    ],
)
def test_accepted_uris_are_normalised(uri: str, allow: list[str], expected: str) -> None:
    assert check_uri(uri, "input_uri", allow) == expected


@pytest.mark.parametrize(
    ("uri", "allow", "status", "message"),
    [
        ("", [], 400, "input_uri: expected a non-empty URI, got ''"),
        (None, [], 400, "input_uri: expected a non-empty URI, got None"),
        ("v.zarr", [], 400, "input_uri v.zarr: a local path must be absolute"),
        ("file:///v.zarr", [], 400, "input_uri file:///v.zarr: only s3:// URIs and absolute"),
        ("s3:///v.zarr", [], 400, "input_uri s3:///v.zarr: expected s3://bucket/key"),
        ("s3://lab/../v.zarr", [], 400, "input_uri s3://lab/../v.zarr: expected s3://bucket/key"),
        ("/database/v.zarr", ["/data"], 403, "input_uri /database/v.zarr: not under an allowed"),
        ("/data/../etc/v.zarr", ["/data"], 403, "input_uri /data/../etc/v.zarr: not under an"),
        ("s3://labs/v.zarr", ["s3://lab/"], 403, "input_uri s3://labs/v.zarr: not under an"),
        ("/data/v.zarr", ["s3://lab/"], 403, "input_uri /data/v.zarr: not under an allowed"),
    ],
    ids=["empty", "none", "relative", "file-scheme", "s3-no-bucket", "s3-dot-dot",
         "prefix-is-not-a-folder", "dot-dot-escapes", "other-bucket", "local-vs-s3"],
)  # fmt: skip
def test_refused_uris_name_themselves(uri: object, allow: list[str], status: int, message: str
                                      ) -> None:  # fmt: skip
    with pytest.raises(JobError) as exc:
        check_uri(uri, "input_uri", allow)
    assert exc.value.status == status
    assert message in exc.value.message


@pytest.mark.parametrize("module", ["zarr", "distributed"])
def test_a_server_without_the_volume_stack_says_so(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mitoseg.serving.jobs import VolumeJobRequest, check_request, job_progress

    monkeypatch.setitem(sys.modules, module, None)  # how Python marks a module absent
    message = f"this server has no {module}"
    request = VolumeJobRequest(input_uri="/data/in.zarr", output_uri="/data/out.zarr")
    for call in (lambda: check_request(request, VolumeJobSettings()),
                 lambda: job_progress("/data/out.zarr", VolumeJobSettings())):  # fmt: skip
        with pytest.raises(JobError) as exc:
            call()
        assert (exc.value.status, exc.value.code) == (501, "not_installed")
        assert message in exc.value.message
