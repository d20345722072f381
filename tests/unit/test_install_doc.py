"""docs/install.md stays true to the code and the chart.

* Every ```json block parses and is labelled (``<!-- kind: name -->`` right above it).
* The IAM policies grant what the code calls: the Data Pipeline operations are read off
  the shared client (``DataPipelineClient._call("Op", ...)``) and the components' calls of
  its methods; S3, RDS and Redshift calls off the botocore method names the code calls.
  Data Pipeline and S3 actions must match exactly (least privilege), the rest be covered.
* The trust policies name ServiceAccounts through placeholders, never release ``dptr``,
  and the doc's rule for the operator's ServiceAccount is the chart's.
* The first-task walk-through fits together: its values pass the chart's schema, its
  TaskRunner the CRD, its pipeline definition the local Data Pipeline service's checks
  (botocore's model and the definition rules, no server), and the worker group, images,
  printer columns and the trimmed sidecar policy agree with each other.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore import xform_name
from botocore.session import get_session

from dptr_common.models import TaskRunner
from dptr_common.render import RUNNER_TOKEN_AUDIENCE
from dptr_datapipeline.definition import Definition, definition_file_to_api
from dptr_datapipeline.model import validate_request

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "install.md"
CHART = REPO / "charts" / "dptr"
CLIENT = REPO / "common" / "dptr_common" / "datapipeline.py"

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_MARKER = re.compile(r"<!--\s*([\w-]+):\s*([^>]*?)\s*-->\s*\Z")
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")

#: S3 operations whose IAM action is not ``s3:<Operation>`` (Service Authorization Reference).
S3_ACTION_OF = {
    "ListObjectsV2": "s3:ListBucket",
    "ListObjects": "s3:ListBucket",
    "HeadObject": "s3:GetObject",
    "HeadBucket": "s3:ListBucket",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
}
#: S3 actions on a bucket (their Resource is the bucket ARN, not bucket/key).
S3_BUCKET_ACTIONS = {"s3:ListBucket"}
#: The identities, and the code that runs as each: the operator's pods, and every dptr
#: container of a task pod (sidecar, fetch-script, stage-in, Exists, dptr-activity).
IDENTITIES = {"operator": ("operator",), "task-pods": ("sidecar", "activities")}


# --------------------------------------------------------------------------- the doc


def _doc() -> str:
    return DOC.read_text()


def _blocks(lang: str) -> Iterator[tuple[str | None, str, str]]:
    """(marker kind, marker value, body) of every ``lang`` fence, in order."""
    text = _doc()
    for match in _FENCE.finditer(text):
        if match.group(1) != lang:
            continue
        marker = _MARKER.search(text[: match.start()].rstrip() + "\n")
        if marker is None:
            yield None, "", match.group(2)
        else:
            yield marker.group(1), marker.group(2), match.group(2)


def _labelled(kind: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for lang in ("json", "yaml"):
        for marker, name, body in _blocks(lang):
            if marker == kind:
                assert name not in found, f"two {kind} blocks named {name!r}"
                found[name] = json.loads(body) if lang == "json" else yaml.safe_load(body)
    return found


def _section(title: str) -> str:
    text = _doc()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    statements = policy["Statement"]
    return statements if isinstance(statements, list) else [statements]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _actions(policy: dict[str, Any]) -> set[str]:
    return {action for s in _statements(policy) if s["Effect"] == "Allow" for action in _as_list(s["Action"])}


# --------------------------------------------------------------------------- the code


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


def _attribute_calls(paths: Iterable[Path]) -> set[str]:
    """Names of every ``x.name(...)`` call in ``paths`` (docstrings and comments are not calls)."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
    return names


@cache
def _client_methods() -> dict[str, frozenset[str]]:
    """DataPipelineClient method -> the API operations it makes: its own
    ``self._call("Op", ...)`` and those of the methods it calls (``attempt_is_final``)."""
    cls = next(
        node
        for node in ast.walk(_tree(CLIENT))
        if isinstance(node, ast.ClassDef) and node.name == "DataPipelineClient"
    )
    direct: dict[str, set[str]] = {}
    calls: dict[str, set[str]] = {}
    for fn in cls.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        direct[fn.name], calls[fn.name] = set(), set()
        for node in ast.walk(fn):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "self"
            ):
                continue
            if node.func.attr == "_call":
                first = node.args[0]
                assert isinstance(first, ast.Constant), "DataPipelineClient._call names its operation first"
                direct[fn.name].add(first.value)
            else:
                calls[fn.name].add(node.func.attr)

    def ops(method: str, seen: frozenset[str] = frozenset()) -> set[str]:
        result = set(direct.get(method, ()))
        for callee in calls.get(method, set()) - seen:
            result |= ops(callee, seen | {method})
        return result

    return {m: frozenset(ops(m)) for m in direct if not m.startswith("_") and ops(m)}


