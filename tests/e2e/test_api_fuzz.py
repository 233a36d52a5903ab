"""Property-based fuzzing of the whole REST API (schemathesis over /v1/openapi.json), against the
real ASGI app under uvicorn on the test database, with the keys of two organizations: generated
and boundary inputs, then stateful sequences that follow the schema's links. Bounded in time.

Checks: no 5xx; every response in a documented status, content type and schema; every request
the schema forbids (a wrong type, a missing field, a value out of its documented range) refused
with a 4xx; a method an operation does not have answered 405 with its Allow header. The
inference endpoints take part (no engine runs: an admitted request answers its documented 503);
key revocation is left out (a run would revoke its own key). Accepting every request the schema
allows is not checked: like OpenAI's, the API refuses some well-formed requests with a 400
(a model that does not exist, a dataset with too few examples).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GatewayProcess, make_tenant

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
SECONDS_PER_ORGANIZATION = int(os.environ.get("TUNEPLEX_FUZZ_SECONDS", "45"))


def test_the_api_survives_property_based_fuzzing(test_database_url, tmp_path):
    tenants = [make_tenant("FuzzA"), make_tenant("FuzzB")]
    # Thousands of requests a minute: the per-organization API rate would answer most with 429.
    server = GatewayProcess(database_url=test_database_url, engine=None,
                            extra_env={"TUNEPLEX_ORG_API_RATE_LIMIT": "0"})
    try:
        for tenant in tenants:
            report = tmp_path / f"{tenant.organization.slug}.xml"
            result = subprocess.run(
                [str(Path(sys.executable).parent / "st"), "run", f"{server.url}/v1/openapi.json",
                 "-H", f"Authorization: Bearer {tenant.owner_key}",
                 "--checks", "not_a_server_error,response_schema_conformance,"
                             "status_code_conformance,content_type_conformance,"
                             "negative_data_rejection,unsupported_method,"
                             "allow_header_conformance",
                 "--exclude-path-regex", r"/revoke$",
                 "--max-time", str(SECONDS_PER_ORGANIZATION), "--max-examples", "15",
                 "--continue-on-failure", "--no-shrink", "--seed", "20261129",
                 "--report", "junit", "--report-junit-path", str(report)],
                capture_output=True, text=True, timeout=SECONDS_PER_ORGANIZATION + 120)
            summary = result.stdout[-6000:]
            assert result.returncode == 0, summary
            counted = re.search(r"(\d+) generated, (\d+) passed", summary)
            assert counted and counted[1] == counted[2] and int(counted[1]) > 100, summary
        log = server.log_path.read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop()
