"""Parsing a ConsensusFit: defaults, refusals naming the field, and the fingerprint."""

import json

import pytest

from consensusfit.runner import spec as specs
from consensusfit.runner.errors import BadInput

MINIMAL = {"data": {"uri": "s3://b/d/", "groupColumn": "g"}, "model": {"formula": "y ~ 1"}}


def test_defaults_fill_everything_optional():
    fit = specs.parse({"apiVersion": "consensusfit.dev/v1alpha1", "kind": "ConsensusFit",
                       "metadata": {"name": "a", "namespace": "n"}, "spec": MINIMAL})
    assert (fit.name, fit.namespace, fit.shards) == ("a", "n", 1)
    assert fit.sampler == specs.DEFAULTS["sampler"]
    assert fit.combine == {
        "method": "ep", "groupParameters": "resample", "maxRounds": 8, "damping": 0.5, "pilotShare": 0.15,
        "tolerance": {"mean": 0.05, "sd": 0.05},
    }
    assert fit.global_sites is None and fit.group_column == "g"


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"data": {}}, "spec.data.uri is required"),
        ({"shards": 0}, "spec.shards must be an integer >= 1"),
        ({"shards": True}, "spec.shards must be an integer"),
        ({"model": {"formula": "y ~ 1", "python": {"uri": "m.py", "function": "f"}}}, "exactly one of formula or python"),
        ({"model": {}}, "exactly one of formula or python"),
        ({"model": {"python": {"uri": "m.py"}}}, "python needs uri and function"),
        ({"model": {"formula": "y ~ 1", "family": "gamma"}}, "family 'gamma' is not one of"),
        ({"model": {"formula": "y ~ 1", "globalSites": "mu"}}, "globalSites must be a list"),
        ({"sampler": {"chains": 0}}, "spec.sampler.chains must be an integer >= 1"),
        ({"sampler": {"targetAcceptProb": 1.0}}, "targetAcceptProb must be in (0, 1)"),
        ({"combine": {"method": "average"}}, "spec.combine.method 'average' is not one of"),
        ({"combine": {"groupParameters": "drop"}}, "groupParameters 'drop' is not one of"),
        ({"combine": {"maxRounds": 0}}, "spec.combine.maxRounds must be an integer >= 1"),
        ({"combine": {"damping": 0}}, "spec.combine.damping must be in (0, 1]"),
        ({"combine": {"pilotShare": 1.5}}, "spec.combine.pilotShare must be in (0, 1]"),
        ({"combine": {"tolerance": {"mean": -1, "sd": 0.1}}}, "spec.combine.tolerance needs positive mean and sd"),
    ],
)
def test_refusals_name_the_field(change, reason):
    with pytest.raises(BadInput, match=reason.replace("(", r"\(").replace(")", r"\)")):
        specs.parse({**MINIMAL, **change})


def test_wrong_kind_and_bad_yaml_are_refused():
    with pytest.raises(BadInput, match="expected kind ConsensusFit"):
        specs.parse({"kind": "Job", "spec": MINIMAL})
    with pytest.raises(BadInput, match="not valid YAML"):
        specs.loads("spec: [unclosed")


def test_fingerprint_covers_what_changes_the_answer_only():
    base = specs.parse(MINIMAL)
    assert base.fingerprint() == specs.loads(json.dumps(MINIMAL)).fingerprint()
    for changed in ({"shards": 2}, {"sampler": {"seed": 1}}, {"model": {"formula": "y ~ x"}},
                    {"data": {"uri": "s3://b/other/", "groupColumn": "g"}}, {"combine": {"method": "swiss"}}):
        assert specs.parse({**MINIMAL, **changed}).fingerprint() != base.fingerprint()
    for same in ({"output": {"uri": "s3://elsewhere/"}}, {"runner": {"image": "other"}}):
        assert specs.parse({**MINIMAL, **same}).fingerprint() == base.fingerprint()


def test_load_reads_files_json_and_refuses_missing(tmp_path):
    path = tmp_path / "fit.yaml"
    path.write_text(json.dumps({"spec": MINIMAL}))
    fit, base = specs.load(str(path))
    assert fit.group_column == "g" and base == str(tmp_path)
    assert specs.load(json.dumps(MINIMAL))[0].fingerprint() == fit.fingerprint()
    with pytest.raises(BadInput, match="does not exist"):
        specs.load(str(tmp_path / "nope.yaml"))


def test_json_numbers_in_exponent_form_stay_numbers():
    """The operator and the local pipeline pass the spec as JSON, which writes 0.00001 as 1e-05:
    YAML 1.1 would read that as a string."""
    document = {"spec": {**MINIMAL, "shards": 2, "combine": {"tolerance": {"mean": 1e-05, "sd": 1e-05}}}}
    fit = specs.loads(json.dumps(document))
    assert fit.combine["tolerance"] == {"mean": 1e-05, "sd": 1e-05}
    assert specs.loads("{spec: {data: {uri: x}, model: {formula: 'y ~ 1'}}}").data == {"uri": "x"}
