"""The CVAT test server, exercised through the real cvat-sdk over real HTTP.

Every JSON answer is validated against CVAT 2.73's own OpenAPI schema (strictly: no
fields the schema does not declare) and, where a response was captured from a real
server, compared with the capture's shape and error bodies.
"""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import urllib3
from cvat_sdk import Client, make_client, models
from cvat_sdk.api_client import ApiClient, Configuration
from cvat_sdk.api_client.exceptions import ApiException, ApiValueError
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from PIL import Image

from tests.cvat_server import CvatTestServer, SchemaViolation, sample_frames, sample_jpegs
from tests.cvat_server.media import pil_frame, video_chunk
from tests.cvat_server.pytest_fixtures import Seeded, seed_capture_setup
from tests.cvat_server.schema import check, check_component

REPO = Path(__file__).resolve().parents[1]
CVAT_ASSETS = REPO / "tests" / "assets" / "cvat-2.73"
CAPTURES = CVAT_ASSETS / "responses"


def raw(call: Any, *args: Any, **kwargs: Any) -> tuple[int, Any, urllib3.HTTPResponse]:
    """Call an SDK endpoint without parsing or status checks: (status, JSON body, response)."""
    _, response = call(*args, _parse_response=False, _check_status=False, **kwargs)
    data = response.data
    body = json.loads(data) if data and "json" in response.headers.get("Content-Type", "") else data
    return response.status, body, response


def ok(operation_id: str, call: Any, *args: Any, status: int = 200, **kwargs: Any) -> Any:
    """Call an SDK endpoint, expect `status`, validate the body against the schema."""
    got, body, _ = raw(call, *args, **kwargs)
    assert got == status, body
    return check(operation_id, status, body)


def capture(name: str) -> dict[str, Any]:
    """A response captured from real CVAT 2.73."""
    return json.loads((CAPTURES / f"{name}.json").read_text())


def same_shape(ours: Any, theirs: Any, where: str = "$") -> None:
    """Same keys at every level of dicts (first item of lists), same JSON types."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), where
        assert set(ours) == set(theirs), (where, set(ours) ^ set(theirs))
        for key in theirs:
            if theirs[key] is not None and ours[key] is not None:
                same_shape(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list), where
        if theirs and ours:
            same_shape(ours[0], theirs[0], f"{where}[0]")
    else:
        assert isinstance(ours, type(theirs)) or {type(ours), type(theirs)} <= {int, float}, where


CAPTURED_OPERATIONS = {
    "comments_list_by_issue": "comments_list",
    "issue_create": "issues_create",
    "issue_patch_resolved": "issues_partial_update",
    "issues_list_by_job": "issues_list",
    "job_annotations_after_create": "jobs_retrieve_annotations",
    "job_annotations_empty": "jobs_retrieve_annotations",
    "job_data_meta": "jobs_retrieve_data_meta",
    "job_patch_stage_state_assignee": "jobs_partial_update",
    "job_retrieve": "jobs_retrieve",
    "jobs_list_by_task": "jobs_list",
    "jobs_list_filter_stage_state": "jobs_list",
    "label_patch_add_attribute": "labels_partial_update",
    "labels_list_by_project": "labels_list",
    "project_patch_labels_add_attribute": "projects_partial_update",
    "project_retrieve": "projects_retrieve",
    "server_about": "server_retrieve_about",
    "task_data_meta": "tasks_retrieve_data_meta",
    "task_retrieve": "tasks_retrieve",
    "tasks_list_by_project": "tasks_list",
    "users_list_search": "users_list",
    "users_self": "users_retrieve_self",
    "video_job_data_meta": "jobs_retrieve_data_meta",
}


@pytest.mark.parametrize("name", sorted(CAPTURED_OPERATIONS))
def test_schema_check_accepts_real_cvat_captures(name: str) -> None:
    """The strict schema check itself passes what real CVAT 2.73 answered."""
    captured = capture(name)
    check(CAPTURED_OPERATIONS[name], captured["status"], captured["body"])


def test_schema_check_rejects_what_cvat_would_not_answer() -> None:
    about = capture("server_about")["body"]
    with pytest.raises(SchemaViolation):
        check("server_retrieve_about", 200, {k: v for k, v in about.items() if k != "version"})
    with pytest.raises(SchemaViolation):
        check("server_retrieve_about", 200, {**about, "build": "nightly"})  # undeclared field
    with pytest.raises(SchemaViolation):  # the annotation writes answer LabeledData
        check("jobs_partial_update_annotations", 200, {"version": 0, "tags": [{"frame": 0}]})


def test_server_records_wrong_shaped_answers_and_fails_on_exit() -> None:
    """A status fault lets the server send answers CVAT would not: each is recorded with
    method, path, status and the validator's message, and leaving the server raises."""
    about = capture("server_about")["body"]
    server = CvatTestServer()
    with pytest.raises(SchemaViolation) as failed, server:
        get = _plain(server, None)
        assert get("/api/server/about").status == 200 and server.answer_violations == []
        server.fail("/api/server/about", 200, body={"name": about["name"]})
        server.fail("/api/server/about", 201, body=about)
        assert [get("/api/server/about").status for _ in range(3)] == [200, 201, 200]
        found = server.answer_violations
        assert [(v["kind"], v["method"], v["path"], v["status"]) for v in found] == [
            ("answer_schema", "GET", "/api/server/about", 200),
            ("answer_schema", "GET", "/api/server/about", 201),
        ]
        assert "'description' is a required property" in found[0]["message"]
        assert "declares no 201 answer" in found[1]["message"]
        assert [v["kind"] for v in server.violations] == ["answer_schema"] * 2
        server.clear_violations()  # does not hide them from the check on exit
    assert "2 answer(s)" in str(failed.value) and "GET /api/server/about -> 201" in str(failed.value)
    # error answers the schema does not declare only need to be JSON; non-JSON ones are skipped
    with CvatTestServer() as server:
        server.fail("/api/server/about", 418, body=["short and stout"])
        assert _plain(server, None)("/api/server/about").status == 418
        assert _plain(server, None)("/api/nothing").status == 404
    with CvatTestServer(check_answers=False) as server:
        server.fail("/api/server/about", 200, body={})
        assert _plain(server, None)("/api/server/about").status == 200
        assert server.answer_violations == []


# --------------------------------------------------------------------- fixtures
@pytest.fixture
def seeded() -> Iterator[Seeded]:
    with CvatTestServer() as server:
        yield seed_capture_setup(server)


@pytest.fixture
def client(seeded: Seeded) -> Iterator[Client]:
    with make_client(seeded.server.url, credentials=(seeded.username, seeded.password)) as c:
        yield c


