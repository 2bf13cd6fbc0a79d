"""The CRD: its defaults equal the runner's, its rules and columns are there, its schema is structural."""

from __future__ import annotations

from cfit_support import apply_defaults, crd, spec_schema

from consensusfit.runner.spec import DEFAULTS, parse

MINIMAL = {"data": {"uri": "s3://b/d/"}, "model": {"formula": "y ~ 1"}, "output": {"uri": "s3://b/f/"}}


def test_crd_defaults_equal_the_runner_defaults():
    defaulted = apply_defaults(MINIMAL, spec_schema())
    runner_view = parse(MINIMAL).raw
    # Same values, and no default on either side that the other lacks (dict equality per field).
    assert {key: defaulted[key] for key in runner_view} == runner_view
    assert set(DEFAULTS) <= set(runner_view)


def test_optional_operator_fields_have_defaults():
    defaulted = apply_defaults(MINIMAL, spec_schema())
    assert defaulted["suspend"] is False
    assert defaulted["maxRetriesPerShard"] == 3
    # No GPU by default: the operator's runner defaults give one to the steps that sample only.
    assert defaulted["runner"] == {"shardsPerPod": 1}
    assert "ttlSecondsAfterFinished" not in defaulted  # absent: keep the fit, as a Job does


def test_names_scope_and_subresources():
    doc = crd()
    assert doc["metadata"]["name"] == "consensusfits.consensusfit.dev"
    assert doc["spec"]["scope"] == "Namespaced"
    assert doc["spec"]["names"]["shortNames"] == ["cfit"]
    (version,) = doc["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Phase": ".status.phase", "Done": ".status.shards.succeeded",
                       "Shards": ".status.shards.total", "Round": ".status.rounds.current",
                       "R-hat max": ".status.diagnostics.rhatMax", "Age": ".metadata.creationTimestamp"}


def test_the_status_schema_keeps_every_field_the_operator_writes():
    """The API server prunes what a structural schema does not name: status.rounds included."""
    from cfit_support import ep_fit, job, pod, update_report

    from consensusfit.operator import planner
    from consensusfit.operator.config import Config

    status = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(planner.STATUS_FIELDS) <= set(status)
    jobs = {s: job(s, "Complete", succeeded=3) for s in ("partition", "pilot", "round-1", "update-1")}
    result = planner.plan(ep_fit(), jobs, [pod("update-1", report=update_report(1, False))],
                          planner.parse_time("2026-01-01T00:10:00+00:00"), Config())
    assert set(result.state["rounds"]) == set(status["rounds"]["properties"])


def test_cel_rules_guard_model_choice_and_immutability():
    spec = spec_schema()["properties"]
    model_rules = [r["rule"] for r in spec["model"]["x-kubernetes-validations"]]
    assert "has(self.formula) != has(self.python)" in model_rules
    for field in ("data", "shards", "model", "sampler", "combine", "output"):
        assert "self == oldSelf" in [r["rule"] for r in spec[field]["x-kubernetes-validations"]], field
    assert spec["shards"]["minimum"] == 1
    for field in ("runner", "suspend", "ttlSecondsAfterFinished"):
        assert "x-kubernetes-validations" not in spec[field], field


def test_the_model_field_says_python_files_are_trusted_code():
    model = spec_schema()["properties"]["model"]
    assert "trusted code" in model["description"] and "trusted code" in model["properties"]["python"]["description"]


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    """Every node has a type (or is int-or-string / preserves unknown fields), as the API requires."""
    root = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path


def test_every_kind_of_step_has_the_pod_settings_of_spec_runner_and_nothing_fit_wide():
    from consensusfit.operator import children

    runner = spec_schema()["properties"]["runner"]["properties"]
    steps = runner["steps"]["properties"]
    assert tuple(steps) == children.SETTINGS_STEPS
    fit_wide = {"steps", "shardsPerPod", "parallelism"}
    for step, schema in steps.items():
        assert schema["properties"] == {key: value for key, value in runner.items() if key not in fit_wide}, step
    assert runner["parallelism"]["minimum"] == 1 and "default" not in runner["parallelism"]
    assert set(runner["podSecurityContext"]["properties"]) == set(children.POD_SECURITY_FIELDS)
