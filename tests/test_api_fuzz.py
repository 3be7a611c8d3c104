"""schemathesis against the server's OpenAPI schema: generated requests (valid and invalid) to every
operation must never get a server error, and answers must match the documented schemas.

Every schemathesis check runs but positive_data_acceptance: some limits depend on the served data and
cannot be written into the schema (a feature index below the SAE's d_sae, a prompt's length in
tokens), and the server rightly answers a schema-valid request that breaks them with a 422.
Bounded for CI: a fixed number of examples per operation and mode, derandomised (the same cases every
run). Half the valid generated cases are pointed at the served SAE (random ids would all be 404s). The
operations are driven from one test with Hypothesis directly (schemathesis' pytest fixture loader
does not run under this project's pytest 9).
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import positive_data_acceptance

from sae_kit.server.app import create_app
from tiny_served import D_SAE, build_served_root

EXAMPLES = 20  # per operation and generation mode
SERVED = "saes.main"
TOKEN = "fuzz-token"  # steering needs it, so schemathesis also checks that a wrong one is refused


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    app = create_app(build_served_root(tmp_path_factory.mktemp("fuzz")), api_token=TOKEN)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def point_at_served_sae(case) -> None:
    """Name the served SAE and one of its features where the case names an SAE or a feature."""
    if case.path_parameters and "sae_id" in case.path_parameters:
        case.path_parameters["sae_id"] = SERVED
        if isinstance(case.path_parameters.get("index"), int):
            case.path_parameters["index"] %= D_SAE
    if isinstance(case.body, dict):
        if isinstance(case.body.get("sae"), str):
            case.body["sae"] = SERVED
        for feature in case.body.get("features") or []:
            if isinstance(feature, dict) and isinstance(feature.get("sae"), str):
                feature["sae"] = SERVED
                if isinstance(feature.get("index"), int):
                    feature["index"] %= D_SAE


@pytest.mark.timeout(600)  # ~20 s on 2 shared cores; the bound keeps a runaway case from stalling CI
def test_no_server_errors_and_documented_answers(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        for mode in schemathesis.GenerationMode:
            @given(case=operation.as_strategy(generation_mode=mode), served=st.booleans())
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case, served):
                if served and mode == schemathesis.GenerationMode.POSITIVE:
                    point_at_served_sae(case)
                # Steering and explaining a feature take the server's token.
                tokened = case.operation.label == "POST /api/steer" or case.operation.label.endswith("/explain")
                headers = {"Authorization": f"Bearer {TOKEN}"} if tokened else None
                response = case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])
                statuses.setdefault(operation.label, set()).add(response.status_code)

            try:
                check()
            except Unsatisfiable:
                # No invalid input exists for an operation without parameters (GET /api/health).
                assert mode == schemathesis.GenerationMode.NEGATIVE
    # The two token-guarded operations need a body random generation rarely hits: one valid call each,
    # validated against the schema like the generated ones.
    known_good = {"POST /api/steer": {"body": {"prompt": "Once", "max_new_tokens": 2,
                                               "features": [{"sae": SERVED, "index": 1, "strength": 2.0}]}},
                  "POST /api/saes/{sae_id}/features/{index}/explain": {
                      "path_parameters": {"sae_id": SERVED, "index": 1}, "body": {"explainer": "token-rule"}}}
    for operation in operations:
        if operation.label in known_good:
            case = operation.Case(media_type="application/json", **known_good[operation.label])
            response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"},
                                              excluded_checks=[positive_data_acceptance])
            statuses.setdefault(operation.label, set()).add(response.status_code)
    # Every operation was reached and answered successfully at least once.
    assert {label for label, seen in statuses.items() if 200 in seen} == {operation.label for operation in operations}, {k: v for k, v in statuses.items() if 200 not in v}
