#!/usr/bin/env python3
"""Starts an export on the worker and follows it through opsd, as a client
of a Google API would: google-api-core's `Operation` future over opsd's
`google.longrunning.Operations`.

Usage:
    client.py --worker HOST:PORT --opsd HOST:PORT TABLE ROWS [--cancel-after PERCENT]

Prints the progress as it changes, then the result (or the error). With
`--cancel-after`, cancels the export once it reports that much progress.
"""

import argparse
import sys
import time
import uuid

import grpc
from google.api_core import exceptions, operation, operations_v1
from google.api_core.future import polling

import stubs

# How often the future polls opsd: quickly, since the jobs here are short.
FAST_POLLING = polling.DEFAULT_POLLING.with_delay(initial=0.05, maximum=0.2, multiplier=1.5)


class Exports:
    """The export service and opsd, as a client sees them."""

    def __init__(self, worker, opsd, pb=None):
        self.pb = pb or stubs.load()
        self.exports = self.pb.exports_grpc.ExportsStub(grpc.insecure_channel(worker))
        self.operations = operations_v1.OperationsClient(grpc.insecure_channel(opsd))

    def start(self, table, rows, request_id=None, metadata=()):
        """Starts an export; returns its `google.api_core.operation.Operation`."""
        request = self.pb.exports.StartExportRequest(
            table=table, rows=rows, request_id=request_id or str(uuid.uuid4())
        )
        started = self.exports.StartExport(request, metadata=metadata, timeout=10)
        return self.future(started)

    def future(self, started):
        """The api-core future of an operation the export service returned."""
        return operation.from_gapic(
            started,
            self.operations,
            self.pb.exports.ExportResult,
            metadata_type=self.pb.exports.ExportProgress,
            polling=FAST_POLLING,
        )


def follow(future, on_progress, until=lambda progress: False, every=0.05):
    """Polls `future` (a GetOperation every `every` seconds), calling
    `on_progress` with each new ExportProgress, until it is done or
    `until(progress)` holds."""
    seen = None
    while not future.done(retry=None):
        progress = future.metadata
        if progress is not None and progress != seen:
            seen = progress
            on_progress(progress)
            if until(progress):
                return
        time.sleep(every)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", default="127.0.0.1:50061")
    parser.add_argument("--opsd", default="127.0.0.1:50051")
    parser.add_argument("--cancel-after", type=int, metavar="PERCENT")
    parser.add_argument("table")
    parser.add_argument("rows", type=int)
    args = parser.parse_args()

    exports = Exports(args.worker, args.opsd)
    future = exports.start(args.table, args.rows)
    print(future.operation.name)
    show = lambda p: print(f"  {p.progress_percent:3d}%  {p.rows_exported} rows")
    if args.cancel_after is not None:
        follow(future, show, until=lambda p: p.progress_percent >= args.cancel_after)
        future.cancel()
        print("  cancel requested")
    follow(future, show)
    try:
        result = future.result()
        print(f"done: {result.rows} rows of {result.table} at {result.uri}")
    except exceptions.GoogleAPICallError as err:
        print(f"failed: {err}")
        sys.exit(1)


if __name__ == "__main__":
    main()