def ids(seeded: Seeded) -> dict[str, int]:
    """Ids of the capture setup's labels and attribute specs, by name."""
    out = {}
    for label in seeded.server.labels(seeded.project_id):
        out[label["name"]] = label["id"]
        for attr in label["attributes"]:
            out[f"{label['name']}.{attr['name']}"] = attr["id"]
    return out


def tag_request(frame: int, label_id: int, **kwargs: Any) -> models.LabeledImageRequest:
    return models.LabeledImageRequest(frame=frame, label_id=label_id, source="auto", **kwargs)


# ------------------------------------------------------------------------- auth
def test_about_and_server_version(client: Client) -> None:
    body = ok("server_retrieve_about", client.api_client.server_api.retrieve_about)
    same_shape(body, capture("server_about")["body"])
    assert str(client.get_server_version()) == "2.73.0"


def test_password_login_session_and_logout(seeded: Seeded) -> None:
    with Client(seeded.server.url) as c:
        status, body, response = raw(
            c.api_client.auth_api.create_login,
            models.LoginSerializerExRequest(username=seeded.username, password=seeded.password),
        )
        assert status == 200
        check("auth_create_login", 200, body)
        cookies = response.headers.getlist("Set-Cookie")
        assert sorted(c.split("=")[0] for c in cookies) == ["csrftoken", "sessionid"]
        # the SDK's own login path asserts that both cookies are set
        c.login((seeded.username, seeded.password))
        me = ok("users_retrieve_self", c.api_client.users_api.retrieve_self)
        same_shape(me, capture("users_self")["body"])
        # a write over the session needs the CSRF header, which the SDK sends
        ok(
            "jobs_partial_update",
            c.api_client.jobs_api.partial_update,
            seeded.job_ids[0],
            patched_job_write_request=models.PatchedJobWriteRequest(state="in progress"),
        )
        ok("auth_create_logout", c.api_client.auth_api.create_logout)
        c.logout()
        status, body, _ = raw(c.api_client.users_api.retrieve_self)
        assert (status, body) == (401, {"detail": "Authentication credentials were not provided."})


def test_wrong_password(seeded: Seeded) -> None:
    # Basic auth with a wrong password: the captured 401.
    config = Configuration(host=seeded.server.url, username=seeded.username, password="nope")
    with ApiClient(config) as api:
        status, body, _ = raw(api.users_api.retrieve_self)
    wanted = capture("error_wrong_password")
    assert (status, body) == (wanted["status"], wanted["body"])
    # POST /api/auth/login with a wrong password: dj-rest-auth's 400.
    with Client(seeded.server.url) as c, pytest.raises(ApiException) as err:
        c.login((seeded.username, "nope"))
    assert err.value.status == 400
    assert json.loads(err.value.body) == {"non_field_errors": ["Unable to log in with provided credentials."]}


def test_access_token_legacy_key_and_revocation(seeded: Seeded) -> None:
    server = seeded.server
    with make_client(server.url, access_token=seeded.token) as c:
        assert c.users.retrieve_current_user().username == seeded.username
        server.revoke_token(seeded.token)
        status, body, _ = raw(c.api_client.users_api.retrieve_self)
        assert (status, body) == (401, {"detail": "Invalid token."})
    with Client(server.url) as c:
        key = ok(
            "auth_create_login",
            c.api_client.auth_api.create_login,
            models.LoginSerializerExRequest(username=seeded.username, password=seeded.password),
        )["key"]
    config = Configuration(host=server.url, api_key={"tokenAuth": key}, api_key_prefix={"tokenAuth": "Token"})
    with ApiClient(config) as api:
        assert raw(api.users_api.retrieve_self)[0] == 200
        server.revoke_token(key)
        assert raw(api.users_api.retrieve_self)[:2] == (401, {"detail": "Invalid token."})


# ------------------------------------------------------------------------ users
def test_users_list_search_and_pagination(seeded: Seeded, client: Client) -> None:
    for n in range(3):
        seeded.server.add_user(f"annotator{n}", "pw")
    body = ok("users_list", client.api_client.users_api.list, search="admin")
    same_shape(body, capture("users_list_search")["body"])
    assert [u["username"] for u in body["results"]] == ["admin"]
    body = ok("users_list", client.api_client.users_api.list, username="annotator1")
    assert [u["username"] for u in body["results"]] == ["annotator1"]
    page = ok("users_list", client.api_client.users_api.list, page_size=2)
    assert page["count"] == 4 and len(page["results"]) == 2 and "page=2" in page["next"]
    everyone = client.users.list()
    assert sorted(u.username for u in everyone) == [
        "admin",
        "annotator0",
        "annotator1",
        "annotator2",
    ]
    annotator = body["results"][0]["id"]
    body = ok("users_retrieve", client.api_client.users_api.retrieve, annotator)
    assert body["username"] == "annotator1" and body["groups"] == ["user"]
    with make_client(seeded.server.url, credentials=("annotator0", "pw")) as c:
        body = ok("users_list", c.api_client.users_api.list)
        assert [u["username"] for u in body["results"]] == ["annotator0"]
        assert raw(c.api_client.users_api.retrieve, 1)[0] == 403


# ------------------------------------------------------------ projects & labels
def test_projects_retrieve_list_and_errors(seeded: Seeded, client: Client) -> None:
    api = client.api_client.projects_api
    body = ok("projects_retrieve", api.retrieve, seeded.project_id)
    same_shape(body, capture("project_retrieve")["body"])
    assert body["tasks"]["count"] == 1
    listed = ok("projects_list", api.list)
    assert [p["id"] for p in listed["results"]] == [seeded.project_id]
    status, body, _ = raw(api.retrieve, 999999)
    wanted = capture("error_not_found_project")
    assert (status, body) == (wanted["status"], wanted["body"])
    assert [p.id for p in client.projects.list()] == [seeded.project_id]


def test_project_patch_adds_attribute_keeping_existing(seeded: Seeded, client: Client) -> None:
    label_ids = ids(seeded)
    confidence = models.AttributeRequest(
        name="confidence",
        mutable=True,
        input_type="number",
        default_value="0",
        values=["0", "100", "1"],
    )
    request = models.PatchedProjectWriteRequest(
        labels=[
            models.PatchedLabelRequest(id=label_ids["car"], name="car", attributes=[confidence]),
            models.PatchedLabelRequest(id=label_ids["cat"], name="cat", attributes=[confidence]),
        ]
    )
    body = ok(
        "projects_partial_update",
        client.api_client.projects_api.partial_update,
        seeded.project_id,
        patched_project_write_request=request,
    )
    same_shape(body, capture("project_patch_labels_add_attribute")["body"])
    labels = {lb["name"]: lb for lb in seeded.server.labels(seeded.project_id)}
    assert [a["name"] for a in labels["car"]["attributes"]] == ["confidence"]
    # re-adding an attribute by name updates it in place: cat keeps its three attributes
    assert [a["name"] for a in labels["cat"]["attributes"]] == [
        "confidence",
        "model",
        "needs_review",
    ]
    assert labels["cat"]["attributes"][0]["id"] == label_ids["cat.confidence"]


