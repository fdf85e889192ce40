"""JSON shapes of CVAT 2.73 objects, field for field as the captured responses show them."""

from __future__ import annotations

import math
from typing import Any

from .state import State


class Serializer:
    """Turns state records into response bodies; `base` is the server URL."""

    def __init__(self, state: State, base: str) -> None:
        self.state = state
        self.base = base

    def basic_user(self, user_id: int | None) -> dict[str, Any] | None:
        """BasicUser (owner/assignee fields)."""
        if user_id is None:
            return None
        user = self.state.users[user_id]
        return {
            "url": f"{self.base}/api/users/{user_id}",
            "id": user_id,
            "username": user["username"],
            "first_name": user["first_name"],
            "last_name": user["last_name"],
        }

    def user(self, user: dict[str, Any]) -> dict[str, Any]:
        """User (users/self, and users list for admins)."""
        return {
            **self.basic_user(user["id"]),  # type: ignore[dict-item]
            "email": user["email"],
            "groups": ["admin"] if user["is_superuser"] else ["user"],
            "is_staff": user["is_staff"],
            "is_superuser": user["is_superuser"],
            "is_active": user["is_active"],
            "last_login": user["last_login"],
            "date_joined": user["date_joined"],
            "has_analytics_access": user["is_superuser"],
        }

    def project(self, p: dict[str, Any]) -> dict[str, Any]:
        """ProjectRead."""
        tasks = [t for t in self.state.tasks.values() if t["project_id"] == p["id"]]
        statuses = {self.task_status(t["id"]) for t in tasks}
        return {
            "url": f"{self.base}/api/projects/{p['id']}",
            "id": p["id"],
            "name": p["name"],
            "owner": self.basic_user(p["owner_id"]),
            "assignee": self.basic_user(p["assignee_id"]),
            "guide_id": None,
            "bug_tracker": p["bug_tracker"],
            "created_date": p["created_date"],
            "updated_date": p["updated_date"],
            "status": "completed" if statuses == {"completed"} else "annotation",
            "dimension": tasks[0]["dimension"] if tasks else None,  # CVAT keeps a project's tasks alike
            "organization": self.state.object_org("project", p),
            "organization_id": self.state.object_org("project", p),
            "target_storage": None,
            "source_storage": None,
            "tasks": {"count": len(tasks), "url": f"{self.base}/api/tasks?project_id={p['id']}"},
            "labels": {"url": f"{self.base}/api/labels?project_id={p['id']}"},
            "assignee_updated_date": p["assignee_updated_date"],
            "task_subsets": sorted({t["subset"] for t in tasks if t["subset"]}),
        }

    def chunk_type(self, task: dict[str, Any], quality: str = "original") -> str:
        """`imageset` for image tasks, `video` for video tasks, except a video task's compressed
        chunks with `use_zip_chunks` (images), as CVAT sets them in cvat/apps/engine/task.py."""
        if task["media_type"] != "video" or (quality == "compressed" and task.get("use_zip_chunks")):
            return "imageset"
        return "video"

    def task_status(self, task_id: int) -> str:
        """Task status derived from its jobs, as Task.status in CVAT."""
        jobs = self.state.task_jobs(task_id)
        statuses = {self.job_status(j) for j in jobs}
        if statuses and statuses == {"completed"}:
            return "completed"
        return "validation" if "validation" in statuses else "annotation"

    def job_status(self, job: dict[str, Any]) -> str:
        """Job.status as CVAT derives it from stage and state."""
        if job["stage"] == "acceptance" and job["state"] == "completed":
            return "completed"
        return "annotation" if job["stage"] == "annotation" else "validation"

    def task(self, t: dict[str, Any]) -> dict[str, Any]:
        """TaskRead."""
        project = self.state.projects.get(t["project_id"])
        jobs = self.state.task_jobs(t["id"])
        all_jobs = self.state.task_jobs(t["id"], None)
        return {
            "url": f"{self.base}/api/tasks/{t['id']}",
            "id": t["id"],
            "name": t["name"],
            "project_id": t["project_id"],
            "project_name": project["name"] if project else None,
            "owner": self.basic_user(t["owner_id"]),
            "assignee": self.basic_user(t["assignee_id"]),
            "bug_tracker": "",
            "created_date": t["created_date"],
            "updated_date": t["updated_date"],
            "overlap": t["overlap"],
            "segment_size": t["segment_size"],
            "status": self.task_status(t["id"]),
            "data_chunk_size": t["chunk_size"],
            "data_original_chunk_type": self.chunk_type(t),
            "data_compressed_chunk_type": self.chunk_type(t, "compressed"),
            "data_cloud_storage_id": None,
            "guide_id": None,
            "size": len(t["frames"]),
            "image_quality": t["image_quality"],
            "data": t["id"],
            "dimension": t["dimension"],
            "mode": "interpolation" if t["media_type"] == "video" else "annotation",
            "media_type": t["media_type"],
            "subset": t["subset"],
            "organization_id": self.state.object_org("task", t),
            "organization": self.state.object_org("task", t),
            "target_storage": None,
            "source_storage": None,
            "jobs": {
                "count": len(jobs),
                "completed": sum(self.job_status(j) == "completed" for j in jobs),
                "validation": sum(self.job_status(j) == "validation" for j in jobs),
                "url": f"{self.base}/api/jobs?task_id={t['id']}",
            },
            "labels": {"url": f"{self.base}/api/labels?task_id={t['id']}"},
            "assignee_updated_date": t["assignee_updated_date"],
            "validation_mode": "gt" if any(j["type"] == "ground_truth" for j in all_jobs) else None,
            "consensus_enabled": any(j["type"] == "consensus_replica" for j in all_jobs),
        }

    def job(self, j: dict[str, Any]) -> dict[str, Any]:
        """JobRead."""
        task = self.state.tasks[j["task_id"]]
        project = self.state.projects.get(task["project_id"])
        issues = sum(i["job_id"] == j["id"] for i in self.state.issues.values())
        replicas = sum(r["parent_job_id"] == j["id"] for r in self.state.jobs.values())
        return {
            "url": f"{self.base}/api/jobs/{j['id']}",
            "id": j["id"],
            "task_id": task["id"],
            "task_name": task["name"],
            "project_id": task["project_id"],
            "project_name": project["name"] if project else None,
            "assignee": self.basic_user(j["assignee_id"]),
            "guide_id": None,
            "dimension": task["dimension"],
            "mode": "interpolation" if task["media_type"] == "video" else "annotation",
            "media_type": task["media_type"],
            "bug_tracker": "",
            "status": self.job_status(j),
            "stage": j["stage"],
            "state": j["state"],
            "frame_count": len(self.state.job_frames(j)),
            "start_frame": j["start_frame"],
            "stop_frame": j["stop_frame"],
            "data_chunk_size": task["chunk_size"],
            "data_compressed_chunk_type": self.chunk_type(task, "compressed"),
            "data_original_chunk_type": self.chunk_type(task),
            "created_date": j["created_date"],
            "updated_date": j["updated_date"],
            "issues": {"url": f"{self.base}/api/issues?job_id={j['id']}", "count": issues},
            "labels": {"url": f"{self.base}/api/labels?job_id={j['id']}"},
            "type": j["type"],
            "organization": self.state.object_org("job", j),
            "target_storage": None,
            "source_storage": None,
            "assignee_updated_date": j["assignee_updated_date"],
            "parent_job_id": j["parent_job_id"],
            "replicas_count": replicas,
            "consensus_replicas": replicas,
        }

    def label(self, lb: dict[str, Any]) -> dict[str, Any]:
        """Label (project label: project_id set, no task_id key, as captured)."""
        return {
            "id": lb["id"],
            "name": lb["name"],
            "color": lb["color"],
            "attributes": [dict(a) for a in lb["attributes"]],
            "type": lb["type"],
            "sublabels": [],
            "project_id": lb["project_id"],
            "parent_id": None,
            "has_parent": False,
        }

    def _frame_meta(self, frame: Any, name: str | None = None) -> dict[str, Any]:
        return {
            "width": frame.width,
            "height": frame.height,
            "name": name or frame.name,
            "related_files": 0,
            "has_related_context": False,
        }

    def task_meta(self, t: dict[str, Any]) -> dict[str, Any]:
        """DataMetaRead of a task."""
        video = t["media_type"] == "video"
        frames = [t["frames"][0]] if video else t["frames"]
        return {
            "chapters": [] if video else None,
            "chunks_updated_date": t["chunks_updated_date"],
            "chunk_size": t["chunk_size"],
            "size": len(t["frames"]),
            "image_quality": t["image_quality"],
            "start_frame": t["data_start_frame"],
            "stop_frame": t["data_stop_frame"],
            "frame_filter": self._frame_filter(t),
            "frames": [self._frame_meta(f) for f in frames],
            "deleted_frames": list(t["deleted_frames"]),
            "included_frames": None,
            "storage": "local",
            "cloud_storage_id": None,
        }

    @staticmethod
    def _frame_filter(t: dict[str, Any]) -> str:
        return f"step={t['frame_step']}" if t["frame_step"] > 1 else ""

    def job_meta(self, j: dict[str, Any]) -> dict[str, Any]:
        """DataMetaRead of a job, following JobViewSet.metadata in cvat/apps/engine/views.py.

        Image jobs list every frame of [start, stop] (frames outside a ground-truth
        job's frame set as `placeholder.jpg`); `size` counts the job's frames,
        `deleted_frames` keeps only the job's (relative numbers), `included_frames` is
        the frame set of a ground-truth job and null otherwise. `start_frame` and
        `stop_frame` are absolute media frames (the job's relative range through the
        task's start frame and step), unlike those of the job itself.
        """
        task = self.state.tasks[j["task_id"]]
        job_frames = self.state.job_frames(j)
        video = task["media_type"] == "video"
        span = range(j["start_frame"], j["stop_frame"] + 1)
        if video:
            frames = [self._frame_meta(task["frames"][0])]
        else:
            frames = [
                self._frame_meta(task["frames"][n], None if n in job_frames else "placeholder.jpg")
                for n in span
            ]
        return {
            "chapters": [] if video else None,
            "chunks_updated_date": task["chunks_updated_date"],
            "chunk_size": task["chunk_size"],
            "size": len(job_frames),
            "image_quality": task["image_quality"],
            "start_frame": task["data_start_frame"] + j["start_frame"] * task["frame_step"],
            "stop_frame": min(
                task["data_stop_frame"], task["data_start_frame"] + j["stop_frame"] * task["frame_step"]
            ),
            "frame_filter": self._frame_filter(task),
            "frames": frames,
            "deleted_frames": [f for f in task["deleted_frames"] if f in job_frames],
            "included_frames": list(j["frames"]) if j["frames"] is not None else None,
            "storage": "local",
            "cloud_storage_id": None,
        }

    def job_chunk_count(self, j: dict[str, Any]) -> int:
        """Number of chunks of a job (its frames split by the task's chunk size)."""
        size = self.state.tasks[j["task_id"]]["chunk_size"]
        return max(1, math.ceil(len(self.state.job_frames(j)) / size))

    def issue(self, i: dict[str, Any]) -> dict[str, Any]:
        """IssueRead."""
        comments = sum(c["issue_id"] == i["id"] for c in self.state.comments.values())
        return {
            "id": i["id"],
            "frame": i["frame"],
            "position": list(i["position"]),
            "job": i["job_id"],
            "owner": self.basic_user(i["owner_id"]),
            "assignee": self.basic_user(i["assignee_id"]),
            "created_date": i["created_date"],
            "updated_date": i["updated_date"],
            "resolved": i["resolved"],
            "comments": {
                "count": comments,
                "url": f"{self.base}/api/comments?issue_id={i['id']}",
            },
        }

    def comment(self, c: dict[str, Any]) -> dict[str, Any]:
        """CommentRead."""
        return {
            "id": c["id"],
            "issue": c["issue_id"],
            "owner": self.basic_user(c["owner_id"]),
            "message": c["message"],
            "created_date": c["created_date"],
            "updated_date": c["updated_date"],
        }

    @staticmethod
    def labeled_data(data: dict[str, Any]) -> dict[str, Any]:
        """LabeledData: tags/shapes/tracks plus the `intervals` list CVAT 2.73 adds."""
        return {
            "version": data.get("version", 0),
            "tags": data.get("tags", []),
            "shapes": data.get("shapes", []),
            "tracks": data.get("tracks", []),
            "intervals": [],
        }
