"""Drives google-api-core's Operation future against opsd's scripted operations.

Usage: api_core_operation.py HOST:PORT

The calling Rust test (tests/google_client.rs) starts opsd with
examples/scenarios/basic.yaml; by hand, against a freshly started
`opsd serve --store memory --scenario examples/scenarios/basic.yaml`. Over gRPC (OperationsClient) and over REST
(AbstractOperationsClient) this checks what client libraries rely on:
result() of an operation that reports progress then succeeds, the exception
result() raises for a failed one, cancel()/cancelled(), a refused cancel, and
the polling report of the calls the future made. Prints "ok".
"""

import functools
import json
import sys
import urllib.request

import grpc
from google.api_core import exceptions, operation, operations_v1
from google.api_core.operations_v1.transports.rest import OperationsRestTransport
from google.auth.credentials import AnonymousCredentials
from google.protobuf import empty_pb2, wrappers_pb2


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def future(get, cancel, name):
    """An api-core Operation future over any transport's get and cancel."""
    return operation.Operation(
        get(name),
        refresh=functools.partial(get, name),
        cancel=functools.partial(cancel, name),
        result_type=empty_pb2.Empty,
        metadata_type=wrappers_pb2.StringValue,
    )


def exercise(label, get, cancel):
    # Progress, then success: metadata updates are visible while polling.
    slow = future(get, cancel, "operations/slow")
    already_done = slow.done(retry=None)
    seen = []
    while not slow.done(retry=None):
        if slow.metadata is not None and (not seen or seen[-1] != slow.metadata.value):
            seen.append(slow.metadata.value)
    check(isinstance(slow.result(timeout=30), empty_pb2.Empty), f"{label}: result")
    check(slow.metadata.value == "75%", f"{label}: final metadata {slow.metadata}")
    # (Started more than 2 s after the server, it is done before we look.)
    check(already_done or len(seen) >= 2, f"{label}: metadata updates seen while polling: {seen}")

    # A failed operation raises the exception of its error code.
    failed = future(get, cancel, "operations/failed")
    try:
        failed.result(timeout=30)
        raise AssertionError(f"{label}: failed operation returned a result")
    except exceptions.InternalServerError as err:
        check("scripted job failed" in str(err), f"{label}: {err}")

    # cancel() and cancelled().
    running = future(get, cancel, "operations/running")
    check(not running.done(retry=None), f"{label}: running is done")
    check(running.cancel(), f"{label}: cancel() returned False")
    check(running.cancelled(), f"{label}: not cancelled after cancel()")

    # A refused cancel.
    stubborn = future(get, cancel, "operations/stubborn")
    try:
        stubborn.cancel()
        raise AssertionError(f"{label}: stubborn cancel succeeded")
    except exceptions.FailedPrecondition:
        pass
    check(not stubborn.cancelled(), f"{label}: stubborn cancelled")


def report(address, name):
    with urllib.request.urlopen(f"http://{address}/v1/{name}:report") as response:
        return json.load(response)


def main():
    address = sys.argv[1]

    with grpc.insecure_channel(address) as channel:
        client = operations_v1.OperationsClient(channel)
        exercise("grpc", client.get_operation, client.cancel_operation)

    # The futures polled: the report shows the calls, over both transports.
    slow = report(address, "operations/slow")
    check(int(slow["counts"]["GetOperation"]) >= 2, f"report: {slow['counts']}")
    check("grpc" in {c["transport"] for c in slow["calls"]}, f"report: {slow['calls'][:3]}")

    # The same over REST. The scripted operations are done or cancelled now,
    # except the slow one's checks, which hold for a done operation too.
    # Bare `operations/{id}` names: the bindings of operations.proto itself
    # (this client's defaults expect `{parent}/operations/{id}`).
    http_options = {
        "google.longrunning.Operations.GetOperation": [
            {"method": "get", "uri": "/v1/{name=operations/**}"}
        ],
        "google.longrunning.Operations.CancelOperation": [
            {"method": "post", "uri": "/v1/{name=operations/**}:cancel", "body": "*"}
        ],
    }
    transport = OperationsRestTransport(
        host=f"http://{address}", credentials=AnonymousCredentials(), http_options=http_options
    )
    rest = operations_v1.AbstractOperationsClient(transport=transport)
    failed = future(rest.get_operation, rest.cancel_operation, "operations/failed")
    try:
        failed.result(timeout=30)
        raise AssertionError("rest: failed operation returned a result")
    except exceptions.InternalServerError:
        pass
    running = future(rest.get_operation, rest.cancel_operation, "operations/running")
    check(running.cancelled(), "rest: cancelled over gRPC, seen over REST")
    check(not running.cancel(), "rest: cancel() of a done operation returns False")
    slow = future(rest.get_operation, rest.cancel_operation, "operations/slow")
    check(isinstance(slow.result(timeout=30), empty_pb2.Empty), "rest: result")
    transports = {c["transport"] for c in report(address, "operations/slow")["calls"]}
    check({"grpc", "rest"} <= transports, f"report transports: {transports}")
    print("ok")


if __name__ == "__main__":
    main()
