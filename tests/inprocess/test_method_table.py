"""One method table (service/api/methods.py) for every front end: every RPC our services
declare is in it, and what it says is what the server does. Each of its HTTP routes is served,
and under a bearer token each route of a protected class answers 401 without the token while
health routes answer. gRPC's token check and admission read the same table (their behaviour is
in test_auth_and_access.py and test_admission_and_draining.py)."""

from __future__ import annotations

import http.client

import pytest
from fakes.engine import Engines
from grpc_health.v1 import health_pb2

from inprocess.harness import InProcessServer, fake_repo
from visionserve.inference import grpc_service_pb2 as kpb
from visionserve.service.api.methods import HEALTH, METHODS, Access, access_class
from visionserve.v1 import visionserve_pb2 as pb

TOKEN = "table-token"


def rpcs(descriptor) -> set[str]:
    return {f"/{service.full_name}/{m.name}" for service in descriptor.services_by_name.values()
            for m in service.methods}


def test_every_rpc_of_every_service_is_in_the_table():
    declared = rpcs(kpb.DESCRIPTOR) | rpcs(pb.DESCRIPTOR) | rpcs(health_pb2.DESCRIPTOR)
    table = {f"/{m.service}/{m.name}" for m in METHODS if m.service}
    assert declared and declared == table
    assert access_class(f"/{HEALTH}/Check") is Access.HEALTH
    assert access_class("/grpc.reflection.v1alpha.ServerReflection/X") is Access.METADATA


ROUTES = [(m.name, m.access, verb, path) for m in METHODS for verb, path in m.routes]


def request(port: int, verb: str, path: str, token: str = "") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(verb, path.format(model="lenet5", version="1"), body=b"",
                     headers={"Authorization": f"Bearer {token}"} if token else {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """One server for the module: a token, every class protected but health."""
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN)
    repo = fake_repo(tmp_path_factory.mktemp("repo"), ("lenet5",))
    srv = InProcessServer(repo, "--auth-token-file", str(token_file), engines=Engines())
    yield srv
    srv.stop()


@pytest.mark.parametrize(("name", "access", "verb", "path"), ROUTES,
                         ids=[f"{v} {p}" for _, _, v, p in ROUTES])
def test_each_route_is_served_under_its_access_class(guarded, name, access, verb, path):
    status, body = request(guarded.http_port, verb, path)
    if access is Access.HEALTH:
        assert status == 200, body[:200]
    else:
        assert status == 401 and f"{name} needs a bearer token".encode() in body, body[:200]
    status, body = request(guarded.http_port, verb, path, TOKEN)
    assert status not in (401, 404, 405), (status, body[:200])  # served (an empty body may
    # be a 400: what matters is that the route exists and the token opened it)
