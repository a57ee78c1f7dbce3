"""gRPC stubs for the worker and its clients, generated at run time.

Nothing generated is committed: `load()` runs grpcio-tools' protoc on opsd's
`proto/opsd/v1/workers.proto` and on this example's own
`protos/acme/exports/v1/exports.proto` into a temporary directory (removed
at exit) and imports the result. The googleapis types they import
(`google.longrunning`, `google.rpc`, `google.api`) come from the
`googleapis-common-protos` package that google-api-core and grpcio-status
install, so each proto file is loaded into the Python descriptor pool once.
"""

import atexit
import importlib
import importlib.resources
import pathlib
import shutil
import sys
import tempfile
import types

from google.protobuf import descriptor_pb2

EXAMPLE = pathlib.Path(__file__).resolve().parent
# opsd's protos, in the repository this example lives in.
OPSD_PROTO = EXAMPLE.parent.parent / "proto"


def load(opsd_proto=OPSD_PROTO):
    """Generates and imports the stubs; returns them as a namespace:
    `workers` / `workers_grpc` (opsd.v1) and `exports` / `exports_grpc`
    (acme.exports.v1)."""
    from grpc_tools import protoc

    out = pathlib.Path(tempfile.mkdtemp(prefix="opsd-python-worker-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={opsd_proto}",
            f"--proto_path={EXAMPLE / 'protos'}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "opsd/v1/workers.proto",
            "acme/exports/v1/exports.proto",
        ]
    )
    if status != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with status {status}")
    sys.path.insert(0, str(out))
    return types.SimpleNamespace(
        workers=importlib.import_module("opsd.v1.workers_pb2"),
        workers_grpc=importlib.import_module("opsd.v1.workers_pb2_grpc"),
        exports=importlib.import_module("acme.exports.v1.exports_pb2"),
        exports_grpc=importlib.import_module("acme.exports.v1.exports_pb2_grpc"),
    )


def descriptor_set(module):
    """The FileDescriptorSet of one generated module's proto file, for
    `opsd.v1.Workers/RegisterTypes`. Its imports are not included: opsd
    already knows the googleapis files this example imports."""
    file = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(file)
    return descriptor_pb2.FileDescriptorSet(file=[file])