@cache
def _botocore_methods(service: str) -> dict[str, str]:
    """botocore client method name -> API operation name, for ``service``."""
    model = get_session().get_service_model(service)
    return {xform_name(op): op for op in model.operation_names}


def _common_modules(paths: Iterable[Path]) -> set[Path]:
    """The dptr_common modules ``paths`` import, transitively (not the client itself: its
    own calls are the operations, attributed through the methods the components call)."""
    common = REPO / "common" / "dptr_common"
    found: set[Path] = set()
    todo = list(paths)
    while todo:
        path = todo.pop()
        for node in ast.walk(_tree(path)):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module == "dptr_common":
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and str(node.module).startswith("dptr_common."):
                names = [str(node.module).split(".")[1]]
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and path.parent == common:
                names = [str(node.module).split(".")[0]]  # relative, inside dptr_common
            for name in names:
                module = common / f"{name}.py"
                if module.exists() and module != CLIENT and module not in found:
                    found.add(module)
                    todo.append(module)
    return found


def _component_files(identity: str) -> list[Path]:
    own = [p for d in IDENTITIES[identity] for p in (REPO / d).rglob("*.py")]
    return sorted({*own, *_common_modules(own)})


@cache
def required_actions(identity: str) -> frozenset[str]:
    """The IAM actions the code running as ``identity`` needs."""
    files = _component_files(identity)
    called = _attribute_calls(files)
    actions: set[str] = set()
    for method, ops in _client_methods().items():
        if method in called:
            actions |= {f"datapipeline:{op}" for op in ops}
    for method, op in _botocore_methods("datapipeline").items():
        if method in called:  # a direct botocore call, not through the client
            actions.add(f"datapipeline:{op}")
    for method, op in _botocore_methods("s3").items():
        if method in called:
            actions.add(S3_ACTION_OF.get(op, f"s3:{op}"))
    for service in ("rds", "redshift"):
        for method, op in _botocore_methods(service).items():
            if method in called:
                actions.add(f"{service}:{op}")
    source = "\n".join(p.read_text() for p in files)
    if '"aws:kms"' in source:  # SSE-KMS writes (sse_args) and reads
        actions |= {"kms:GenerateDataKey", "kms:Decrypt"}
    return frozenset(actions)


# --------------------------------------------------------------------------- tests


def test_every_json_block_parses_and_is_labelled() -> None:
    blocks = list(_blocks("json"))
    assert len(blocks) >= 8
    for marker, name, body in blocks:
        assert marker is not None, f"a json block without a <!-- kind: name --> label:\n{body[:200]}"
        try:
            json.loads(body)
        except json.JSONDecodeError as exc:
            pytest.fail(f"the {marker} block {name!r} is not JSON: {exc}")
    kinds = {marker for marker, _, _ in blocks}
    assert kinds <= {"policy", "trust", "pipeline"}, kinds


def test_the_client_names_real_operations_and_the_code_is_scanned() -> None:
    known = set(_botocore_methods("datapipeline").values())
    ops = {op for method_ops in _client_methods().values() for op in method_ops}
    assert ops <= known, ops - known
    assert {"PollForTask", "ReportTaskProgress", "SetTaskStatus", "DescribeObjects"} <= ops
    # The scan sees the calls this page's table names (a broken scan would pass vacuously).
    assert {"datapipeline:PollForTask", "datapipeline:ReportTaskRunnerHeartbeat"} <= required_actions(
        "operator"
    )
    assert "s3:PutObject" in required_actions("task-pods")


@pytest.mark.parametrize("identity", sorted(IDENTITIES))
def test_policy_grants_what_the_code_calls_and_no_more_of_data_pipeline_and_s3(identity: str) -> None:
    policy = _labelled("policy")[identity]
    granted = _actions(policy)
    needed = required_actions(identity)
    assert not any("*" in action for action in granted), f"wildcard actions in the {identity} policy"
    missing = needed - granted
    assert not missing, f"the {identity} policy in docs/install.md lacks {sorted(missing)}"
    for prefix in ("datapipeline:", "s3:"):
        extra = {a for a in granted - needed if a.startswith(prefix)}
        assert not extra, f"the {identity} policy grants {sorted(extra)}, which its code never calls"


