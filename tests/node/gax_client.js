// Google's Node client library (google-gax 5) against opsd: its
// OperationsClient over gRPC and over the REST fallback, and LROperation
// promises. Run by tests/node_client.rs, which creates the operations first:
//
//   node tests/node/gax_client.js HOST:PORT
//
// For each transport T (grpc, rest), under projects/p/locations/l:
//   T-get           running
//   T-page-0..4     running (list paging)
//   T-cancel        running, IMMEDIATE (cancel, then get)
//   T-delete        running
//   T-succeeds      scripted: response google.protobuf.Empty after 1 s
//   T-fails         scripted: error code 8 "Quota exceeded." after 1 s
//   T-cancelled     running; the promise sees the cancel
//
// The REST fallback decodes Operations with the type registry gax ships
// (longrunning, google.rpc.Status, google.protobuf): what a cancelled
// operation carries must be decodable there. Its URLs are Google Cloud's own
// shape (OS Config v2beta), which opsd serves with no service config.
// Prints "ok" when every check passed.
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const gax = require('google-gax');
const { PassThroughClient } = require('google-auth-library');

const [host, port] = process.argv[2].split(':');
const parent = 'projects/p/locations/l';

const httpRules = [
  { selector: 'google.longrunning.Operations.ListOperations', get: '/v2beta/{name=projects/*/locations/*}/operations' },
  { selector: 'google.longrunning.Operations.GetOperation', get: '/v2beta/{name=projects/*/locations/*/operations/*}' },
  { selector: 'google.longrunning.Operations.DeleteOperation', delete: '/v2beta/{name=projects/*/locations/*/operations/*}' },
  { selector: 'google.longrunning.Operations.CancelOperation', post: '/v2beta/{name=projects/*/locations/*/operations/*}:cancel', body: '*' },
];

function client(transport) {
  if (transport === 'grpc') {
    return gax.lro({}).operationsClient({
      servicePath: host,
      port: Number(port),
      sslCreds: gax.grpc.credentials.createInsecure(),
    });
  }
  // As generated clients do for their REST transport: the protos as JSON
  // (gax's own operations.json: longrunning, google.rpc.Status and
  // google.protobuf only) and the service's HTTP rules.
  const operationsJson = path.join(path.dirname(require.resolve('google-gax')), '../protos/operations.json');
  const protoJson = gax.fallback.protobuf.Root.fromJSON(JSON.parse(fs.readFileSync(operationsJson, 'utf8')));
  return gax.fallback
    .lro({ auth: new PassThroughClient(), protoJson, httpRules })
    .operationsClient({ servicePath: host, port: Number(port), protocol: 'http', fallback: true });
}

// Empty responses and no metadata: decoders that accept any bytes.
const decoder = () => ({});

function lroOperation(ops, op) {
  const descriptor = new gax.LongrunningDescriptor(ops, decoder, decoder);
  const backoff = gax.createBackoffSettings(50, 1.5, 300, null, null, null, 20000);
  return gax.operation(op, descriptor, backoff);
}

async function rejectsWith(promise, code) {
  try {
    await promise;
  } catch (err) {
    assert.equal(err.code, code, `${err.message}`);
    return err;
  }
  assert.fail(`expected an error with code ${code}`);
}

async function check(transport) {
  const ops = client(transport);
  const name = id => `${parent}/operations/${transport}-${id}`;

  // get
  const [got] = await ops.getOperation({ name: name('get') });
  assert.equal(got.name, name('get'));
  assert.ok(!got.done);

  // list paging: pages of 2 through every page.
  const pages = [];
  let pageToken = '';
  do {
    const [operations, next] = await ops.listOperations(
      { name: parent, filter: `name = "*/${transport}-page-*"`, pageSize: 2, pageToken },
      { autoPaginate: false },
    );
    pages.push(operations.map(o => o.name));
    pageToken = next && next.pageToken;
  } while (pageToken);
  assert.deepEqual(pages.map(p => p.length), [2, 2, 1]);
  assert.deepEqual(pages.flat(), [0, 1, 2, 3, 4].map(i => name(`page-${i}`)));
  const all = [];
  for await (const op of ops.listOperationsAsync({ name: parent, filter: `name = "*/${transport}-page-*"`, pageSize: 2 })) {
    all.push(op.name);
  }
  assert.equal(all.length, 5);

  // cancel, then get: done with error CANCELLED (1), readable by the client.
  await ops.cancelOperation({ name: name('cancel') });
  const [cancelled] = await ops.getOperation({ name: name('cancel') });
  assert.equal(cancelled.done, true);
  assert.equal(cancelled.error.code, 1);
  assert.equal(cancelled.error.message, 'Operation was cancelled.');

  // delete, then get: NOT_FOUND. Over REST, gax 5 with google-auth-library
  // 10 surfaces a failed call as the transport's error (gaxios throws on a
  // non-2xx status before gax parses the body): its code is the HTTP status
  // and its message Google's JSON error envelope, whatever the server.
  await ops.deleteOperation({ name: name('delete') });
  const missing = await rejectsWith(
    ops.getOperation({ name: name('delete') }),
    transport === 'grpc' ? 5 : 404,
  );
  assert.match(missing.message, /NOT_FOUND|not found/);

  // LROperation.promise(): completes, fails, is cancelled.
  const [succeeds] = await ops.getOperation({ name: name('succeeds') });
  const [result] = await lroOperation(ops, succeeds).promise();
  assert.deepEqual(result, {});

  const [fails] = await ops.getOperation({ name: name('fails') });
  const failure = await rejectsWith(lroOperation(ops, fails).promise(), 8);
  assert.match(failure.message, /Quota exceeded\./);

  const [running] = await ops.getOperation({ name: name('cancelled') });
  const waiting = lroOperation(ops, running).promise();
  await ops.cancelOperation({ name: name('cancelled') });
  await rejectsWith(waiting, 1);

  ops.close();
}

(async () => {
  for (const transport of ['grpc', 'rest']) {
    try {
      await check(transport);
    } catch (err) {
      console.error(`${transport}: ${err.stack || err}`);
      process.exit(1);
    }
  }
  console.log('ok');
  process.exit(0);
})();
