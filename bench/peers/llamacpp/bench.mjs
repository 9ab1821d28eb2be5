// llama.cpp (through node-llama-cpp, CPU prebuilt) on one GGUF file: prefill pp128 and decode tg64 tokens/s, like
// llama-bench -p 128 -n 64 -t 2, plus greedy tokens when asked (for ftn's cross-check). Prints one JSON line.
// usage: node bench.mjs MODEL.gguf VOCAB_SIZE [THREADS=2] [REPS=3] [GREEDY_N=0]
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const [model, vocabArg, threadsArg, repsArg, greedyArg] = process.argv.slice(2);
const threads = Number(threadsArg ?? 2), reps = Number(repsArg ?? 3), greedyN = Number(greedyArg ?? 0);
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: threads });
const m = await llama.loadModel({ modelPath: model, gpuLayers: 0, useMmap: true });
const vocab = Number(vocabArg);
const ctx = await m.createContext({ contextSize: 256, batchSize: 128, threads: { ideal: threads, min: threads }, sequences: 1 });
const seq = ctx.getSequence();

// Fixed pseudo-random ids (no special tokens), the same for every run.
let s = 12345;
const rand = (n) => Array.from({ length: n }, () => { s = (s * 1103515245 + 12345) % 2147483648; return 3 + 256 + (s % (vocab - 259)); });
const prompt128 = rand(128), prompt32 = rand(32);

async function pp() {
  await seq.clearHistory();
  const t0 = process.hrtime.bigint();
  await seq.evaluateWithoutGeneratingNewTokens(prompt128);
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

async function tg() {
  await seq.clearHistory();
  await seq.evaluateWithoutGeneratingNewTokens(prompt32.slice(0, 31));
  let n = 0;
  const t0 = process.hrtime.bigint();
  for await (const _ of seq.evaluate([prompt32[31]], { temperature: 0 })) { if (++n >= 64) break; }
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

let bestPp = Infinity, bestTg = Infinity;
if (greedyN === 0) {
  await pp(); await tg(); // warm-up
  for (let i = 0; i < reps; i++) { bestPp = Math.min(bestPp, await pp()); bestTg = Math.min(bestTg, await tg()); }
}

let greedy = [];
if (greedyN > 0) {
  await seq.clearHistory();
  for await (const t of seq.evaluate([1], { temperature: 0 })) { greedy.push(t); if (greedy.length >= greedyN) break; }
}
console.log(JSON.stringify({ model, threads, pp128: 128 / bestPp, tg64: 64 / bestTg, greedy }));
await ctx.dispose(); await m.dispose(); await llama.dispose();
