// Independent reader of a TensorBoard event file, used by tests/Peft/TensorBoardReferenceTests.cs to check what
// ftn's TensorBoardWriter writes with code that shares nothing with it:
//   - TFRecord framing: uint64 LE length, uint32 LE masked CRC-32C of the 8 length bytes, the data, uint32 LE masked
//     CRC-32C of the data; mask(c) = ((c >>> 15) | (c << 17)) + 0xa282ead8 (TensorFlow's lib/hash/crc32c.h).
//     CRC-32C comes from the npm package @node-rs/crc32 (Rust crc32c crate, prebuilt binary, no native build).
//   - The records are tensorflow.Event messages decoded by protobufjs from tf_event.proto (a subset of TensorFlow's
//     event.proto and summary.proto written from the published message definitions).
// Usage: node read_tfevents.mjs EVENT_FILE
//   (packages from FTN_TFEVENTS_NODE_MODULES, else ./node_modules next to this script: `npm ci` here)
// Prints {"file_version", "records", "rows": [{"tag", "step", "value", "wall_time"}]} as JSON on stdout, exit 0.
// A bad length CRC, bad data CRC, truncated record or undecodable Event: a message on stderr naming the offset, exit 2.
import { createRequire } from 'module';
import fs from 'fs';
import path from 'path';
import { fileURLToPath } from 'url';

const here = path.dirname(fileURLToPath(import.meta.url));
const modules = process.env.FTN_TFEVENTS_NODE_MODULES ?? path.join(here, 'node_modules');
const require = createRequire(path.join(modules, 'x.js'));
const protobuf = require('protobufjs');
const { crc32c } = require('@node-rs/crc32');

function fail(msg) {
  process.stderr.write(msg + '\n');
  process.exit(2);
}

const masked = (buf) => ((((crc32c(buf) >>> 15) | (crc32c(buf) << 17)) >>> 0) + 0xa282ead8) >>> 0;

const file = process.argv[2];
if (!file) fail('usage: node read_tfevents.mjs EVENT_FILE');
const root = protobuf.loadSync(path.join(here, 'tf_event.proto'));
const Event = root.lookupType('tensorflow.Event');
const bytes = fs.readFileSync(file);

let pos = 0, records = 0, fileVersion = null;
const rows = [];
while (pos < bytes.length) {
  if (pos + 12 > bytes.length) fail(`${file}: truncated record header at offset ${pos}`);
  const lenBytes = bytes.subarray(pos, pos + 8);
  if (bytes.readUInt32LE(pos + 8) !== masked(lenBytes)) fail(`${file}: bad length CRC at offset ${pos}`);
  const len = bytes.readBigUInt64LE(pos);
  if (BigInt(pos) + 16n + len > BigInt(bytes.length)) fail(`${file}: truncated record data at offset ${pos} (length ${len})`);
  const n = Number(len);
  const data = bytes.subarray(pos + 12, pos + 12 + n);
  if (bytes.readUInt32LE(pos + 12 + n) !== masked(data)) fail(`${file}: bad data CRC in the record at offset ${pos}`);
  let ev;
  try {
    ev = Event.toObject(Event.decode(data), { longs: String, defaults: true });
  } catch (e) {
    fail(`${file}: record at offset ${pos} is not a tensorflow.Event: ${e.message}`);
  }
  if (ev.fileVersion) fileVersion = ev.fileVersion;
  for (const v of ev.summary?.value ?? [])
    if (v.simpleValue !== undefined) rows.push({ tag: v.tag, step: Number(ev.step), value: v.simpleValue, wall_time: ev.wallTime });
  records++;
  pos += 16 + n;
}
process.stdout.write(JSON.stringify({ file_version: fileVersion, records, rows }) + '\n');
