#!/usr/bin/env python3
"""An export service whose jobs are long-running operations kept by opsd.

Usage:
    worker.py --opsd HOST:PORT [--listen HOST:PORT] [--parent PARENT]
              [--rows-per-second N] [--report-every SECONDS] [--lease SECONDS]

The service answers `acme.exports.v1.Exports/StartExport` at once with the
operation it registered in opsd (`opsd.v1.Workers/CreateOperation`), and runs
the export in a thread of its own. Clients follow the job through opsd's
`google.longrunning.Operations` with any Google client library; they never
talk to this worker again. While a job runs the worker

- reports its progress as the operation's metadata (an `ExportProgress`, with
  `UpdateOperation`), which also renews the operation's lease; when no
  progress is due within a third of the lease, it renews the lease alone, so
  opsd finishes the operation with ABORTED only if the worker dies;
- keeps one `WatchOperations` stream open for its parent, opened before any
  operation is created (opsd does not replay past events) and reopened after
  any break (opsd then repeats the cancellations still pending): a
  `CANCEL_REQUESTED` event stops the job's work at once, and the worker
  finishes the operation with CANCELLED itself (the operations are
  `COOPERATIVE`); `DELETED` and `LEASE_EXPIRED` stop the work too;
- completes the operation with an `ExportResult` response, a type it
  registered with `RegisterTypes` at start-up so opsd's REST surface renders
  it as JSON;
- passes a W3C `traceparent` it received with StartExport on to opsd, so a
  tracing opsd links the operation to the client's trace.

It prints `listening on HOST:PORT` once it serves. SIGTERM or SIGINT stops
it: new calls are refused, running jobs are finished with ABORTED.
"""

import argparse
import logging
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, status_pb2

import stubs

log = logging.getLogger("exports")

# Why a job's work stopped before its end.
CANCELLED, DELETED, LEASE_LAPSED, SHUTDOWN = "cancelled", "deleted", "lease lapsed", "shutdown"


def pack(message):
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def duration(seconds):
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


class Job:
    """One export: the thread that does its work, and the event that stops
    it (set by the watch stream's thread, read by the job's)."""

    def __init__(self, worker, name, table, rows, trace):
        self.worker = worker
        self.name = name
        self.table = table
        self.rows = rows
        # The caller's traceparent, passed on with every call on the operation.
        self.trace = trace
        self.stopped = threading.Event()
        self.reason = None
        self.exported = 0
        self.last_renewal = time.monotonic()
        self.thread = threading.Thread(target=self.run, name=f"export {name}", daemon=True)

    def stop(self, reason):
        if not self.stopped.is_set():
            self.reason = reason
            self.stopped.set()

    def progress(self):
        pb = self.worker.pb.exports
        return pb.ExportProgress(
            table=self.table,
            rows_exported=self.exported,
            progress_percent=int(100 * self.exported / self.rows),
        )

    def call(self, method, request):
        return method(request, metadata=self.trace, timeout=10)

    def work(self, seconds):
        """Works for `seconds` (the example's stand-in for exporting rows is
        waiting), renewing the lease meanwhile. False when told to stop."""
        end = time.monotonic() + seconds
        renew_every = self.worker.lease / 3
        while (left := end - time.monotonic()) > 0:
            if self.stopped.wait(min(left, renew_every)):
                return False
            if time.monotonic() - self.last_renewal >= renew_every:
                # No metadata: the progress stays, the lease is renewed.
                self.call(
                    self.worker.opsd.UpdateOperation,
                    self.worker.pb.workers.UpdateOperationRequest(name=self.name),
                )
                self.last_renewal = time.monotonic()
        return not self.stopped.is_set()

    def run(self):
        workers = self.worker.pb.workers
        opsd = self.worker.opsd
        step = self.worker.report_every
        per_step = max(1, int(self.worker.rows_per_second * step))
        try:
            while self.exported < self.rows:
                if not self.work(
                    min(step, (self.rows - self.exported) / self.worker.rows_per_second)
                ):
                    break
                self.exported = min(self.rows, self.exported + per_step)
                # Progress, which renews the lease too.
                self.call(
                    opsd.UpdateOperation,
                    workers.UpdateOperationRequest(name=self.name, metadata=pack(self.progress())),
                )
                self.last_renewal = time.monotonic()
            if self.reason is None:
                result = self.worker.pb.exports.ExportResult(
                    table=self.table, rows=self.exported, uri=f"file:///exports/{self.table}.csv"
                )
                request = workers.CompleteOperationRequest(name=self.name, response=pack(result))
            elif self.reason in (CANCELLED, SHUTDOWN):
                code = code_pb2.CANCELLED if self.reason == CANCELLED else code_pb2.ABORTED
                message = (
                    f"Export of {self.table} cancelled after {self.exported} of {self.rows} rows."
                    if self.reason == CANCELLED
                    else "The export worker stopped; start the export again."
                )
                request = workers.CompleteOperationRequest(
                    name=self.name,
                    error=status_pb2.Status(code=code, message=message),
                    metadata=pack(self.progress()),
                )
            else:
                # Deleted, or opsd already finished it (lease lapsed): nothing to report.
                request = None
            if request is not None:
                self.call(opsd.CompleteOperation, request)
            log.info("%s: %s", self.name, self.reason or "done")
        except grpc.RpcError as err:
            # FAILED_PRECONDITION: done meanwhile (a cancel of an IMMEDIATE
            # operation, a lapsed lease); NOT_FOUND: deleted. Either way the
            # work is moot. Anything else is opsd being unreachable: the
            # lease will lapse and opsd finishes the operation with ABORTED.
            level = (
                logging.INFO
                if err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
                else logging.WARNING
            )
            log.log(level, "%s: stopped: %s %s", self.name, err.code().name, err.details())
        finally:
            self.worker.forget(self)


