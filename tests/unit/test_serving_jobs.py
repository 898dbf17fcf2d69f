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


def _small_input(tmp_path) -> str:
    import numpy as np

    from volumes import write_ome_zarr

    data = np.zeros((2, 16, 16), np.uint8)
    return write_ome_zarr(tmp_path / "in.ome.zarr", data, (40.0, 5.0, 5.0), chunks=(1, 16, 16))


def test_job_slots_answer_busy_and_output_busy_then_free(tmp_path) -> None:
    import threading

    from mitoseg.serving.jobs import JobRunner, VolumeJobRequest

    src = _small_input(tmp_path)
    entered, release = threading.Event(), threading.Event()

    def load_model() -> tuple:  # holds the first job's slot until released, then fails
        entered.set()
        release.wait(10)
        raise RuntimeError("model store unreachable")

    runner = JobRunner(load_model)
    settings = VolumeJobSettings(allow=[str(tmp_path)], max_jobs=1)
    first = VolumeJobRequest(input_uri=src, output_uri=str(tmp_path / "a.ome.zarr"))
    failures: list[BaseException] = []

    def run_first() -> None:
        try:
            runner.run(first, settings)
        except BaseException as exc:
            failures.append(exc)

    worker = threading.Thread(target=run_first)
    worker.start()
    assert entered.wait(10)
    assert runner.running() == 1
    other = VolumeJobRequest(input_uri=src, output_uri=str(tmp_path / "b.ome.zarr"))
    with pytest.raises(JobError) as busy:
        runner.run(other, settings)
    assert (busy.value.status, busy.value.code) == (429, "busy")
    assert busy.value.message == (
        "1 volume job(s) running, the limit is 1 (volume_max_jobs); retry later"
    )
    two = VolumeJobSettings(allow=[str(tmp_path)], max_jobs=2)
    with pytest.raises(JobError) as same:  # a free slot, but that output is being written
        runner.run(first, two)
    assert (same.value.status, same.value.code) == (409, "output_busy")
    assert str(tmp_path / "a.ome.zarr") in same.value.message
    release.set()
    worker.join(10)
    assert [str(e) for e in failures] == ["model store unreachable"]
    assert runner.running() == 0  # a failed job frees its slot


def _asgi_submit(guard, body: bytes) -> tuple[int, dict[bytes, bytes], bytes, list]:
    import anyio

    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/segment_volume/submit", "method": "POST"}
    anyio.run(guard, scope, receive, send)
    start = next((m for m in sent if m["type"] == "http.response.start"), {"status": 0})
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start.get("headers", [])), payload, sent


@pytest.mark.parametrize(("running", "status"), [(1, 429), (0, 200)], ids=["busy", "free"])
def test_submit_guard_answers_busy_before_the_task_is_queued(
    tmp_path, running: int, status: int
) -> None:
    import json

    from mitoseg.serving.jobs import RETRY_AFTER_S, VolumeSubmitGuard

    src = _small_input(tmp_path)
    reached: list[bytes] = []

    async def app(scope, receive, send) -> None:  # the task endpoint behind the guard
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"queued"})

    settings = VolumeJobSettings(allow=[str(tmp_path)], max_jobs=1)
    guard = VolumeSubmitGuard(app, "/segment_volume", lambda: settings, busy=lambda: running)
    body = json.dumps({"input_uri": src, "output_uri": str(tmp_path / "o.ome.zarr")}).encode()
    got, headers, payload, _ = _asgi_submit(guard, body)
    assert got == status
    if status == 429:
        assert reached == []  # never queued
        assert headers[b"retry-after"] == str(RETRY_AFTER_S).encode()
        assert json.loads(payload) == {
            "error": "busy",
            "message": "1 volume job(s) running, the limit is 1 (volume_max_jobs); retry later",
            "status": 429,
        }
    else:
        assert reached == [body] and payload == b"queued"  # the body replayed to the task
