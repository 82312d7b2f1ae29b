"""Validate JSON values against component schemas of OpenAI's published OpenAPI spec.

    assert_matches("Response", body)
    assert_matches("ResponseStreamEvent", event)

The spec (`../shared/spec/openai-openapi.yaml`, beside the repository) is OpenAPI
3.1, whose schemas are JSON Schema 2020-12: refs like `#/components/schemas/X` are
resolved with `referencing` against the whole document. Loading the ~3 MB YAML takes
about a second, so the document and each compiled validator are cached per process.

What is not plain JSON Schema in the file: `x-*` keys, `example` and `discriminator`
are annotations (validators ignore unknown keywords), and `format` (e.g. `unixtime`)
is not asserted, as 2020-12 specifies by default. A few schemas still carry
OpenAPI 3.0's `nullable: true`; it is rewritten to its 3.1 meaning (null allowed) so
that a null the spec permits is not reported as a failure.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

REPO = Path(__file__).resolve().parents[2]
# shared/ sits beside the repository (as CI lays it out); BEARPAW_SHARED_DIR
# points elsewhere, e.g. for a clone made outside the workspace.
SPEC_PATH = (
    Path(os.environ.get("BEARPAW_SHARED_DIR") or REPO.parent / "shared")
    / "spec"
    / "openai-openapi.yaml"
)
SPEC_URI = "urn:bearpaw:openai-openapi"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _nullable_as_31(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` as 3.1 spells it: the schema, or null."""
    if isinstance(node, list):
        return [_nullable_as_31(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_as_31(value) for key, value in node.items()}
    # A property *named* "nullable" has a schema (a dict) as its value, not a bool.
    if node.get("nullable") is True:
        del node["nullable"]
        return {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def spec() -> dict[str, Any]:
    """The whole OpenAPI document, loaded once per process."""
    if not SPEC_PATH.exists():
        raise FileNotFoundError(
            f"OpenAI OpenAPI spec not found at {SPEC_PATH}: shared/ must sit beside the "
            "repository, or BEARPAW_SHARED_DIR name it"
        )
    with SPEC_PATH.open("rb") as fh:
        document = yaml.load(fh, Loader=_Loader)  # noqa: S506 - a safe loader either way
    document["components"]["schemas"] = _nullable_as_31(document["components"]["schemas"])
    return document


@cache
def _registry() -> Registry:
    resource = Resource.from_contents(spec(), default_specification=DRAFT202012)
    return Registry().with_resource(SPEC_URI, resource)


@cache
def validator(name: str) -> Draft202012Validator:
    """A validator for `#/components/schemas/<name>` (no format assertions)."""
    if name not in spec()["components"]["schemas"]:
        raise KeyError(f"no component schema named {name!r} in {SPEC_PATH.name}")
    return Draft202012Validator(
        {"$ref": f"{SPEC_URI}#/components/schemas/{name}"}, registry=_registry()
    )


def _branch_errors(error: ValidationError) -> list[ValidationError]:
    """For an anyOf/oneOf failure, the errors of the branch the value was meant for.

    The spec's unions are tagged by a `type` const, so the intended branch is the
    one whose failures do not include the tag itself; among those, the one with
    the fewest failures. Without this, a bad `response.completed` event would be
    reported as "not valid under any of the given schemas" and nothing more.
    """
    by_branch: dict[int, list[ValidationError]] = {}
    for sub in error.context or []:
        by_branch.setdefault(sub.relative_schema_path[0], []).append(sub)
    if not by_branch:
        return [error]

    def tag_mismatch(errors: list[ValidationError]) -> bool:
        return any(
            list(e.relative_path) == ["type"] or e.validator == "type" and not e.relative_path
            for e in errors
        )

    candidates = [errs for errs in by_branch.values() if not tag_mismatch(errs)]
    chosen = min(candidates or by_branch.values(), key=len)
    out: list[ValidationError] = []
    for sub in chosen:
        out += _branch_errors(sub) if sub.validator in ("anyOf", "oneOf") else [sub]
    return out


def _describe(error: ValidationError) -> str:
    where = error.json_path
    schema_at = "/".join(str(p) for p in error.absolute_schema_path)
    return f"at {where}: {error.message} (schema path: {schema_at})"


def errors(name: str, value: Any) -> list[str]:
    """Every way `value` fails the component schema `name`; empty if it matches."""
    found = []
    for error in validator(name).iter_errors(value):
        if error.validator in ("anyOf", "oneOf") and error.context:
            found += [_describe(e) for e in _branch_errors(error)]
        else:
            found.append(_describe(error))
    return found


def assert_matches(name: str, value: Any) -> None:
    """Fail (AssertionError) naming each path of `value` that breaks schema `name`."""
    problems = errors(name, value)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AssertionError(f"value does not match #/components/schemas/{name}:\n  {shown}{more}")
