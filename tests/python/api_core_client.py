"""Drives opsd with Google's own Python client library (google-api-core).

Usage: api_core_client.py HOST:PORT

The calling Rust test (tests/google_client.rs) starts opsd with BeyondCorp's
service config loaded and creates, under projects/p/locations/l, the running
operations rest-1, rest-2, grpc-1 and grpc-2. This script lists, gets,
cancels and deletes them through AbstractOperationsClient over REST and
OperationsClient over gRPC, checks every answer, and prints "ok".
"""

import sys

import grpc
from google.api_core import exceptions, operations_v1
from google.api_core.operations_v1.transports.rest import OperationsRestTransport
from google.auth.credentials import AnonymousCredentials

PARENT = "projects/p/locations/l"


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def exercise(client, prefix):
    """The same walk over either transport."""
    names = sorted(op.name for op in client.list_operations(PARENT, ""))
    check(f"{PARENT}/operations/{prefix}-1" in names, f"{prefix}: list: {names}")
    check(f"{PARENT}/operations/{prefix}-2" in names, f"{prefix}: list: {names}")

    first = f"{PARENT}/operations/{prefix}-1"
    op = client.get_operation(first)
    check(op.name == first and not op.done, f"{prefix}: get: {op}")

    client.cancel_operation(first)
    op = client.get_operation(first)
    check(op.done, f"{prefix}: not done after cancel: {op}")
    check(op.error.code == 1, f"{prefix}: error after cancel: {op.error}")
    check(op.error.message == "Operation was cancelled.", f"{prefix}: {op.error}")

    second = f"{PARENT}/operations/{prefix}-2"
    client.delete_operation(second)
    try:
        client.get_operation(second)
        raise AssertionError(f"{prefix}: deleted operation still found")
    except exceptions.NotFound:
        pass
    try:
        client.cancel_operation(f"{PARENT}/operations/missing")
        raise AssertionError(f"{prefix}: cancel of a missing operation succeeded")
    except exceptions.NotFound:
        pass


def main():
    address = sys.argv[1]

    # The scheme goes in the host: this transport does not pass url_scheme on.
    transport = OperationsRestTransport(
        host=f"http://{address}", credentials=AnonymousCredentials()
    )
    exercise(operations_v1.AbstractOperationsClient(transport=transport), "rest")

    with grpc.insecure_channel(address) as channel:
        exercise(operations_v1.OperationsClient(channel), "grpc")

    print("ok")


if __name__ == "__main__":
    main()