def test_the_policies_cover_the_calls_the_issue_named() -> None:
    assert {
        "s3:ListBucket",
        "s3:GetObject",
        "s3:PutObject",
        "s3:AbortMultipartUpload",
        "datapipeline:DescribeObjects",
        "datapipeline:ReportTaskProgress",
        "datapipeline:SetTaskStatus",
    } <= _actions(_labelled("policy")["task-pods"])
    assert {
        "datapipeline:PollForTask",
        "datapipeline:ReportTaskRunnerHeartbeat",
        "datapipeline:DescribeObjects",
    } <= _actions(_labelled("policy")["operator"])
    # The operator makes no S3 call at all.
    assert not {a for a in required_actions("operator") if a.startswith("s3:")}


def test_policy_resources_fit_their_actions() -> None:
    for name, policy in _labelled("policy").items():
        for statement in _statements(policy):
            actions = set(_as_list(statement["Action"]))
            resources = _as_list(statement["Resource"])
            if "datapipeline:PollForTask" in actions:
                assert actions == {"datapipeline:PollForTask"}
                assert "datapipeline:workerGroup" in json.dumps(statement.get("Condition", {})), (
                    "PollForTask is fenced by worker group"
                )
            s3 = {a for a in actions if a.startswith("s3:")}
            if not s3:
                continue
            assert s3 <= S3_BUCKET_ACTIONS or not s3 & S3_BUCKET_ACTIONS, (
                f"{name}: bucket and object actions in one statement"
            )
            for resource in resources:
                assert resource.startswith("arn:aws:s3:::"), (name, resource)
                bucket, slash, _key = resource.removeprefix("arn:aws:s3:::").partition("/")
                assert bucket, (name, resource)
                if s3 <= S3_BUCKET_ACTIONS:
                    assert not slash, f"{name}: {sorted(s3)} on {resource}, not on the bucket"
                else:
                    assert slash, f"{name}: {sorted(s3)} on {resource}, not on its objects"


def test_assumed_roles_are_covered() -> None:
    # awsauth assumes credentials.roleArn with botocore's AssumeRole fetcher.
    assert "AssumeRoleCredentialFetcher" in (REPO / "common" / "dptr_common" / "awsauth.py").read_text()
    policy = _labelled("policy")["assume-runner-role"]
    assert "sts:AssumeRole" in _actions(policy)
    assert all("*" not in r for s in _statements(policy) for r in _as_list(s["Resource"]))


def _conditions(statement: dict[str, Any]) -> dict[str, Any]:
    return statement.get("Condition", {}).get("StringEquals", {})


def test_irsa_trust_policies_name_service_accounts_by_placeholder() -> None:
    trusts = {
        name: policy
        for name, policy in _labelled("trust").items()
        if name.endswith(" irsa") or "task-account" in name
    }
    assert {"operator irsa", "task-pods irsa", "task-account irsa", "runner-role task-account"} <= set(trusts)
    for name, policy in trusts.items():
        for statement in _statements(policy):
            assert statement["Action"] == "sts:AssumeRoleWithWebIdentity", name
            assert ":oidc-provider/" in statement["Principal"]["Federated"], name
            conditions = _conditions(statement)
            (sub_key,) = [k for k in conditions if k.endswith(":sub")]
            (aud_key,) = [k for k in conditions if k.endswith(":aud")]
            assert sub_key.removesuffix(":sub") == aud_key.removesuffix(":aud")
            expected_aud = (
                RUNNER_TOKEN_AUDIENCE if name == "runner-role task-account" else "sts.amazonaws.com"
            )
            assert conditions[aud_key] == expected_aud, name
            for sub in _as_list(conditions[sub_key]):
                parts = sub.split(":")
                assert len(parts) == 4 and parts[:2] == ["system", "serviceaccount"], (name, sub)
                if name in ("operator irsa", "task-pods irsa"):
                    # Any release name: the namespace and the account are placeholders.
                    assert _PLACEHOLDER.match(parts[2]) and _PLACEHOLDER.match(parts[3]), (name, sub)


def test_pod_identity_trust_policies() -> None:
    trusts = _labelled("trust")
    for name in ("operator pod-identity", "task-pods pod-identity"):
        (statement,) = _statements(trusts[name])
        assert statement["Principal"] == {"Service": "pods.eks.amazonaws.com"}
        assert set(_as_list(statement["Action"])) == {"sts:AssumeRole", "sts:TagSession"}
        conditions = _conditions(statement)
        for tag in ("kubernetes-namespace", "kubernetes-service-account"):
            values = _as_list(conditions[f"aws:RequestTag/{tag}"])
            assert values and all(_PLACEHOLDER.match(v) for v in values), (name, tag, values)