def test_label_patch_adds_attribute_and_label_lists(seeded: Seeded, client: Client) -> None:
    api = client.api_client.labels_api
    label_ids = ids(seeded)
    request = models.PatchedLabelRequest(
        attributes=[
            models.AttributeRequest(
                name="confidence",
                mutable=True,
                input_type="number",
                default_value="0",
                values=["0", "100", "1"],
            )
        ]
    )
    body = ok("labels_partial_update", api.partial_update, label_ids["dog"], patched_label_request=request)
    same_shape(body, capture("label_patch_add_attribute")["body"])
    assert [a["name"] for a in body["attributes"]] == ["confidence"]
    body = ok("labels_retrieve", api.retrieve, label_ids["cat"])
    assert len(body["attributes"]) == 3
    by_project = ok("labels_list", api.list, project_id=seeded.project_id)
    same_shape(by_project, capture("labels_list_by_project")["body"])
    assert [lb["name"] for lb in by_project["results"]] == ["cat", "dog", "car"]
    by_task = ok("labels_list", api.list, task_id=seeded.task_id)
    by_job = ok("labels_list", api.list, job_id=seeded.job_ids[0])
    assert by_task["results"] == by_job["results"] == by_project["results"]
    assert raw(api.list, task_id=seeded.task_id, job_id=seeded.job_ids[0])[0] == 400
    assert [lb.name for lb in client.tasks.retrieve(seeded.task_id).get_labels()] == [
        "cat",
        "dog",
        "car",
    ]


# ------------------------------------------------------------------- tasks/jobs
def test_tasks_list_retrieve_and_meta(seeded: Seeded, client: Client) -> None:
    api = client.api_client.tasks_api
    listed = ok("tasks_list", api.list, project_id=seeded.project_id)
    same_shape(listed, capture("tasks_list_by_project")["body"])
    assert ok("tasks_list", api.list, project_id=999)["count"] == 0
    task = ok("tasks_retrieve", api.retrieve, seeded.task_id)
    same_shape(task, capture("task_retrieve")["body"])
    assert (task["size"], task["segment_size"], task["jobs"]["count"]) == (5, 3, 2)
    meta = ok("tasks_retrieve_data_meta", api.retrieve_data_meta, seeded.task_id)
    same_shape(meta, capture("task_data_meta")["body"])
    wanted = capture("task_data_meta")["body"]["frames"]
    assert [(f["name"], f["width"], f["height"]) for f in meta["frames"]] == [
        (f["name"], f["width"], f["height"]) for f in wanted
    ]


def test_jobs_list_filters_and_pagination(seeded: Seeded, client: Client) -> None:
    server = seeded.server
    gt = server.add_ground_truth_job(seeded.task_id, [1, 3])
    replicas = server.add_consensus_replicas(seeded.job_ids[0], 2)
    api = client.api_client.jobs_api
    listed = ok("jobs_list", api.list, task_id=seeded.task_id, type="annotation")
    same_shape(listed, capture("jobs_list_by_task")["body"])
    # CVAT lists jobs newest first
    assert [j["id"] for j in listed["results"]] == sorted(seeded.job_ids, reverse=True)
    assert [(j["start_frame"], j["stop_frame"]) for j in listed["results"]] == [(3, 4), (0, 2)]
    assert [j["id"] for j in ok("jobs_list", api.list, type="ground_truth")["results"]] == [gt]
    # cvat-sdk 2.80 only accepts type=replica client-side; CVAT 2.73 says consensus_replica
    with pytest.raises(ApiValueError):
        api.list(type="consensus_replica")
    body = json.loads(
        urllib3.request(
            "GET",
            f"{server.url}/api/jobs?type=consensus_replica",
            headers={"Authorization": f"Bearer {seeded.token}"},
        ).data
    )
    assert [j["id"] for j in check("jobs_list", 200, body)["results"]] == sorted(replicas, reverse=True)
    assert {j.type for j in client.tasks.retrieve(seeded.task_id).get_jobs()} == {
        "annotation",
        "ground_truth",
        "consensus_replica",
    }
    assert all(
        j.parent_job_id == seeded.job_ids[0] for j in client.jobs.list(parent_job_id=seeded.job_ids[0])
    )
    ok(
        "jobs_partial_update",
        api.partial_update,
        seeded.job_ids[1],
        patched_job_write_request=models.PatchedJobWriteRequest(stage="validation"),
    )
    filtered = ok("jobs_list", api.list, stage="validation", state="new")
    assert [j["id"] for j in filtered["results"]] == [seeded.job_ids[1]]
    page1 = ok("jobs_list", api.list, project_id=seeded.project_id, page_size=2)
    assert page1["count"] == 5 and page1["previous"] is None and page1["next"]
    page3 = ok("jobs_list", api.list, project_id=seeded.project_id, page_size=2, page=3)
    assert len(page3["results"]) == 1 and page3["next"] is None
    assert raw(api.list, page=9)[:2] == (404, {"detail": "Invalid page."})
    # the SDK's paginating helper walks every page
    assert len(client.tasks.retrieve(seeded.task_id).get_jobs()) == 5


def test_job_retrieve_and_patch(seeded: Seeded, client: Client) -> None:
    api = client.api_client.jobs_api
    job_id = seeded.job_ids[0]
    body = ok("jobs_retrieve", api.retrieve, job_id)
    same_shape(body, capture("job_retrieve")["body"])
    admin_id = client.users.retrieve_current_user().id
    request = models.PatchedJobWriteRequest(stage="validation", state="new", assignee=admin_id)
    body = ok("jobs_partial_update", api.partial_update, job_id, patched_job_write_request=request)
    same_shape(body, capture("job_patch_stage_state_assignee")["body"])
    assert (body["status"], body["stage"], body["state"]) == ("validation", "validation", "new")
    assert body["assignee"]["id"] == admin_id and body["assignee_updated_date"]
    client.jobs.retrieve(job_id).update({"stage": "acceptance", "state": "completed"})
    assert client.jobs.retrieve(job_id).status == "completed"
    status, body, _ = raw(
        api.partial_update,
        job_id,
        patched_job_write_request=models.PatchedJobWriteRequest(assignee=999),
    )
    assert status == 400 and "assignee" in body
    assert raw(api.retrieve, 999999)[:2] == (404, {"detail": "No Job matches the given query."})

    # JobWriteSerializer.update: a stage change without a state sets the state to new
    client.jobs.retrieve(job_id).update({"state": "in progress"})
    client.jobs.retrieve(job_id).update({"stage": "validation"})
    assert (client.jobs.retrieve(job_id).stage, client.jobs.retrieve(job_id).state) == ("validation", "new")
    client.jobs.retrieve(job_id).update({"stage": "annotation", "state": "in progress"})
    client.jobs.retrieve(job_id).update({"stage": "annotation"})  # the same stage: the state stays
    assert client.jobs.retrieve(job_id).state == "in progress"

    # jobs.rego: the job's assignee may change its state, not its stage or assignee
    seeded.server.add_user("ann", "pw")
    seeded.server.assign("job", job_id, "ann")
    annotator = make_client(seeded.server.url, credentials=("ann", "pw")).api_client.jobs_api
    for fields, expected in (
        ({"state": "completed"}, 200),
        ({"stage": "validation"}, 403),
        ({"assignee": None}, 403),
    ):
        request = models.PatchedJobWriteRequest(**fields)
        assert raw(annotator.partial_update, job_id, patched_job_write_request=request)[0] == expected, fields


