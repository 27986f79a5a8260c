"""schemathesis against openapi.yaml: the relay's own endpoints answer as described, never 500."""

import os

import pytest
import schemathesis
from conftest import ROOT, auth
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

# schemathesis's pytest plugin does not run under this pytest, so its strategies drive
# plain hypothesis tests, one per operation in the description.
SCHEMA = schemathesis.openapi.from_path(os.path.join(ROOT, "openapi.yaml"))
OPERATIONS = [
    (path, method) for path, item in SCHEMA.raw_schema["paths"].items() for method in item
]
# A date range past 100 days (or backwards) is valid per-field but refused as a whole,
# which OpenAPI cannot express; the 400 it gets is documented.
CROSS_FIELD_RULES = {"/v1/dashboard/billing/usage"}
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_relay_api_matches_its_description(app, key, fake, path, method):
    """Every generated call gets a documented status, content type and body shape."""
    SCHEMA.app = app
    operation = SCHEMA[path][method]
    excluded = [positive_data_acceptance] if path in CROSS_FIELD_RULES else []

    @SETTINGS
    @given(case=operation.as_strategy())
    def check(case):
        response = case.call(headers=auth(key))
        case.validate_response(response, headers=auth(key), excluded_checks=excluded)

    check()
