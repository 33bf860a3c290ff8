#!/usr/bin/env node
// Create a pruning job, then fetch it back: a minimal Node.js client of the
// Secateur PruningService, loaded straight from proto/ (no generated code).
//
// Usage: node create_and_get.js TARGET MODEL_URI OUTPUT_URI RATIO
//   e.g. node create_and_get.js 127.0.0.1:50051 /models/m.keras /served 0.3
//
// Prints one line of JSON, {"created": <Job>, "fetched": <Job>}, and exits 0.
// On an RPC error prints "<CODE_NAME>: <details>" to stderr and exits 1;
// bad arguments exit 2.
'use strict';

const path = require('node:path');
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = path.join(PROTO_ROOT, 'secateur', 'v1', 'pruning.proto');
const DEADLINE_MS = 30000;

function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).secateur.v1.PruningService;
}

// grpc.status maps names to numbers; invert it to name a failure.
function codeName(code) {
  const entry = Object.entries(grpc.status).find(([, value]) => value === code);
  return entry ? entry[0] : `UNKNOWN_CODE_${code}`;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[method](request, { deadline }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

async function main(argv) {
  if (argv.length !== 4) {
    process.stderr.write(
      'usage: node create_and_get.js TARGET MODEL_URI OUTPUT_URI RATIO\n',
    );
    return 2;
  }
  const [target, modelUri, outputUri, ratioText] = argv;
  const ratio = Number(ratioText);
  if (ratioText.trim() === '' || !Number.isFinite(ratio)) {
    process.stderr.write(`RATIO must be a number. Received: ${ratioText}\n`);
    return 2;
  }
  const PruningService = loadService();
  const client = new PruningService(target, grpc.credentials.createInsecure());
  try {
    const created = await unary(client, 'CreateJob', {
      spec: { model_uri: modelUri, output_uri: outputUri, pruning: { ratio } },
      request_id: crypto.randomUUID(),
    });
    const fetched = await unary(client, 'GetJob', { name: created.name });
    process.stdout.write(`${JSON.stringify({ created, fetched })}\n`);
    return 0;
  } catch (err) {
    if (err && typeof err.code === 'number') {
      process.stderr.write(`${codeName(err.code)}: ${err.details}\n`);
    } else {
      process.stderr.write(`error: ${err && err.stack ? err.stack : err}\n`);
    }
    return 1;
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.stderr.write(`error: ${err && err.stack ? err.stack : err}\n`);
    process.exitCode = 1;
  },
);
