// A real gRPC-Web client from the npm registry (Connect for Node in
// gRPC-Web mode, over HTTP/1.1 as browsers' fetch would) against opsd: the
// same Operations and Console services gRPC serves. Run by
// tests/grpc_web.rs:
//
//   node tests/node/grpc_web_client.js http://HOST:PORT DESCRIPTOR_SET_FILE
//
// The service descriptors come from opsd's own encoded descriptor set at run
// time (no generated code). Prints "ok" when every check passed.
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const { createFileRegistry, fromBinary } = require('@bufbuild/protobuf');
const { FileDescriptorSetSchema } = require('@bufbuild/protobuf/wkt');
const { createClient, ConnectError, Code } = require('@connectrpc/connect');
const { createGrpcWebTransport } = require('@connectrpc/connect-node');

const [baseUrl, descriptors] = process.argv.slice(2);
const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, fs.readFileSync(descriptors)));
const transport = createGrpcWebTransport({ baseUrl, httpVersion: '1.1' });
const operations = createClient(registry.getService('google.longrunning.Operations'), transport);
const console_ = createClient(registry.getService('opsd.v1.Console'), transport);

// Fails rather than hangs: the test's whole budget.
const budget = setTimeout(() => {
  console.error(`timed out at step: ${step}`);
  process.exit(2);
}, 30000);
let step = 'start';

(async () => {
  step = 'get';
  const name = 'projects/web/operations/a';
  const got = await operations.getOperation({ name });
  assert.equal(got.name, name);
  assert.equal(got.done, false);

  step = 'list';
  const page = await operations.listOperations({ name: 'projects/web', pageSize: 10 });
  assert.deepEqual(page.operations.map(o => o.name), [name, 'projects/web/operations/b']);

  step = 'cancel';
  await operations.cancelOperation({ name });
  const cancelled = await operations.getOperation({ name });
  assert.equal(cancelled.done, true);
  assert.equal(cancelled.result.case, 'error');
  assert.equal(cancelled.result.value.code, 1);

  try {
    await operations.getOperation({ name: 'projects/web/operations/missing' });
    assert.fail('expected NOT_FOUND');
  } catch (err) {
    assert.ok(err instanceof ConnectError, String(err));
    assert.equal(err.code, Code.NotFound);
  }

  // A server stream over gRPC-Web: the console's change feed.
  step = 'watch';
  const abort = new AbortController();
  const changes = console_.watchOperationChanges(
    { parent: 'projects/web', sendInitial: true },
    { signal: abort.signal },
  );
  const seen = [];
  for await (const change of changes) {
    seen.push(change.name);
    if (seen.length === 2) break;
  }
  abort.abort();
  assert.deepEqual(seen.sort(), [name, 'projects/web/operations/b']);
  clearTimeout(budget);
  console.log('ok');
  process.exit(0);
})().catch(err => {
  console.error(err && err.stack || err);
  process.exit(1);
});
