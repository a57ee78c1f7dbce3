"""Drives the example Python worker (examples/python-worker) with
google-api-core, as a client of the export service would.

Usage: python_worker.py WORKER_HOST:PORT OPSD_HOST:PORT

The calling Rust test (tests/python_worker.rs) starts the opsd binary and
the worker (with a 2 s lease, progress every 0.5 s at 1,000 rows/s). This
starts two exports, watches their progress through opsd, cancels one (the
worker must stop it within 1 s and finish it with its own CANCELLED error)
and lets the other finish with its typed ExportResult, which opsd's REST
surface renders because the worker registered the type. Prints "ok".
"""

import json
import pathlib
import sys
import time
import urllib.request

import grpc
from google.api_core import exceptions

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "examples" / "python-worker"))
import client  # the example's own client helpers (after the path above)


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def main():
    worker_address, opsd_address = sys.argv[1], sys.argv[2]
    exports = client.Exports(worker_address, opsd_address)

    # Two runs at once: a long one to cancel, a short one to finish (3 s,
    # longer than the 2 s lease, so it lives only through lease renewals).
    doomed = exports.start("orders", 1_000_000)
    finishing = exports.start("customers", 3_000, request_id="customers-1")
    check(not doomed.done(retry=None) and not finishing.done(retry=None), "started done")

    # A retry with the same request id is the same job.
    again = exports.start("customers", 3_000, request_id="customers-1")
    check(again.operation.name == finishing.operation.name, "request_id retry made a new operation")

    # Watch the long run's progress until it reported twice, then cancel
    # it: the worker hears of it on its watch stream, stops, and finishes the
    # operation with its own CANCELLED error, within 1 s.
    seen = []
    client.follow(
        doomed, lambda p: seen.append(p.rows_exported), until=lambda p: p.rows_exported >= 1_000
    )
    check(len(seen) >= 2 and seen == sorted(set(seen)), f"progress seen: {seen}")
    cancelled_at = time.monotonic()
    check(doomed.cancel(), "cancel() refused")
    client.follow(doomed, lambda p: None, every=0.01)
    stopped_in = time.monotonic() - cancelled_at
    check(stopped_in < 1.0, f"the worker took {stopped_in:.2f} s to stop after the cancel")
    check(doomed.cancelled(), f"not cancelled: {doomed.operation}")
    error = doomed.exception()
    check(isinstance(error, exceptions.Cancelled), f"error {error!r}")
    check("cancelled after" in error.message, f"not the worker's own error: {error.message}")
    exported = doomed.metadata.rows_exported
    check(1_000 <= exported < 1_000_000, f"rows exported before the cancel: {exported}")

    # The other run finishes, with its progress seen on the way.
    progress = []
    client.follow(finishing, lambda p: progress.append(p.progress_percent))
    result = finishing.result(timeout=30)
    check(result.rows == 3_000 and result.table == "customers", f"result {result}")
    check(len(set(progress)) >= 3, f"progress of the finished run: {progress}")
    check(finishing.metadata.progress_percent == 100, f"final metadata {finishing.metadata}")

    # REST renders the worker's registered types.
    with urllib.request.urlopen(f"http://{opsd_address}/v1/{finishing.operation.name}") as response:
        rendered = json.load(response)
    check(
        rendered["response"]
        == {
            "@type": "type.googleapis.com/acme.exports.v1.ExportResult",
            "table": "customers",
            "rows": "3000",
            "uri": "file:///exports/customers.csv",
        },
        f"REST response {rendered}",
    )
    check(rendered["metadata"]["progressPercent"] == 100, f"REST metadata {rendered}")

    # Bad input is the service's own INVALID_ARGUMENT.
    try:
        exports.start("", 0)
        raise AssertionError("an empty table was accepted")
    except grpc.RpcError as err:
        check(err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"empty table: {err.code()}")

    print("ok")


if __name__ == "__main__":
    main()
