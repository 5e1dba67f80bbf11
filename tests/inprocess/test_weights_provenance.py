"""Every surface that shows a model says where its weights came from, as its export recorded it
(``export.json``): a random-weight model never answers in the same confident table as a real one
without saying its labels mean nothing. The CLI's table and JSON are in tests/test_cli.py."""

from __future__ import annotations

import json
import urllib.request

from inprocess.harness import InProcessServer, fake_repo
from visionserve.inference import grpc_service_pb2 as kpb
from visionserve.inference import grpc_service_pb2_grpc as kpb_grpc
from visionserve.v1 import visionserve_pb2 as pb

RECORDS = {"lenet5": {"kind": "random", "source": "seeded random init (seed 0)"},
           "resnet18": {"kind": "pretrained", "source": "ImageNet-1k weights from a package"}}
SAYS = {"lenet5": "random weights (seeded random init (seed 0)): answers and labels are "
                  "meaningless",
        "resnet18": "pretrained: ImageNet-1k weights from a package",
        "mobilenet_v3_small": "unknown (no export.json: not made by visionserve export)"}


def rest(srv: InProcessServer, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}{path}", timeout=30) as reply:
        return json.load(reply)


def test_every_surface_says_where_a_versions_weights_came_from(engines, tmp_path):
    repo = fake_repo(tmp_path / "repo")
    for name, record in RECORDS.items():
        (repo / name / "1" / "export.json").write_text(json.dumps({"weights_source": record}))
    srv = InProcessServer(repo, engines=engines)
    try:
        kserve = kpb_grpc.GRPCInferenceServiceStub(srv.channel)
        listed = {m.name: m for m in srv.stub.ListModels(pb.ListModelsRequest()).models}
        for name, says in SAYS.items():
            assert srv.stub.GetModel(pb.GetModelRequest(model=name)).versions[0].weights == says
            assert listed[name].versions[0].weights == says
            config = kserve.ModelConfig(kpb.ModelConfigRequest(name=name), timeout=30).config
            assert config.parameters["weights"].string_value == says
            assert rest(srv, f"/v2/models/{name}")["parameters"]["weights"] == says
            assert rest(srv, f"/v2/models/{name}/config")["parameters"]["weights"] == \
                {"string_value": says}
    finally:
        srv.stop()
