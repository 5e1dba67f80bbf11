"""Our KServe v2 protobuf is wire-compatible with Triton's: for every message and RPC we
define, names, field numbers, types and labels equal those in the descriptors tritonclient
ships. Ours are compiled from the .proto sources into a separate DescriptorPool, because both
define `inference.*` and cannot share the default pool."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from conftest import ROOT

service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pool.DescriptorPool:
    out = tmp_path_factory.mktemp("descriptors") / "set.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto",
                    "--include_imports", f"--descriptor_set_out={out}",
                    "proto/visionserve/inference/grpc_service.proto"], check=True, cwd=ROOT)
    files = descriptor_pb2.FileDescriptorSet.FromString(Path(out).read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    return pool


def _messages(desc):
    yield desc
    for nested in desc.nested_types:
        yield from _messages(nested)


def _field_signature(field) -> tuple:
    return (field.number, field.type, field.is_repeated,
            field.message_type.full_name if field.message_type else "",
            field.enum_type.full_name if field.enum_type else "",
            field.containing_oneof.name if field.containing_oneof else "")


def test_every_message_field_matches_tritonclient(ours):
    theirs = service_pb2.DESCRIPTOR.pool
    file = ours.FindFileByName("visionserve/inference/grpc_service.proto")
    deps = [ours.FindFileByName("visionserve/inference/model_config.proto")]
    checked = 0
    for f in [file, *deps]:
        for top in f.message_types_by_name.values():
            for message in _messages(top):
                reference = theirs.FindMessageTypeByName(message.full_name)
                for field in message.fields:
                    assert field.name in reference.fields_by_name, \
                        f"{message.full_name}.{field.name} is not in tritonclient's protocol"
                    assert _field_signature(field) == \
                        _field_signature(reference.fields_by_name[field.name]), \
                        f"{message.full_name}.{field.name} differs from tritonclient's"
                    checked += 1
        for enum in f.enum_types_by_name.values():
            reference = theirs.FindEnumTypeByName(enum.full_name)
            assert {v.name: v.number for v in enum.values}.items() <= \
                {v.name: v.number for v in reference.values}.items()
    assert checked > 100


def test_every_rpc_matches_tritonclient(ours):
    mine = ours.FindServiceByName("inference.GRPCInferenceService")
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert len(mine.methods) >= 12
    for method in mine.methods:
        reference = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == \
            (reference.input_type.full_name, reference.output_type.full_name)
        assert (method.client_streaming, method.server_streaming) == \
            (reference.client_streaming, reference.server_streaming), method.name


def test_the_kserve_stubs_live_in_our_namespace_not_as_a_top_level_module():
    generated = ROOT / "proto" / "visionserve" / "inference"
    assert (generated / "grpc_service_pb2.py").is_file()
    text = (generated / "grpc_service_pb2_grpc.py").read_text()
    assert "from visionserve.inference import grpc_service_pb2" in text
    assert not (ROOT / "inference").exists()
