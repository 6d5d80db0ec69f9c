// A non-Python client: calls a real rnnserve server with @grpc/grpc-js and decodes the
// google.rpc.Status in the `grpc-status-details-bin` trailer with protobufjs, using the
// googleapis protos (google/rpc/status.proto, error_details.proto) from the directory given.
// Usage: node error_details.js ADDRESS PROTO_DIR GOOGLEAPIS_DIR
// Prints one JSON object per call: {call, code, details, status: {code, message}, details: [...]}.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const [address, protoDir, googleapisDir] = process.argv.slice(2);

const definition = protoLoader.loadSync("rnnserve/v1/rnn_service.proto", {
  includeDirs: [protoDir],
  keepCase: true,
});
const { RnnService } = grpc.loadPackageDefinition(definition).rnnserve.v1;

const rpc = new protobuf.Root();
rpc.resolvePath = (origin, target) =>
  target.startsWith("google/rpc/") ? path.join(googleapisDir, target) : target;
rpc.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
rpc.resolveAll();
const Status = rpc.lookupType("google.rpc.Status");

function unpack(any) {
  const name = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
  const type = rpc.lookupType(name);
  const message = type.toObject(type.decode(any.value), { longs: Number, defaults: false });
  return { type: name, ...message };
}

function describe(callName, err) {
  const trailer = err.metadata.get("grpc-status-details-bin");
  const out = { call: callName, code: err.code, details: err.details };
  if (trailer.length > 0) {
    const status = Status.decode(trailer[0]);
    out.status = { code: status.code, message: status.message };
    out.status_details = status.details.map(unpack);
  }
  return out;
}

const client = new RnnService(address, grpc.credentials.createInsecure());
const deadline = () => ({ deadline: Date.now() + 30000 });
const calls = [
  ["GetSession", { session_id: "node-missing" }],
  ["CreateSession", { text: "hello node", config: { hidden_size: 0 } }],
];

let pending = calls.length;
let failed = false;
for (const [method, request] of calls) {
  client[method](request, deadline(), (err) => {
    if (!err) {
      console.error(`${method} unexpectedly succeeded`);
      failed = true;
    } else {
      console.log(JSON.stringify(describe(method, err)));
    }
    if (--pending === 0) {
      client.close();
      process.exitCode = failed ? 1 : 0;
    }
  });
}