def test_no_trust_subject_hard_codes_the_release_dptr() -> None:
    assert not re.search(r"system:serviceaccount:[^:\s\"]+:dptr(?![\w-])", _doc())


def _fullname(release: str, values: dict[str, Any]) -> str:
    """The chart's dptr.fullname and dptr.operatorServiceAccountName (_helpers.tpl)."""
    if values.get("operator", {}).get("serviceAccount", {}).get("name"):
        return str(values["operator"]["serviceAccount"]["name"])
    if values.get("fullnameOverride"):
        return str(values["fullnameOverride"])[:63].rstrip("-")
    name = values.get("nameOverride") or "dptr"
    full = release if name in release else f"{release}-{name}"
    return full[:63].rstrip("-")


def test_the_service_account_rule_is_the_charts() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    # The rule this test re-implements (if the chart changes it, change the doc and _fullname).
    assert "contains $name .Release.Name" in helpers
    assert 'printf "%s-%s" .Release.Name $name' in helpers
    assert 'default (include "dptr.fullname" .) .Values.operator.serviceAccount.name' in helpers
    text = _doc()
    start = text.index("\n### The ServiceAccounts\n")
    table = text[start : text.index("\n### ", start + 1)]
    rows = re.findall(r"^\| `([\w-]+)` \|\s*([^|]*?)\s*\| `([\w-]+)` \|$", table, re.M)
    assert len(rows) >= 4, rows
    for release, given, account in rows:
        values: dict[str, Any] = {}
        for key, value in re.findall(r"`([\w.]+): ([\w-]+)`", given):
            node = values
            *path, leaf = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
        assert _fullname(release, values) == account, (release, given)
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    sidecar_account = chart_values["sidecar"]["serviceAccount"]["name"]
    assert f"`{sidecar_account}` by default" in table


# ---------------------------------------------------------------- the first task


def _walkthrough_vars() -> dict[str, str]:
    """The walk-through's literal shell assignments, plus stand-ins for computed ones."""
    found = dict(
        re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=([\w./-]+)(?=\s|$)", _section("Your first task on EKS"))
    )
    return {
        "ACCOUNT_ID": "111122223333",
        "REGISTRY": "111122223333.dkr.ecr.us-east-1.amazonaws.com",
        "TAG": "0.1.0",
        "OPERATOR_SA": _fullname(found.get("RELEASE", "dptr"), {}),
        "SIDECAR_SA": "dptr-sidecar",
        **found,
    }


