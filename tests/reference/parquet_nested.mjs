// Nested-column Parquet fixtures written by an independent Parquet writer (Apache Arrow's Rust implementation,
// arrow-rs, compiled to WebAssembly as the npm package parquet-wasm; tables built with apache-arrow), in the layout
// Hugging Face datasets use for chat data: a `messages` column of list<struct<role: string, content: string>>
// (OpenAI format) and a `conversations` column of list<struct<from: string, value: string>> (ShareGPT), standard
// 3-level LIST encoding, Snappy pages, two rows per row group.
//
// Read by tests/Peft/ParquetNestedTests.cs. CI never runs this; it only reads the committed files:
//   tests/Fixtures/parquet/messages_nested.parquet, tests/Fixtures/parquet/sharegpt_nested.parquet
// Recipe (needs the npm registry once):
//   mkdir -p /tmp/pqgen && cd /tmp/pqgen && npm install parquet-wasm@0.8.0 apache-arrow@21.2.0
//   NODE_PATH=/tmp/pqgen/node_modules node tests/reference/parquet_nested.mjs   (from the repository root)
import { createRequire } from 'module';
import fs from 'fs';
import path from 'path';

const require = createRequire(path.join(process.env.NODE_PATH ?? '/tmp/pqgen/node_modules', 'x.js'));
const pq = require('parquet-wasm/node');
const arrow = require('apache-arrow');

const str = () => new arrow.Utf8();
const listOf = (fields) => new arrow.List(new arrow.Field('element', new arrow.Struct(fields.map(f => new arrow.Field(f, str(), true))), true));

function write(file, columns) {
  const table = new arrow.Table(Object.fromEntries(Object.entries(columns).map(([name, [type, values]]) => [name, arrow.vectorFromArray(values, type)])));
  const props = new pq.WriterPropertiesBuilder().setCompression(pq.Compression.SNAPPY).setMaxRowGroupSize(2).build();
  const bytes = pq.writeParquet(pq.Table.fromIPCStream(arrow.tableToIPC(table, 'stream')), props);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, bytes);
  console.log(`${file}: ${bytes.length} bytes, ${table.numRows} rows, ${table.schema.toString()}`);
}

const messages = [
  [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello!' }],
  [{ role: 'user', content: 'Übersetze "ja" — 你好\nbitte' }, { role: 'assistant', content: 'yes' }, { role: 'user', content: 'And "nein"?' }, { role: 'assistant', content: 'no' }],
  [{ role: 'user', content: 'Only a question' }],
  null,
  [{ role: 'user', content: 'Tabs\tand \\ backslashes' }, { role: 'assistant', content: null }],
];
write('tests/Fixtures/parquet/messages_nested.parquet', {
  messages: [listOf(['role', 'content']), messages],
  source: [str(), ['a', 'b', 'c', 'd', 'e']],
});

const conversations = [
  [{ from: 'human', value: 'What is 2+2?' }, { from: 'gpt', value: '4' }],
  [{ from: 'human', value: 'Name a colour.' }, { from: 'gpt', value: 'Blue.' }, { from: 'human', value: 'Another?' }, { from: 'gpt', value: 'Red.' }],
  [{ from: 'human', value: 'Weather?' }, { from: 'function_call', value: '{"name": "w"}' }, { from: 'observation', value: 'sunny' }, { from: 'gpt', value: 'Sunny.' }],
];
write('tests/Fixtures/parquet/sharegpt_nested.parquet', {
  conversations: [listOf(['from', 'value']), conversations],
  system: [str(), ['You are a calculator.', null, 'Use tools.']],
});
