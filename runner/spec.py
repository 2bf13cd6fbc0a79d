"""The `ConsensusFit` spec as the runner sees it: parsed, defaulted and checked.

The same defaults are declared in the CRD's OpenAPI schema (`manifests/crd.yaml`); a test keeps the
two in step. Local mode has no API server to apply them, so the runner applies them itself, and
refuses what the API server would: a name or namespace that is not a DNS-1123 label (it becomes a
folder of the results' path), and a field the CRD's schema does not declare (read from the CRD
itself, so the accepted fields have one source). YAML aliases are refused: a manifest has no use
for them, and nested ones expand exponentially once the spec is copied or hashed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .contract import deep_merge
from .errors import BadInput
from .store.storage import NotFound, split_uri

REPOSITORY = Path(__file__).resolve().parents[1]  # the source checkout: the examples and the CRD
CRD = REPOSITORY / "manifests" / "crd.yaml"  # the CRD's one source (scripts/render.sh copies it)
# What Kubernetes requires of a namespace, and we of a fit's name (docs/contract.md: a folder of
# the results' path, and the prefix of its Jobs' names): lowercase letters, digits and '-'.
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

ONE_SHOT_METHODS = ("consensus", "gaussian", "swiss")  # runner/combine/methods.py
COMBINE_METHODS = ("ep",) + ONE_SHOT_METHODS  # ep: rounds over the shards (runner/combine/ep.py)
GROUP_PARAMETER_MODES = ("resample", "keep")
FAMILIES = ("gaussian", "bernoulli", "poisson", "negativebinomial")

DEFAULTS: dict[str, Any] = {
    "shards": 1,
    "model": {"family": "gaussian", "priors": {}},
    "sampler": {
        "warmup": 1000,
        "samples": 1000,
        "chains": 4,
        "seed": 0,
        "targetAcceptProb": 0.8,
        "maxTreeDepth": 10,
    },
    "combine": {
        "method": "ep",
        "groupParameters": "resample",
        # EP rounds (method ep): at most maxRounds rounds after the pilot, each site moved a share
        # `damping` of the way to its update, stopped once q's means move by less than
        # tolerance.mean of their SD and its SDs by less than tolerance.sd (relative), beyond
        # what Monte Carlo noise explains (runner/steps/update.py).
        "maxRounds": 8,
        "damping": 0.5,
        "pilotShare": 0.15,  # the pilot samples this share of the shards (at least one)
        "tolerance": {"mean": 0.05, "sd": 0.05},
    },
}

# The parts of the spec that change the answer: a shard fitted under another fingerprint is not
# part of this fit. Output location, pod settings and suspension do not change the answer. As in
# the CRD (where these fields are immutable), a changed combine method is a new fit.
FINGERPRINT_FIELDS = ("data", "shards", "model", "sampler", "combine")


@dataclass(frozen=True)
class FitSpec:
    """A checked spec. `raw` is the defaulted dict; the attributes are the parts the runner uses."""

    raw: dict
    name: str
    namespace: str

    @property
    def shards(self) -> int:
        return int(self.raw["shards"])

    @property
    def data(self) -> dict:
        return self.raw["data"]

    @property
    def model(self) -> dict:
        return self.raw["model"]

    @property
    def sampler(self) -> dict:
        return self.raw["sampler"]

    @property
    def combine(self) -> dict:
        return self.raw["combine"]

    @property
    def uses_rounds(self) -> bool:
        """EP rounds run (pilot, rounds, updates) instead of one sample step: method ep with
        more than one shard (one shard's posterior is the posterior)."""
        return self.combine["method"] == "ep" and self.shards > 1

    @property
    def pilot_shards(self) -> list[int]:
        """The shards the pilot samples: spec.combine.pilotShare of them, at least one, never all."""
        share = float(self.combine["pilotShare"])
        return list(range(min(self.shards - 1, max(1, round(share * self.shards)))))

    @property
    def round_settings(self) -> dict:
        """spec.sampler for EP rounds after the first: chains start where the last round's ended
        and keep their mass matrix, so warmup only re-tunes the step size (a quarter, 100 to 500)."""
        warmup = int(self.sampler["warmup"])
        return {**self.sampler, "warmup": min(warmup, max(100, min(500, warmup // 4)))}

    @property
    def output_uri(self) -> str | None:
        return self.raw.get("output", {}).get("uri")

    @property
    def shards_per_pod(self) -> int:
        """Shards one sample pod (or local process) takes: `spec.runner.shardsPerPod`."""
        return int(self.raw.get("runner", {}).get("shardsPerPod", 1))

    @property
    def group_column(self) -> str | None:
        return self.data.get("groupColumn")

    @property
    def global_sites(self) -> list[str] | None:
        """Sites the user declared global; None means: find them automatically."""
        return self.model.get("globalSites")

    def check_shard(self, shard: int) -> None:
        """Refuse a shard index this fit does not have, naming the valid range."""
        if not 0 <= shard < self.shards:
            raise BadInput(f"shard {shard} is out of range: the fit has {self.shards} shards (0..{self.shards - 1})")

    @property
    def seeds(self) -> "Seeds":
        """Every random stream of the fit, by name, from `spec.sampler.seed`."""
        return Seeds(int(self.sampler["seed"]))

    def fingerprint(self) -> str:
        """A short hash of everything that changes the answer (see FINGERPRINT_FIELDS)."""
        relevant = {key: self.raw.get(key) for key in FINGERPRINT_FIELDS}
        canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def shard_seed(seed: int, shard: int) -> int:
    """Independent, reproducible random streams per shard from one seed (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


# Offsets that set the streams apart: changing one changes every fit's draws.
_RESAMPLE_OFFSET = 7919  # the re-sampling streams: shard_seed(seed + 7919, k)
_COMBINE_ENTROPY = 0xC0B1  # the combination's stream: SeedSequence([seed, 0xC0B1])
_PILOT_SHARD = -1 % 2**32  # the pilot's stream: as a shard that no fit has


@dataclass(frozen=True)
class Seeds:
    """Every seed a fit uses, each a named stream of the one `spec.sampler.seed`.

    A stream depends only on the spec and the shard, never on how the steps ran (one process or
    a pod per shard, stages together or apart), so the files are the same either way.
    """

    seed: int

    @property
    def partition(self) -> int:
        """The seeded hash of the group keys (runner/data/balance.py)."""
        return self.seed

    def sample(self, shard: int) -> int:
        """Shard `shard`'s tempered NUTS (chains split from it)."""
        return shard_seed(self.seed, shard)

    def combine(self) -> np.random.Generator:
        """The random numbers of the combination methods (runner/combine/methods.py)."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, _COMBINE_ENTROPY]))

    @property
    def pilot(self) -> int:
        """EP's pilot run (NUTS on the pilot shards)."""
        return shard_seed(self.seed, _PILOT_SHARD)

    def tilted(self, round_: int, shard: int) -> int:
        """Shard `shard`'s NUTS in EP round `round_` (round 1 onwards)."""
        return int(np.random.SeedSequence([self.seed, shard, round_]).generate_state(1)[0])

    def resample(self, shard: int) -> int:
        """Shard `shard`'s adaptation run of the conditional re-sampling."""
        return shard_seed(self.seed + _RESAMPLE_OFFSET, shard)

    def resample_transitions(self, shard: int) -> int:
        """Shard `shard`'s re-sampling transitions, one key per combined draw split from it."""
        return self.resample(shard) + 1

    @property
    def reference(self) -> int:
        """The full-data reference fit (untempered NUTS, as one shard)."""
        return self.seed


def pod_shards(index: int, per_pod: int, total: int) -> list[int]:
    """The shards of pod `index` (a Job completion index) when pods take per_pod consecutive ones."""
    return list(range(index * per_pod, min((index + 1) * per_pod, total)))


def _require_int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadInput(f"spec.{where} must be an integer >= {minimum}, got {value!r}")
    return value


def check(spec: dict) -> None:
    """Refuse what the CRD schema would refuse, with one line naming the field."""
    data = spec.get("data")
    if not isinstance(data, dict) or not data.get("uri"):
        raise BadInput("spec.data.uri is required")
    _require_int(spec["shards"], "shards", 1)
    model = spec["model"]
    has_formula, has_python = bool(model.get("formula")), bool(model.get("python"))
    if has_formula == has_python:
        raise BadInput("spec.model needs exactly one of formula or python")
    if has_python:
        python = model["python"]
        if not isinstance(python, dict) or not python.get("uri") or not python.get("function"):
            raise BadInput("spec.model.python needs uri and function")
    if model["family"] not in FAMILIES:
        raise BadInput(f"spec.model.family {model['family']!r} is not one of {', '.join(FAMILIES)}")
    global_sites = model.get("globalSites")
    if global_sites is not None and (
        not isinstance(global_sites, list) or not all(isinstance(s, str) for s in global_sites)
    ):
        raise BadInput("spec.model.globalSites must be a list of site names")
    sampler = spec["sampler"]
    _require_int(sampler["warmup"], "sampler.warmup", 1)
    _require_int(sampler["samples"], "sampler.samples", 1)
    _require_int(sampler["chains"], "sampler.chains", 1)
    _require_int(sampler["seed"], "sampler.seed", 0)
    _require_int(sampler["maxTreeDepth"], "sampler.maxTreeDepth", 1)
    accept = sampler["targetAcceptProb"]
    if not isinstance(accept, (int, float)) or not 0 < accept < 1:
        raise BadInput(f"spec.sampler.targetAcceptProb must be in (0, 1), got {accept!r}")
    runner = spec.get("runner", {})
    if not isinstance(runner, dict):
        raise BadInput("spec.runner must be a mapping")
    _require_int(runner.get("shardsPerPod", 1), "runner.shardsPerPod", 1)
    combine = spec["combine"]
    if combine["method"] not in COMBINE_METHODS:
        raise BadInput(
            f"spec.combine.method {combine['method']!r} is not one of {', '.join(COMBINE_METHODS)}"
        )
    _require_int(combine["maxRounds"], "combine.maxRounds", 1)
    for name in ("damping", "pilotShare"):
        value = combine[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise BadInput(f"spec.combine.{name} must be in (0, 1], got {value!r}")
    tolerance = combine["tolerance"]
    if not isinstance(tolerance, dict) or not all(
        isinstance(tolerance.get(key), (int, float)) and tolerance[key] > 0 for key in ("mean", "sd")
    ):
        raise BadInput(f"spec.combine.tolerance needs positive mean and sd, got {tolerance!r}")
    if combine["groupParameters"] not in GROUP_PARAMETER_MODES:
        raise BadInput(
            f"spec.combine.groupParameters {combine['groupParameters']!r} is not one of "
            f"{', '.join(GROUP_PARAMETER_MODES)}"
        )


@functools.cache
def crd_schema() -> dict | None:
    """The CRD's schema of a whole `ConsensusFit`; None outside a source checkout (an installed
    runner, as in the image, is given specs that the API server checked against it)."""
    if not CRD.is_file():
        return None
    (version,) = yaml.safe_load(CRD.read_text())["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def refuse_unknown_fields(value: Any, schema: dict, path: str) -> None:
    """Refuse a key that `schema` (an OpenAPI schema of the CRD) does not declare, naming it, as
    the API server's strict field validation does. Where the schema lists no properties (as for
    `metadata`) or keeps unknown fields, any key is accepted."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        properties, values = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if properties is not None and key in properties:
                refuse_unknown_fields(item, properties[key], where)
            elif isinstance(values, dict):
                refuse_unknown_fields(item, values, where)
            elif properties is not None:
                known = ", ".join(properties)
                raise BadInput(f"{where}: unknown field ({path or 'a ConsensusFit'} has {known})")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            refuse_unknown_fields(item, schema["items"], f"{path}[{index}]")


def _dns_label(metadata: dict, field: str, default: str) -> str:
    value = metadata.get(field, default)
    if not isinstance(value, str) or not DNS_LABEL.fullmatch(value):
        raise BadInput(
            f"metadata.{field} {value!r} is not a DNS-1123 label (at most 63 lowercase letters, "
            "digits and '-', starting and ending with a letter or digit), as Kubernetes requires"
        )
    return value


def parse(document: dict) -> FitSpec:
    """Accept a whole `ConsensusFit` object or only its spec; refuse fields the CRD does not
    declare; apply defaults; check."""
    if not isinstance(document, dict):
        raise BadInput("the fit must be a mapping")
    schema = crd_schema()
    if "spec" in document:
        if document.get("kind", "ConsensusFit") != "ConsensusFit":
            raise BadInput(f"expected kind ConsensusFit, got {document.get('kind')!r}")
        metadata = document.get("metadata") or {}
        body = document["spec"]
        if schema is not None:
            refuse_unknown_fields(document, schema, "")
    else:
        metadata, body = {}, document
        if schema is not None:
            refuse_unknown_fields(document, schema["properties"]["spec"], "spec")
    if not isinstance(metadata, dict):
        raise BadInput("metadata must be a mapping")
    if not isinstance(body, dict):
        raise BadInput("spec must be a mapping")
    spec = deep_merge(DEFAULTS, body)
    check(spec)
    return FitSpec(
        raw=spec,
        name=_dns_label(metadata, "name", "fit"),
        namespace=_dns_label(metadata, "namespace", "default"),
    )


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing aliases (`*name`, `<<: *name`) where they appear."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            alias = self.peek_event()
            raise BadInput(
                f"the fit uses the YAML alias *{alias.anchor} (line {alias.start_mark.line + 1}): "
                "aliases are not accepted, write the value out"
            )
        return super().compose_node(parent, index)


def loads(text: str) -> FitSpec:
    """Parse JSON (an object: what the operator and the local pipeline pass) or YAML text.

    JSON is read as JSON, not as YAML: YAML 1.1 reads JSON's `1e-05` as a string.
    """
    if text.lstrip().startswith("{"):
        try:
            return parse(json.loads(text))
        except json.JSONDecodeError:
            pass  # YAML flow mappings start with "{" too
    try:
        document = yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as error:
        raise BadInput(f"the fit is not valid YAML: {error}".splitlines()[0]) from None
    return parse(document)


def load(argument: str) -> tuple[FitSpec, str]:
    """A spec from literal JSON, a local file or an object-store URI, and the folder it came from
    (against which relative paths in the spec are resolved)."""
    if argument.lstrip().startswith("{"):
        return loads(argument), "."
    if "://" in argument:
        store, key = split_uri(argument)
        try:
            return loads(store.read_bytes(key).decode()), "."
        except NotFound:
            raise BadInput(f"spec {argument} does not exist") from None
    path = Path(argument)
    if not path.is_file():
        raise BadInput(f"spec file {argument} does not exist")
    return resolve_local_paths(loads(path.read_text()), str(path.parent)), str(path.parent)


def _absolute(uri: str, base: str) -> str:
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str((Path(base) / uri).resolve())


def resolve_local_paths(spec: FitSpec, base: str) -> FitSpec:
    """The spec with relative local paths (data, Python model) made absolute against `base`, the
    manifest's folder, so every step sees the same files wherever it runs."""
    raw = copy.deepcopy(spec.raw)
    raw["data"]["uri"] = _absolute(raw["data"]["uri"], base)
    if raw["model"].get("python"):
        raw["model"]["python"]["uri"] = _absolute(raw["model"]["python"]["uri"], base)
    return FitSpec(raw=raw, name=spec.name, namespace=spec.namespace)