def _substitute(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"the walk-through uses ${name} before setting it"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def _first_task_runner() -> dict[str, Any]:
    return _labelled("taskrunner")["first-task"]


def _first_pipeline() -> dict[str, Any]:
    return _labelled("pipeline")["first-task"]


def test_the_first_taskrunner_fits_the_crd() -> None:
    runner = _first_task_runner()
    TaskRunner.from_k8s(runner)
    crd = yaml.safe_load((CHART / "crds" / "taskrunners.yaml").read_text())
    version = crd["spec"]["versions"][0]
    assert runner["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"

    def walk(value: Any, schema: dict[str, Any], where: str) -> None:
        if not isinstance(value, dict) or "properties" not in schema:
            return
        for key, item in value.items():
            assert key in schema["properties"], f"{where}.{key} is no field of the CRD"
            walk(item, schema["properties"][key], f"{where}.{key}")

    walk(runner["spec"], version["schema"]["openAPIV3Schema"]["properties"]["spec"], "spec")
    variables = _walkthrough_vars()
    assert runner["spec"]["workerGroup"] == variables["WORKER_GROUP"]
    assert runner["metadata"]["namespace"] == variables["TASK_NAMESPACE"]


def test_the_first_pipeline_definition_is_valid_and_targets_the_taskrunner() -> None:
    api = definition_file_to_api(_first_pipeline())
    validate_request("PutPipelineDefinition", {"pipelineId": "df-00627471SOVYZEXAMPLE", **api})
    definition = Definition.from_api(api["pipelineObjects"], api["parameterObjects"], api["parameterValues"])
    errors, warnings = definition.validate(api["pipelineObjects"])
    assert (errors, warnings) == ([], [])
    activities = [o for o in definition.objects if definition.type_of(o) == "ShellCommandActivity"]
    assert activities
    for activity in activities:
        assert definition.first(activity, "workerGroup") == _first_task_runner()["spec"]["workerGroup"]


def test_the_first_values_pass_the_charts_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    section = _section("Your first task on EKS")
    heredoc = re.search(r"cat > my-values\.yaml <<EOF\n(.*?)^EOF$", section, re.S | re.M)
    assert heredoc is not None
    given = yaml.safe_load(_substitute(heredoc.group(1), _walkthrough_vars()))
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(merge(defaults, given), schema)
    runner = _first_task_runner()
    namespace, worker_group = runner["metadata"]["namespace"], runner["spec"]["workerGroup"]
    assert namespace in given["operator"]["watch"]["namespaces"]
    assert worker_group in given["tenancy"]["workerGroups"][namespace]
    # The images the chart is given are the ones pushed, one per Dockerfile image target.
    pushed = re.search(r"for target in ([\w ]+); do", section)
    assert pushed is not None
    targets = set(pushed.group(1).split())
    dockerfile = (REPO / "Dockerfile").read_text()
    assert targets == set(re.findall(r"^FROM runtime AS (\w+)$", dockerfile, re.M))
    assert "docker build --platform linux/amd64 --target $target" in section
    registry = _walkthrough_vars()["REGISTRY"]
    for target in targets:
        assert given[target]["image"]["repository"] == f"{registry}/dptr/dptr-{target}"


def test_the_trimmed_first_task_policies_allow_its_calls() -> None:
    """Step 4's sed and jq, applied to the doc's policies, still let the first task poll
    its worker group and upload its logs where its pipelineLogUri says."""
    section = _section("Your first task on EKS")
    variables = _walkthrough_vars()
    pairs = [
        (placeholder, _substitute(value, variables))
        for placeholder, value in re.findall(r'-e "s\|([A-Z_]+)\|([^|"]*)\|g"', section)
    ]
    assert {"WORKER_GROUP", "LOG_BUCKET", "LOG_PREFIX", "OPERATOR_SA"} <= {p for p, _ in pairs}

    def fill(policy: dict[str, Any]) -> dict[str, Any]:
        text = json.dumps(policy)
        for placeholder, value in pairs:
            text = text.replace(placeholder, value)
        return json.loads(text)

    kept = set(re.findall(r'\.Sid == "(\w+)"', section))
    sidecar = fill(_labelled("policy")["task-pods"])
    assert kept <= {s["Sid"] for s in _statements(sidecar)}
    trimmed = [s for s in _statements(sidecar) if s["Sid"] in kept]
    assert {a for s in trimmed for a in _as_list(s["Action"])} >= {
        "datapipeline:ReportTaskProgress",
        "datapipeline:SetTaskStatus",
        "s3:PutObject",
        "s3:AbortMultipartUpload",
    }
    log_uri = fill(_first_pipeline())["objects"][0]["pipelineLogUri"]
    bucket, _, prefix = log_uri.removeprefix("s3://").partition("/")
    key = f"arn:aws:s3:::{bucket}/{prefix.rstrip('/')}/df-X/Hello/@Hello_1/@Hello_1_Attempt=1/StdOutput.gz"
    assert any(
        "s3:PutObject" in _as_list(s["Action"])
        and any(fnmatch.fnmatchcase(key, r) for r in _as_list(s["Resource"]))
        for s in trimmed
    ), f"the trimmed policy does not let the sidecar write {key}"
    operator = fill(_labelled("policy")["operator"])
    (poll,) = [s for s in _statements(operator) if "datapipeline:PollForTask" in _as_list(s["Action"])]
    patterns = _as_list(poll["Condition"]["StringLike"]["datapipeline:workerGroup"])
    assert any(fnmatch.fnmatchcase(_first_task_runner()["spec"]["workerGroup"], p) for p in patterns)


def test_short_names_and_printed_columns_are_the_crds() -> None:
    headers: set[tuple[str, ...]] = set()
    for crd_file, short in (("taskrunners.yaml", "tr"), ("pipelinetasks.yaml", "pt")):
        crd = yaml.safe_load((CHART / "crds" / crd_file).read_text())
        assert short in crd["spec"]["names"]["shortNames"]
        columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        headers.add(("NAME", *(c["name"].upper() for c in columns)))
    shown = {
        tuple(re.split(r"\s{2,}", line.strip()))
        for _, _, body in _blocks("text")
        for line in body.splitlines()
        if line.startswith("NAME ")
    }
    assert shown == headers, (shown, headers)
    section = _section("Your first task on EKS")
    assert "kubectl wait --for=condition=Ready tr/first" in section
    assert re.search(r"kubectl get pt -n \S+ -w", section)