def test_job_meta_deleted_and_ground_truth_frames(client: Client, seeded: Seeded) -> None:
    server = seeded.server
    task_id = server.add_image_task(
        seeded.project_id, sample_jpegs(6), name="t2", segment_size=4, deleted_frames=[1, 5]
    )
    gt = server.add_ground_truth_job(task_id, [0, 2, 5])
    first, second = (j["id"] for j in server.jobs(task_id))
    api = client.api_client.jobs_api
    meta = ok("jobs_retrieve_data_meta", api.retrieve_data_meta, seeded.job_ids[0])
    same_shape(meta, capture("job_data_meta")["body"])
    assert meta == {
        **capture("job_data_meta")["body"],
        "chunks_updated_date": meta["chunks_updated_date"],
    }
    meta = ok("jobs_retrieve_data_meta", api.retrieve_data_meta, first)
    assert (meta["start_frame"], meta["stop_frame"], meta["size"]) == (0, 3, 4)
    assert meta["deleted_frames"] == [1] and meta["included_frames"] is None
    assert ok("jobs_retrieve_data_meta", api.retrieve_data_meta, second)["deleted_frames"] == [5]
    meta = ok("jobs_retrieve_data_meta", api.retrieve_data_meta, gt)
    assert (meta["start_frame"], meta["stop_frame"], meta["size"]) == (0, 5, 3)
    assert meta["included_frames"] == [0, 2, 5] and meta["deleted_frames"] == [5]
    assert [f["name"] for f in meta["frames"]] == [
        "img_0.jpg",
        "placeholder.jpg",
        "img_2.jpg",
        "placeholder.jpg",
        "placeholder.jpg",
        "img_5.jpg",
    ]
    task_meta = ok("tasks_retrieve_data_meta", client.api_client.tasks_api.retrieve_data_meta, task_id)
    assert task_meta["deleted_frames"] == [1, 5] and task_meta["size"] == 6


