"""Answers checked against CVAT 2.73.0's own OpenAPI schema (tests/assets/cvat-2.73).

Strict: objects accept no property the schema does not declare, and OAS 3.0 `nullable`
beside `allOf` (CVAT's nullable $refs) allows null. The schema is parsed once per process
(C YAML loader, about 0.2 s) and each response schema gets one cached validator.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "assets" / "cvat-2.73" / "schema-2.73.0.yml"
JSON_MEDIA = "application/vnd.cvat+json"

# Operations whose answer body the schema leaves undeclared although CVAT 2.73 sends one:
# the annotation writes answer with the stored annotations (cvat/apps/engine/views.py).
UNDECLARED_BODIES = {
    ("jobs_update_annotations", 200): "LabeledData",
    ("jobs_partial_update_annotations", 200): "LabeledData",
    ("tasks_update_annotations", 200): "LabeledData",
    ("tasks_partial_update_annotations", 200): "LabeledData",
}
_MESSAGE_LIMIT = 400


class SchemaViolation(AssertionError):
    """An answer that CVAT 2.73's schema does not allow."""


@cache
def spec() -> dict[str, Any]:
    """The parsed schema (shared: do not modify)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(SCHEMA_PATH.read_text(encoding="utf-8"), Loader=loader)


@cache
def strict_components() -> dict[str, Any]:
    """Schema components where objects accept no undeclared property."""
    components = copy.deepcopy(spec()["components"])

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            if node.get("nullable") and "allOf" in node:
                # jsonschema evaluates the allOf branch alone; spell the null out.
                node["anyOf"] = [{"allOf": node.pop("allOf")}, {"enum": [None]}]
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(components["schemas"])
    return components


@cache
def operations() -> dict[str, dict[str, Any]]:
    """Every operation of the schema by operationId."""
    return {
        op["operationId"]: op
        for item in spec()["paths"].values()
        for method, op in item.items()
        if method != "parameters"
    }


@cache
def _templates() -> list[tuple[re.Pattern[str], dict[str, Any]]]:
    """(path regex, path item); literal templates first, so /api/users/self beats {id}."""
    compiled = []
    for template, item in spec()["paths"].items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template.rstrip("/")))
        compiled.append((template.count("{"), re.compile(pattern + "/?"), item))
    return [(pattern, item) for _, pattern, item in sorted(compiled, key=lambda t: t[0])]


def operation_id(method: str, path: str) -> str | None:
    """The operationId serving `method` on a concrete path like /api/jobs/12/annotations."""
    for pattern, item in _templates():
        if pattern.fullmatch(path):
            op = item.get(method.lower())
            if op is not None:
                return op["operationId"]
    return None


@cache
def _validator(schema_key: tuple[str, ...]) -> Any:
    """A validator for one response schema: (operationId, status) or ("component", name)."""
    from openapi_schema_validator import OAS30ReadValidator  # 0.3 s to import: only when used

    if schema_key[0] == "component":
        body_schema: dict[str, Any] = {"$ref": f"#/components/schemas/{schema_key[1]}"}
    else:
        body_schema = operations()[schema_key[0]]["responses"][schema_key[1]]["content"][JSON_MEDIA]["schema"]
    schema = {**body_schema, "components": strict_components()}
    return OAS30ReadValidator(schema, format_checker=OAS30ReadValidator.FORMAT_CHECKER)


def _validate(schema_key: tuple[str, ...], body: Any) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(_validator(schema_key).iter_errors(body))
    if error is not None:
        message = f"{error.json_path}: {error.message}"
        if len(message) > _MESSAGE_LIMIT:
            message = message[: _MESSAGE_LIMIT - 3] + "..."
        raise SchemaViolation(message)


def check(operation: str, status: int, body: Any) -> Any:
    """Validate a JSON body against the schema's answer for this operation and status.

    Returns the body. Raises KeyError for a status the operation does not declare and
    `SchemaViolation` for a body the schema does not allow.
    """
    response = operations()[operation]["responses"][str(status)]
    if JSON_MEDIA in (response.get("content") or {}):
        _validate((operation, str(status)), body)
    elif (operation, status) in UNDECLARED_BODIES:
        check_component(UNDECLARED_BODIES[operation, status], body)
    return body


def check_component(name: str, body: Any) -> Any:
    """Validate a body against a named schema component; returns the body."""
    _validate(("component", name), body)
    return body


def answer_problem(method: str, path: str, status: int, body: Any, content_type: str) -> str | None:
    """Why this answer is not one CVAT 2.73 could give, or None if it could.

    `body` is the decoded JSON (None for an empty body). Non-JSON answers (chunks,
    images, zips) are not checked. A declared status is validated against its schema;
    an undeclared error status (4xx/5xx) only needs a JSON body; an undeclared success
    status, or a success on a path the schema lacks, is a problem.
    """
    if "json" not in content_type:
        return None
    operation = operation_id(method, path)
    if operation is None:
        return None if status >= 400 else f"no {method} {path} in the schema"
    responses = operations()[operation]["responses"]
    if str(status) not in responses:
        return None if status >= 400 else f"{operation} declares no {status} answer"
    if body is None and status == 204:
        return None
    try:
        check(operation, status, body)
    except SchemaViolation as err:
        return f"{operation} {status}: {err}"
    return None