class Worker:
    """The export service: starts jobs, and routes opsd's events to them."""

    def __init__(self, pb, channel, parent, rows_per_second, report_every, lease):
        self.pb = pb
        self.opsd = pb.workers_grpc.WorkersStub(channel)
        self.parent = parent
        self.rows_per_second = rows_per_second
        self.report_every = report_every
        self.lease = lease
        # Running jobs by operation name. The lock guards the map only: the
        # servicer threads add jobs, job threads remove theirs, the watch
        # thread looks them up; no call is made under it.
        self.jobs = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.watch_call = None

    # --- opsd.v1.Workers: types and events ---------------------------------

    def register_types(self):
        registered = self.opsd.RegisterTypes(
            self.pb.workers.RegisterTypesRequest(
                descriptor_set=stubs.descriptor_set(self.pb.exports)
            ),
            timeout=10,
        )
        log.info("registered with opsd: %s", ", ".join(registered.message_types))

    def watch(self, ready):
        """Keeps a WatchOperations stream open until the worker closes; sets
        `ready` once the first stream is open."""
        workers = self.pb.workers
        backoff = 0.1
        while not self.closing.is_set():
            call = self.opsd.WatchOperations(workers.WatchOperationsRequest(parent=self.parent))
            with self.lock:
                self.watch_call = call
            try:
                # opsd sends the stream's headers as it opens it: from here
                # on, every event reaches this stream.
                call.initial_metadata()
                if call.is_active():
                    ready.set()
                    backoff = 0.1
                for event in call:
                    self.on_event(event)
            except grpc.RpcError as err:
                if self.closing.is_set():
                    return
                log.warning(
                    "watch stream ended (%s); reopening in %.1f s", err.code().name, backoff
                )
            self.closing.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def on_event(self, event):
        Type = self.pb.workers.OperationEvent.Type
        reason = {
            Type.CANCEL_REQUESTED: CANCELLED,
            Type.DELETED: DELETED,
            Type.LEASE_EXPIRED: LEASE_LAPSED,
        }.get(event.type)
        with self.lock:
            job = self.jobs.get(event.name)
        if job is not None and reason is not None:
            log.info("%s: %s", event.name, Type.Name(event.type))
            job.stop(reason)

    def forget(self, job):
        with self.lock:
            if self.jobs.get(job.name) is job:
                del self.jobs[job.name]

    # --- acme.exports.v1.Exports ---------------------------------------------

    def StartExport(self, request, context):
        if not request.table or request.rows <= 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "table and a positive rows are required"
            )
        trace = tuple(
            (key, value)
            for key, value in context.invocation_metadata()
            if key in ("traceparent", "tracestate")
        )
        workers = self.pb.workers
        progress = self.pb.exports.ExportProgress(table=request.table)
        try:
            operation = self.opsd.CreateOperation(
                workers.CreateOperationRequest(
                    parent=self.parent,
                    request_id=request.request_id,
                    metadata=pack(progress),
                    cancel_policy=workers.COOPERATIVE,
                    lease=duration(self.lease),
                    cancel_grace_period=duration(5),
                ),
                metadata=trace,
                timeout=10,
            )
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())
        with self.lock:
            # A retry with the same request_id returns the running operation:
            # its job runs already.
            start = (
                not operation.done and operation.name not in self.jobs and not self.closing.is_set()
            )
            if start:
                job = Job(self, operation.name, request.table, request.rows, trace)
                self.jobs[operation.name] = job
        if start:
            job.thread.start()
            log.info(
                "%s: export of %s (%d rows) started", operation.name, request.table, request.rows
            )
        return operation

    def close(self):
        """Stops the watch stream and every running job (their operations end ABORTED)."""
        self.closing.set()
        with self.lock:
            jobs = list(self.jobs.values())
            call = self.watch_call
        if call is not None:
            call.cancel()
        for job in jobs:
            job.stop(SHUTDOWN)
        for job in jobs:
            job.thread.join(timeout=10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--opsd", default="127.0.0.1:50051", help="opsd's address (HOST:PORT)")
    parser.add_argument(
        "--listen", default="127.0.0.1:50061", help="this service's address; port 0 picks one"
    )
    parser.add_argument(
        "--parent", default="projects/demo/locations/local", help="where its operations live"
    )
    parser.add_argument(
        "--rows-per-second", type=float, default=1000, help="the pace of the simulated export"
    )
    parser.add_argument(
        "--report-every", type=float, default=1.0, help="seconds between progress reports"
    )
    parser.add_argument(
        "--lease", type=float, default=10.0, help="the operations' lease, in seconds"
    )
    parser.add_argument("--proto", default=str(stubs.OPSD_PROTO), help="opsd's proto/ directory")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    pb = stubs.load(args.proto)
    channel = grpc.insecure_channel(args.opsd)
    worker = Worker(pb, channel, args.parent, args.rows_per_second, args.report_every, args.lease)
    worker.register_types()
    ready = threading.Event()
    threading.Thread(target=worker.watch, args=(ready,), name="watch", daemon=True).start()
    if not ready.wait(timeout=30):
        sys.exit(f"cannot open a WatchOperations stream on {args.opsd}")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb.exports_grpc.add_ExportsServicer_to_server(worker, server)
    port = server.add_insecure_port(args.listen)
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    print(f"listening on {host}:{port}", flush=True)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    server.stop(grace=5).wait()
    worker.close()
    channel.close()
    log.info("worker stopped")


if __name__ == "__main__":
    main()