# ----------------------------------------------------------------------- chunks
def _zip_images(data: bytes) -> tuple[list[str], list[Image.Image]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        return names, [Image.open(io.BytesIO(zf.read(n))).convert("RGB") for n in names]


def _close(a: Image.Image, b: Image.Image, tolerance: float = 12.0) -> bool:
    if a.size != b.size:
        return False
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return float(diff.mean()) < tolerance


def test_job_chunks_are_zips_of_the_jobs_frames(seeded: Seeded, client: Client) -> None:
    api = client.api_client.jobs_api
    originals = [
        Image.open(io.BytesIO(d)).convert("RGB") for _, d in sample_jpegs(5, widths=[320, 336, 352, 368, 384])
    ]
    for job_id, frames in zip(seeded.job_ids, ([0, 1, 2], [3, 4]), strict=True):
        status, data, response = raw(api.retrieve_data, job_id, type="chunk", index=0, quality="compressed")
        assert status == 200 and response.headers["Content-Type"] == "application/zip"
        names, images = _zip_images(data)
        assert names == [f"{n:06d}.jpeg" for n in range(len(frames))]
        assert all(_close(images[i], originals[f]) for i, f in enumerate(frames))
    assert capture("job_chunk_compressed_index0")["zip_members"] == [f"{n:06d}.jpeg" for n in range(3)]
    status, data, _ = raw(api.retrieve_data, seeded.job_ids[0], type="chunk", index=0, quality="original")
    names, images = _zip_images(data)
    assert names == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert all(_close(images[i], originals[i], 1.0) for i in range(3))
    status, body, _ = raw(api.retrieve_data, seeded.job_ids[0], type="chunk", index=99, quality="compressed")
    wanted = capture("error_job_chunk_out_of_range")
    assert (status, body) == (wanted["status"], wanted["body"])
    # the deprecated `number` is a task chunk number, limited to the job's frames
    legacy = raw(api.retrieve_data, seeded.job_ids[1], type="chunk", number=0, quality="compressed")
    assert _zip_images(legacy[1])[0] == ["000000.jpeg", "000001.jpeg"]
    # jobs longer than one chunk are split by chunk_size
    task_id = seeded.server.add_image_task(
        seeded.project_id, sample_jpegs(5), name="small", segment_size=5, chunk_size=2
    )
    job_id = seeded.server.jobs(task_id)[0]["id"]
    sizes = [len(_zip_images(raw(api.retrieve_data, job_id, type="chunk", index=i)[1])[0]) for i in range(3)]
    assert sizes == [2, 2, 1]


def test_single_frames(seeded: Seeded, client: Client) -> None:
    task = client.tasks.retrieve(seeded.task_id)
    assert Image.open(task.get_frame(3, quality="original")).size == (368, 240)
    job = client.jobs.retrieve(seeded.job_ids[1])
    assert Image.open(job.get_frame(4, quality="compressed")).size == (384, 240)
    # a job only serves its own frames
    assert raw(client.api_client.jobs_api.retrieve_data, seeded.job_ids[1], type="frame", number=0)[0] == 400


def test_task_chunks_and_sdk_task_dataset(seeded: Seeded, client: Client, tmp_path: Path) -> None:
    from cvat_sdk.core.client import Config
    from cvat_sdk.datasets import TaskDataset

    seeded.server.add_tag(seeded.job_ids[0], 2, "dog")
    status, data, _ = raw(
        client.api_client.tasks_api.retrieve_data,
        seeded.task_id,
        type="chunk",
        number=0,
        quality="original",
    )
    assert status == 200 and len(_zip_images(data)[0]) == 5
    client.config = Config(cache_dir=tmp_path)
    dataset = TaskDataset(client, seeded.task_id)
    assert [s.frame_name for s in dataset.samples] == [f"img_{n}.jpg" for n in range(5)]
    assert [s.media.load_image().size[0] for s in dataset.samples] == [320, 336, 352, 368, 384]
    assert [len(s.annotations.tags) for s in dataset.samples] == [0, 0, 1, 0, 0]


def test_video_chunk_decodes_to_the_jobs_frames(seeded: Seeded, client: Client) -> None:
    frames = sample_frames(12, (160, 120))
    task_id = seeded.server.add_video_task(seeded.project_id, frames, name="clip", segment_size=8, overlap=0)
    from_mp4 = seeded.server.add_video_task(
        seeded.project_id, video_chunk([pil_frame("v.mp4", f) for f in frames]), name="mp4"
    )
    assert len(seeded.server.state.tasks[from_mp4]["frames"]) == 12
    task = ok("tasks_retrieve", client.api_client.tasks_api.retrieve, task_id)
    assert task["data_compressed_chunk_type"] == task["data_original_chunk_type"] == "video"
    jobs = seeded.server.jobs(task_id)
    meta = ok("jobs_retrieve_data_meta", client.api_client.jobs_api.retrieve_data_meta, jobs[1]["id"])
    same_shape(meta, capture("video_job_data_meta")["body"])
    assert (meta["start_frame"], meta["stop_frame"], meta["frames"][0]["name"]) == (
        8,
        11,
        "clip.mp4",
    )
    for job, span in zip(jobs, (range(0, 8), range(8, 12)), strict=True):
        for quality in ("compressed", "original"):
            status, data, response = raw(
                client.api_client.jobs_api.retrieve_data,
                job["id"],
                type="chunk",
                index=0,
                quality=quality,
            )
            assert status == 200 and response.headers["Content-Type"] == "video/mp4"
            with av.open(io.BytesIO(data)) as container:
                decoded = [f.to_image() for f in container.decode(video=0)]
            assert len(decoded) == len(span)
            assert all(_close(d, frames[n], 20) for d, n in zip(decoded, span, strict=True))
            # each decoded frame is nearest to its own source frame
            for d, n in zip(decoded, span, strict=True):
                errors = [np.abs(np.asarray(d, np.int16) - np.asarray(f, np.int16)).mean() for f in frames]
                assert int(np.argmin(errors)) == n


# ------------------------------------------------------------------ annotations
def test_job_annotations_create_update_delete(seeded: Seeded, client: Client) -> None:
    api = client.api_client.jobs_api
    job_id = seeded.job_ids[0]
    label_ids = ids(seeded)
    empty = ok("jobs_retrieve_annotations", api.retrieve_annotations, job_id)
    assert empty == capture("job_annotations_empty")["body"]
    attrs = [
        models.AttributeValRequest(spec_id=label_ids["cat.confidence"], value="87"),
        models.AttributeValRequest(spec_id=label_ids["cat.model"], value="ViT-B-32/laion2b_s34b_b79k"),
        models.AttributeValRequest(spec_id=label_ids["cat.needs_review"], value="false"),
    ]
    body = ok(
        "jobs_partial_update_annotations",
        api.partial_update_annotations,
        "create",
        job_id,
        patched_labeled_data_request=models.PatchedLabeledDataRequest(
            tags=[tag_request(1, label_ids["cat"], group=0, attributes=attrs)]
        ),
    )
    wanted = capture("job_annotations_patch_create_tag")["body"]
    check_component("LabeledData", body)
    same_shape(body, wanted)
    created = body["tags"][0]
    assert {k: v for k, v in created.items() if k != "id"} == {
        **{k: v for k, v in wanted["tags"][0].items() if k != "id"},
        "label_id": label_ids["cat"],
        "attributes": [{"spec_id": a.spec_id, "value": a.value} for a in attrs],
    }
    job = client.jobs.retrieve(job_id)
    stored = ok("jobs_retrieve_annotations", api.retrieve_annotations, job_id)
    same_shape(stored, capture("job_annotations_after_create")["body"])
    assert job.get_annotations().tags[0].source == "auto"
    # update through the SDK proxy
    job.update_annotations(
        models.PatchedLabeledDataRequest(
            tags=[
                models.LabeledImageRequest(
                    id=created["id"], frame=1, label_id=label_ids["dog"], source="auto"
                )
            ]
        ),
        action=AnnotationUpdateAction.UPDATE,
    )
    assert [(t["id"], t["label_id"]) for t in seeded.server.annotations(job_id)["tags"]] == [
        (created["id"], label_ids["dog"])
    ]
    job.remove_annotations(ids=[created["id"]])
    assert seeded.server.annotations(job_id)["tags"] == []
    # PUT replaces everything
    job.set_annotations(
        models.LabeledDataRequest(tags=[tag_request(0, label_ids["cat"]), tag_request(2, label_ids["dog"])])
    )
    assert [t["frame"] for t in seeded.server.annotations(job_id)["tags"]] == [0, 2]
    # read back, a tag written without its label's attributes has them at their defaults
    read = api.retrieve_annotations(job_id)[0].tags[0]
    cat = client.api_client.labels_api.retrieve(label_ids["cat"])[0]
    defaults = {spec.id: spec.default_value for spec in cat.attributes}
    assert {a.spec_id: a.value for a in read.attributes} == defaults and defaults
    job.remove_annotations()
    assert seeded.server.annotations(job_id)["tags"] == []
    assert seeded.server.violations == []


def test_annotation_errors_and_violations(seeded: Seeded, client: Client) -> None:
    api = client.api_client.jobs_api
    job_id = seeded.job_ids[0]
    label_ids = ids(seeded)

    def create(*tags: models.LabeledImageRequest) -> tuple[int, Any]:
        return raw(
            api.partial_update_annotations,
            "create",
            job_id,
            patched_labeled_data_request=models.PatchedLabeledDataRequest(tags=list(tags)),
        )[:2]

    wanted = capture("job_annotations_patch_bad_label")
    assert create(tag_request(1, 999999)) == (wanted["status"], wanted["body"])
    bad_spec = tag_request(
        1,
        label_ids["dog"],
        attributes=[models.AttributeValRequest(spec_id=label_ids["cat.confidence"], value="5")],
    )
    assert create(bad_spec) == (400, [f"spec_id `{label_ids['cat.confidence']}` is invalid"])
    assert seeded.server.annotations(job_id)["tags"] == [] and seeded.server.violations == []
    # real CVAT stores a tag outside the job's frames with 200
    status, body = create(tag_request(4, label_ids["dog"]))
    wanted = capture("job_annotations_patch_frame_out_of_range")
    assert status == wanted["status"] and body["tags"][0]["frame"] == 4
    assert [v["kind"] for v in seeded.server.violations] == ["frame_out_of_job"]
    seeded.server.clear_violations()
    create(
        tag_request(
            0,
            label_ids["cat"],
            attributes=[models.AttributeValRequest(spec_id=label_ids["cat.confidence"], value="87.5")],
        )
    )
    create(tag_request(0, label_ids["cat"]))
    assert [v["kind"] for v in seeded.server.violations] == ["bad_attribute_value", "duplicate_tag"]


def test_task_annotations_and_auto_annotation_driver(seeded: Seeded, client: Client) -> None:
    import cvat_sdk.auto_annotation as cvataa

    server = seeded.server
    server.add_ground_truth_job(seeded.task_id, [0, 4])

    class TagEverything:
        spec = cvataa.DetectionFunctionSpec(labels=[cvataa.label_spec("dog", 0, type="tag")])

        def detect(self, context: Any, image: Image.Image) -> list[models.LabeledImageRequest]:
            return [cvataa.tag(0)]

    cvataa.annotate_task(client, seeded.task_id, TagEverything())
    by_job = [[t["frame"] for t in server.annotations(j)["tags"]] for j in seeded.job_ids]
    assert sorted(by_job) == [[0, 1, 2], [3, 4]]
    api = client.api_client.tasks_api
    body = ok("tasks_retrieve_annotations", api.retrieve_annotations, seeded.task_id)
    assert sorted(t["frame"] for t in body["tags"]) == [0, 1, 2, 3, 4]
    cvataa.annotate_task(client, seeded.task_id, TagEverything(), clear_existing=True)
    assert len(server.task_annotations(seeded.task_id)["tags"]) == 5
    ok(
        "tasks_partial_update_annotations",
        api.partial_update_annotations,
        "create",
        seeded.task_id,
        patched_labeled_data_request=models.PatchedLabeledDataRequest(
            tags=[tag_request(9, ids(seeded)["cat"])]
        ),
    )
    assert [v["kind"] for v in server.violations] == ["frame_out_of_task"]
    status, _, _ = raw(api.destroy_annotations, seeded.task_id)
    assert status == 204 and server.task_annotations(seeded.task_id)["tags"] == []


# ---------------------------------------------------------------------- issues
def test_issues_and_comments(seeded: Seeded, client: Client) -> None:
    api = client.api_client.issues_api
    job_id = seeded.job_ids[0]
    message = "prelabel: low confidence 41% (cat 41%, dog 38%)"
    request = models.IssueWriteRequest(job=job_id, frame=2, position=[0, 0, 352, 240], message=message)
    issue = ok("issues_create", api.create, request, status=201)
    same_shape(issue, capture("issue_create")["body"])
    assert issue["position"] == [0.0, 0.0, 352.0, 240.0] and issue["comments"]["count"] == 1
    listed = ok("issues_list", api.list, job_id=job_id)
    same_shape(listed, capture("issues_list_by_job")["body"])
    assert ok("issues_list", api.list, job_id=seeded.job_ids[1])["count"] == 0
    comments = ok("comments_list", client.api_client.comments_api.list, issue_id=issue["id"])
    same_shape(comments, capture("comments_list_by_issue")["body"])
    assert [c["message"] for c in comments["results"]] == [message]
    ok("comments_retrieve", client.api_client.comments_api.retrieve, comments["results"][0]["id"])
    reply = ok(
        "comments_create",
        client.api_client.comments_api.create,
        models.CommentWriteRequest(issue=issue["id"], message="checked"),
        status=201,
    )
    assert [c.message for c in client.issues.retrieve(issue["id"]).get_comments()] == [
        "checked",
        message,
    ]
    patched = ok(
        "issues_partial_update",
        api.partial_update,
        issue["id"],
        patched_issue_write_request=models.PatchedIssueWriteRequest(resolved=True),
    )
    same_shape(patched, capture("issue_patch_resolved")["body"])
    assert patched["resolved"] is True
    assert ok("issues_retrieve", api.retrieve, issue["id"])["resolved"] is True
    assert [i.id for i in client.jobs.retrieve(job_id).get_issues()] == [issue["id"]]
    assert ok("jobs_retrieve", client.api_client.jobs_api.retrieve, job_id)["issues"]["count"] == 1
    assert raw(api.destroy, issue["id"])[0] == 204
    assert seeded.server.issues() == [] and seeded.server.comments() == []
    assert reply["issue"] == issue["id"]
    raw(
        api.create,
        models.IssueWriteRequest(job=job_id, frame=4, position=[0, 0, 1, 1], message="x"),
    )
    assert [v["kind"] for v in seeded.server.violations] == ["issue_frame_out_of_job"]


# ----------------------------------------------------------------- permissions
def test_regular_user_sees_only_own_or_assigned(seeded: Seeded) -> None:
    server = seeded.server
    server.add_user("alice", "pw")
    server.add_user("bob", "pw")
    own = server.add_project("alice's", owner="alice", labels=[{"name": "x", "type": "tag"}])
    own_task = server.add_image_task(own, sample_jpegs(2), name="a", segment_size=2)
    with make_client(server.url, credentials=("alice", "pw")) as c:
        projects = ok("projects_list", c.api_client.projects_api.list)
        assert [p["id"] for p in projects["results"]] == [own]
        assert [t.id for t in c.tasks.list()] == [own_task]
        assert {j.task_id for j in c.jobs.list()} == {own_task}
        status, body, _ = raw(c.api_client.projects_api.retrieve, seeded.project_id)
        wanted = capture("error_forbidden_project_other_user")
        assert (status, body) == (wanted["status"], wanted["body"])
        assert raw(c.api_client.jobs_api.retrieve, seeded.job_ids[0])[0] == 403
        assert raw(c.api_client.labels_api.list, project_id=seeded.project_id)[0] == 403
        status, _, _ = raw(
            c.api_client.jobs_api.partial_update_annotations,
            "create",
            seeded.job_ids[0],
            patched_labeled_data_request=(models.PatchedLabeledDataRequest(tags=[])),
        )
        assert status == 403
        server.assign("job", seeded.job_ids[1], "alice")
        assert {j.id for j in c.jobs.list(task_id=seeded.task_id)} == {seeded.job_ids[1]}
        ok("jobs_retrieve", c.api_client.jobs_api.retrieve, seeded.job_ids[1])
    with make_client(server.url, credentials=("bob", "pw")) as c:
        assert c.projects.list() == [] and c.jobs.list() == []
        server.assign("project", own, "bob")
        assert [p.id for p in c.projects.list()] == [own]
        assert [t.id for t in c.tasks.list()] == [own_task]


# ---------------------------------------------------------------------- faults
def _plain(server: CvatTestServer, token: str | None) -> Any:
    """A urllib3 GET without retries, to see exactly what the server answered."""
    http = urllib3.PoolManager(retries=False)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return lambda path: http.request("GET", server.url + path, headers=headers)


def test_fault_status_delay_and_retry_after(seeded: Seeded, client: Client) -> None:
    server = seeded.server
    get = _plain(server, seeded.token)
    job_path = f"/api/jobs/{seeded.job_ids[0]}"
    rule = server.fail(r"^/api/jobs/\d+$", 429, method="GET", retry_after=7)
    response = get(job_path)
    assert (response.status, response.headers["Retry-After"]) == (429, "7") and rule.fired == 1
    assert json.loads(response.data) == {"detail": "injected 429"}
    assert get(job_path).status == 200  # times=1: the rule is spent
    server.fail("/api/jobs", 502, times=2)
    assert [get("/api/jobs").status for _ in range(3)] == [502, 502, 200]
    # cvat-sdk retries GET/PUT/DELETE on 502/503/504 and on 429/503 with Retry-After
    server.fail(r"^/api/jobs/\d+$", 503, method="GET")
    assert client.jobs.retrieve(seeded.job_ids[0]).id == seeded.job_ids[0]
    server.fail(r"^/api/jobs/\d+$", 429, method="GET", retry_after=0)
    assert client.jobs.retrieve(seeded.job_ids[0]).id == seeded.job_ids[0]
    assert [r.status for r in server.requests if r.path == job_path][-4:] == [503, 200, 429, 200]
    server.delay("/api/server/about", 0.3)
    started = time.monotonic()
    client.get_server_version()
    assert time.monotonic() - started >= 0.3
    server.set_global_delay(1.0, methods={"PATCH"})  # long enough to tell apart on a loaded machine
    started = time.monotonic()
    client.jobs.retrieve(seeded.job_ids[0]).update({"state": "in progress"})
    assert time.monotonic() - started >= 1.0
    server.clear_faults()
    started = time.monotonic()
    client.jobs.retrieve(seeded.job_ids[0]).update({"state": "new"})
    assert time.monotonic() - started < 1.0
    faulted = [(r.method, r.status, r.fault) for r in server.requests if r.fault]
    assert faulted == [
        ("GET", 429, "status"),
        ("GET", 502, "status"),
        ("GET", 502, "status"),
        ("GET", 503, "status"),
        ("GET", 429, "status"),
    ]


def test_fault_dropped_connection(seeded: Seeded, client: Client) -> None:
    server = seeded.server
    label_id = ids(seeded)["dog"]
    server.drop("/annotations", method="PATCH")
    request = models.PatchedLabeledDataRequest(tags=[tag_request(0, label_id)])
    with pytest.raises(urllib3.exceptions.HTTPError):
        client.jobs.retrieve(seeded.job_ids[0]).update_annotations(
            request, action=AnnotationUpdateAction.CREATE
        )
    assert server.annotations(seeded.job_ids[0])["tags"] == []
    assert [(r.method, r.status, r.fault) for r in server.requests][-1] == ("PATCH", None, "drop")
    # urllib3 transparently retries an idempotent GET whose connection was dropped
    server.drop(r"^/api/jobs/\d+$", method="GET")
    assert client.jobs.retrieve(seeded.job_ids[0]).id == seeded.job_ids[0]
    assert [r.status for r in server.requests if r.method == "GET"][-2:] == [None, 200]
    server.drop("/api/server/about")
    with pytest.raises(urllib3.exceptions.ProtocolError):
        _plain(server, seeded.token)("/api/server/about")


def test_fault_after_write_and_write_count(seeded: Seeded, client: Client) -> None:
    server = seeded.server
    label_id = ids(seeded)["dog"]
    job = client.jobs.retrieve(seeded.job_ids[0])
    server.reset_counters()
    assert server.write_count == 0
    request = models.PatchedLabeledDataRequest(tags=[tag_request(0, label_id)])
    server.fail_after_write("/annotations", status=502)
    with pytest.raises(ApiException) as err:
        job.update_annotations(request, action=AnnotationUpdateAction.CREATE)
    assert err.value.status == 502
    assert len(server.annotations(job.id)["tags"]) == 1  # applied despite the 502
    server.fail_after_write("/annotations", status=None)
    with pytest.raises(urllib3.exceptions.HTTPError):
        job.update_annotations(
            models.PatchedLabeledDataRequest(tags=[tag_request(1, label_id)]),
            action=AnnotationUpdateAction.CREATE,
        )
    assert [t["frame"] for t in server.annotations(job.id)["tags"]] == [0, 1]
    server.fail("/annotations", 503, method="PATCH")
    with pytest.raises(ApiException):
        job.update_annotations(request, action=AnnotationUpdateAction.CREATE)
    job.get_annotations()
    # two applied writes; the 503 answered before handling and reads do not count
    assert server.write_count == 2
    assert [(r.method, r.status) for r in server.requests] == [
        ("PATCH", 502),
        ("PATCH", None),
        ("PATCH", 503),
        ("GET", 200),
    ]
    server.reset_counters()
    assert server.write_count == 0 and server.requests == []


def test_fault_probability_is_seeded() -> None:
    def outcomes(seed: int) -> list[int]:
        with CvatTestServer(seed=seed) as server:
            server.fail("/api/server/about", 503, times=None, probability=0.5)
            get = _plain(server, None)
            return [get("/api/server/about").status for _ in range(12)]

    first = outcomes(7)
    assert first == outcomes(7) and {200, 503} == set(first)


def test_basic_auth_header_and_unknown_route(seeded: Seeded) -> None:
    token = base64.b64encode(f"{seeded.username}:{seeded.password}".encode()).decode()
    http = urllib3.PoolManager()
    response = http.request(
        "GET", f"{seeded.server.url}/api/users/self", headers={"Authorization": f"Basic {token}"}
    )
    assert response.status == 200 and json.loads(response.data)["username"] == "admin"
    response = http.request(
        "GET", f"{seeded.server.url}/api/nothing", headers={"Authorization": f"Basic {token}"}
    )
    assert response.status == 404
    # a session cookie alone does not allow writes: DRF's CSRF check
    with Client(seeded.server.url) as c:
        c.login((seeded.username, seeded.password))
        cookie = "; ".join(f"{k}={v.value}" for k, v in c.api_client.cookies.items())
    response = http.request(
        "PATCH",
        f"{seeded.server.url}/api/jobs/{seeded.job_ids[0]}",
        body=b"{}",
        headers={"Cookie": cookie, "Content-Type": "application/json"},
    )
    assert (response.status, json.loads(response.data)) == (
        403,
        {"detail": "CSRF Failed: CSRF token missing."},
    )


# --------------------------------------------------------------------- webhooks
def test_webhooks_endpoints_answer_by_the_schema(seeded: Seeded, client: Client) -> None:
    api = client.api_client.webhooks_api
    request = models.WebhookWriteRequest(
        target_url="http://127.0.0.1:9/hook",  # nothing listens: the delivery fails, and is recorded
        type=models.WebhookType("project"),
        project_id=seeded.project_id,
        events=[models.EventsEnum("update:job")],
        secret="s3cret",
        content_type=models.WebhookContentType("application/json"),
    )
    created = ok("webhooks_create", api.create, request, status=201)
    assert created["events"] == ["update:job"] and "secret" not in created
    assert "last_status" not in created  # no delivery yet: DRF leaves the field out
    hook_id = created["id"]
    listed = ok("webhooks_list", api.list, project_id=seeded.project_id)
    assert [w["id"] for w in listed["results"]] == [hook_id]
    assert ok("webhooks_list", api.list, project_id=seeded.project_id + 1)["count"] == 0
    patched = ok(
        "webhooks_partial_update",
        api.partial_update,
        hook_id,
        patched_webhook_write_request=models.PatchedWebhookWriteRequest(
            events=[models.EventsEnum("update:job"), models.EventsEnum("create:task")]
        ),
    )
    assert patched["events"] == ["create:task", "update:job"]

    client.jobs.retrieve(seeded.job_ids[0]).update({"state": "in progress"})
    seeded.server.webhook_deliveries()
    deliveries = ok("webhooks_list_deliveries", api.list_deliveries, hook_id)
    assert deliveries["count"] == 1
    delivery = deliveries["results"][0]
    assert delivery["event"] == "update:job" and delivery["status_code"] is None
    assert delivery["changed_fields"] == "state" and delivery["redelivery"] is False
    ok("webhooks_retrieve_deliveries", api.retrieve_deliveries, str(delivery["id"]), hook_id)
    status, _, _ = raw(api.create_deliveries_redelivery, str(delivery["id"]), hook_id)
    assert status == 200
    assert [d["redelivery"] for d in seeded.server.webhook_deliveries()] == [False, True]
    retrieved = ok("webhooks_retrieve", api.retrieve, hook_id)
    assert "last_delivery_date" in retrieved

    bad = models.WebhookWriteRequest(
        target_url="not a url", type="project", project_id=seeded.project_id, events=[]
    )
    status, body, _ = raw(api.create, bad)
    assert status == 400 and body == {"target_url": ["Enter a valid URL."]}
    status, _, _ = raw(api.destroy, hook_id)
    assert status == 204
    status, body, _ = raw(api.retrieve, hook_id)
    assert status == 404


def test_stepped_offset_overlapping_video_numbers_frames_as_captured(seeded: Seeded, client: Client) -> None:
    """The capture `video_step_overlap.json`, replayed: 12 video frames, start 1, step 2,
    segment size 4, chunk size 3: relative frames in jobs, absolute ones in data meta,
    filtered chunks from the job's start, overlapping jobs, merged tags in the task view."""
    captured = capture("video_step_overlap")
    video = sample_frames(12, (160, 120))
    task_id = seeded.server.add_video_task(
        seeded.project_id, video, name="stepped", segment_size=4, chunk_size=3, start_frame=1, frame_step=2
    )
    task = ok("tasks_retrieve", client.api_client.tasks_api.retrieve, task_id)
    for key, value in captured["task"].items():
        if key != "id":
            assert task[key] == value, key
    task_meta = ok("tasks_retrieve_data_meta", client.api_client.tasks_api.retrieve_data_meta, task_id)
    for key, value in captured["task_data_meta"].items():
        assert (len(task_meta["frames"]) if key == "n_frames_entries" else task_meta[key]) == value, key

    jobs = seeded.server.jobs(task_id)
    assert len(jobs) == len(captured["jobs"])
    label = seeded.server.label(task_id, "cat")["id"]
    for job, theirs in zip(jobs, captured["jobs"], strict=True):
        ours = ok("jobs_retrieve", client.api_client.jobs_api.retrieve, job["id"])
        assert [ours[k] for k in ("start_frame", "stop_frame", "frame_count")] == [
            theirs[k] for k in ("start_frame", "stop_frame", "frame_count")
        ]
        meta = ok("jobs_retrieve_data_meta", client.api_client.jobs_api.retrieve_data_meta, job["id"])
        for key, value in theirs["data_meta"].items():
            assert (len(meta["frames"]) if key == "n_frames_entries" else meta[key]) == value, key
        for quality, chunks in theirs["chunks"].items():
            for chunk in chunks:
                status, data, _ = raw(
                    client.api_client.jobs_api.retrieve_data,
                    job["id"],
                    type="chunk",
                    index=chunk["index"],
                    quality=quality,
                )
                assert status == chunk["status"]
                if status != 200:
                    assert data == json.loads(chunk["body"])
                    continue
                with av.open(io.BytesIO(data)) as container:
                    decoded = [f.to_image() for f in container.decode(video=0)]
                shown = [_nearest(image, video) for image in decoded]
                assert shown == chunk["video_frames_shown"]
        for number, video_frame in theirs["frame_endpoint"].items():
            status, data, _ = raw(
                client.api_client.jobs_api.retrieve_data, job["id"], type="frame", number=int(number)
            )
            assert status == 200
            assert _nearest(Image.open(io.BytesIO(data)).convert("RGB"), video) == video_frame

    # The captured tag writes (frames outside the job and the task included), then the views.
    by_id = {theirs["id"]: job["id"] for job, theirs in zip(jobs, captured["jobs"], strict=True)}
    for write in captured["tag_writes"]:
        request = models.PatchedLabeledDataRequest(
            tags=[models.LabeledImageRequest(frame=write["frame"], label_id=label)]
        )
        status, _, _ = raw(
            client.api_client.jobs_api.partial_update_annotations,
            "create",
            by_id[write["job"]],
            patched_labeled_data_request=request,
        )
        assert status == write["status"]
    for theirs_id, frames in captured["job_annotations_tag_frames"].items():
        tags = seeded.server.annotations(by_id[int(theirs_id)])["tags"]
        assert sorted(tag["frame"] for tag in tags) == frames
    view = ok("tasks_retrieve_annotations", client.api_client.tasks_api.retrieve_annotations, task_id)
    assert sorted(tag["frame"] for tag in view["tags"]) == captured["task_annotations_tag_frames"]


def _nearest(image: Image.Image, frames: list[Image.Image]) -> int:
    """The index of the frame `image` shows (least mean absolute difference)."""
    ours = np.asarray(image.convert("RGB").resize(frames[0].size), np.int16)
    errors = [np.abs(ours - np.asarray(f.convert("RGB"), np.int16)).mean() for f in frames]
    return int(np.argmin(errors))
