// edgecraft.js: an edgecraft bundle in the browser, with onnxruntime-web.
//
//   import { load } from "./edgecraft.js";
//   const model = await load("https://example.org/my-bundle/");      // the folder with edgecraft.json
//   for await (const piece of model.stream("ROMEO:", { maxNewTokens: 80, temperature: 0.8, topK: 40, seed: 1 }))
//     output.textContent += piece;
//
// It is edgecraft/runtime/model.py, batch.py, sampling.py and text.py for one sequence, rule for
// rule: the same prompt encoding, KV-cache loop and sliding window, the same sampling arithmetic
// (Python's Mersenne Twister included, so a seed picks the same tokens as `edgecraft generate`),
// and the same streaming and stop-string rules. tests/test_web.py holds them to the Python runtime.

import { Tokenizer } from "./vendor/tokenizers.min.js";

const FORMAT = "edgecraft-bundle/1";
const VENDOR = new URL("./vendor/", import.meta.url);
const RUNTIMES = {  // onnxruntime-web's API module and its WebAssembly runtime, per backend
  wasm: { api: "ort.wasm.min.js", runtime: "ort-wasm-simd-threaded" },
  webgpu: { api: "ort.webgpu.min.js", runtime: "ort-wasm-simd-threaded.asyncify" },
};

// ------------------------------------------------------------------ loading and verifying

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function sha256Hex(bytes) {
  if (!globalThis.crypto?.subtle) {
    throw new Error("checking the bundle's sha256 needs Web Crypto (https or localhost); load(url, { verify: false }) skips it");
  }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A bundle file's bytes, checked against the size and sha256 the manifest records for it. */
async function bundleFile(base, manifest, name, verify) {
  const entry = manifest.web?.files?.[name] ?? manifest.files[name];
  if (!entry) throw new Error(`${name}: not listed in edgecraft.json; re-export the bundle`);
  const bytes = await fetchBytes(new URL(name, base));
  if (verify) {
    const hash = await sha256Hex(bytes);
    if (bytes.length !== entry.bytes || hash !== entry.sha256) {
      throw new Error(`${name}: damaged (sha256 ${hash.slice(0, 12)}…, ${bytes.length} bytes; edgecraft.json says ` +
                      `${entry.sha256.slice(0, 12)}…, ${entry.bytes} bytes); copy the bundle again`);
    }
  }
  return bytes;
}

/** "webgpu" when the browser has a WebGPU adapter, else "wasm". */
export async function detectBackend() {
  try {
    if (globalThis.navigator?.gpu && (await navigator.gpu.requestAdapter())) return "webgpu";
  } catch { /* no adapter: WebAssembly */ }
  return "wasm";
}

/** WebAssembly threads: 0 = every core the page may use (threads share memory only in a cross-origin isolated page). */
function wasmThreads(threads) {
  if (!Number.isInteger(threads) || threads < 0) throw new RangeError(`threads must be an integer >= 0 (0 = every core), got ${threads}`);
  const isolated = globalThis.crossOriginIsolated === true;
  if (threads > 1 && !isolated) {
    throw new RangeError(`threads: ${threads} WebAssembly threads need a cross-origin isolated page (served with ` +
                         `Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp); use 1 or 0`);
  }
  return threads === 0 ? (isolated ? navigator.hardwareConcurrency : 1) : threads;
}

/**
 * Open the bundle at `url` (a folder URL, relative to the page): check its format and every file
 * it uses against edgecraft.json, then start onnxruntime-web.
 * Options: int8 (the int8 graph), backend ("auto" | "wasm" | "webgpu"), threads (WebAssembly
 * threads, default the manifest's; 0 = every core in a cross-origin isolated page, else 1),
 * verify (default true).
 */
export async function load(url, { int8 = false, backend = "auto", threads, verify = true } = {}) {
  const base = new URL(url.endsWith("/") ? url : url + "/", globalThis.document?.baseURI ?? location.href);
  const manifest = JSON.parse(new TextDecoder().decode(await fetchBytes(new URL("edgecraft.json", base))));
  if (manifest.format !== FORMAT) {
    throw new Error(`edgecraft.json: format ${JSON.stringify(manifest.format)}, this page reads ${FORMAT}; upgrade edgecraft`);
  }
  if (backend === "auto") backend = await detectBackend();
  if (!RUNTIMES[backend]) throw new Error(`backend ${JSON.stringify(backend)}: expected "auto", "wasm" or "webgpu"`);
  if (!manifest.web) throw new Error("edgecraft.json has no web section; export the bundle with --web");
  // this backend's graph (manifest.web.graphs): int8 when asked; else fp32, or int8 if that is all there is
  const graphs = manifest.web.graphs[backend];
  const kind = int8 || !graphs.fp32 ? "int8" : "fp32";
  if (!graphs[kind]) throw new Error("no int8 model in this bundle; export it with --int8");
  const file = graphs[kind], decodeFile = graphs[`${kind}_decode`];  // the graph one-token steps run, if any (as runtime/onnx_engine.py)
  const [graph, tokenizerJson, decodeGraph] = await Promise.all([
    bundleFile(base, manifest, file, verify),
    bundleFile(base, manifest, manifest.tokenizer.file, verify),
    decodeFile && bundleFile(base, manifest, decodeFile, verify),
  ]);
  // Python's `tokenizers` decodes without transformers' "clean up" of spaces before punctuation
  const tokenizer = new Tokenizer(JSON.parse(new TextDecoder().decode(tokenizerJson)), { clean_up_tokenization_spaces: false });
  const ort = await import(new URL(RUNTIMES[backend].api, VENDOR).href);
  const runtime = RUNTIMES[backend].runtime;
  ort.env.wasm.wasmPaths = { mjs: new URL(runtime + ".js", VENDOR).href, wasm: new URL(runtime + ".wasm", VENDOR).href };
  ort.env.wasm.numThreads = wasmThreads(threads ?? manifest.runtime.threads);
  const engine = await Engine.create(ort, manifest, backend, graph, decodeGraph);
  return new Model(engine, tokenizer, manifest, { file, decodeFile, backend, threads: ort.env.wasm.numThreads });
}

// ------------------------------------------------------------------ the engine: one sequence's KV cache

/**
 * The graph driven as export/README.md says, for batch 1, without IO binding (onnxruntime-web has
 * none for WebAssembly): every call copies its inputs into WebAssembly memory and its outputs out,
 * so the cache is kept as long as the sequence (the position dimension is symbolic).
 * - WebAssembly graphs (web/model.wasm*.onnx) take the whole cache as one tensor, past_key_values
 *   (2 * n_layers, kv_heads, length, head_size), and return only the positions the call wrote,
 *   new_key_values (2 * n_layers, kv_heads, S, head_size). The cache lives here in two buffers that
 *   take turns: the old rows and the new ones are copied into the other, which the next call reads.
 * - WebGPU graphs take and return the whole cache per layer (`present.*`), which stays on the GPU.
 */
class Engine {
  static async create(ort, manifest, backend, graph, decodeGraph) {
    const options = {
      executionProviders: [backend],
      graphOptimizationLevel: "basic",  // the graph is already fused (as in the Python runtime)
      extra: configEntries(manifest.runtime.session_config ?? {}),
    };
    const present = Array.from({ length: 2 * manifest.onnx.kv_cache.n_layers }, (_, i) => `present.${i >> 1}.${i & 1 ? "value" : "key"}`);
    if (backend === "webgpu") options.preferredOutputLocation = Object.fromEntries(present.map((n) => [n, "gpu-buffer"]));
    const session = await ort.InferenceSession.create(graph, options);
    const single = decodeGraph && (await ort.InferenceSession.create(decodeGraph, options));
    return new Engine(ort, manifest, session, single, present);
  }

  constructor(ort, manifest, session, single, present) {
    this.ort = ort;
    this.session = session;
    this.single = single ?? session;  // one-token decode steps run this one
    this.blockSize = manifest.config.block_size;
    this.vocabSize = manifest.vocab_size;
    this.presentNames = present;
    this.packed = session.inputNames.includes("past_key_values");
    const [, heads, , headSize] = manifest.onnx.kv_cache.shape;
    this.rows = present.length * heads;  // (layer, kind, head) rows of the cache, head_size floats per position
    [this.heads, this.headSize] = [heads, headSize];
    this.positions = session.inputNames.includes("position_ids");
    if (this.packed) this.cache = [0, 1].map(() => new Float32Array(this.rows * this.blockSize * headSize));  // (rows, <= block_size, head_size)
    this.reset();
  }

  /** Forget the sequence: the next prefill starts at position 0. */
  reset() {
    this.dispose();
    this.length = 0;
    this.turn = 0;
    const empty = new this.ort.Tensor("float32", new Float32Array(0), [1, this.heads, 0, this.headSize]);
    this.present = this.presentNames.map(() => empty);  // WebGPU: the last call's present.* tensors
  }

  dispose() {
    for (const tensor of this.present ?? []) if (tensor.location === "gpu-buffer") tensor.dispose();
  }

  /** Append `ids` after the cached tokens -> logits (V,) after the last of them. */
  async prefill(ids, session = this.session) {
    const S = ids.length, L = this.length, T = this.ort.Tensor, D = this.headSize;
    if (L + S > this.blockSize) throw new Error(`${L} + ${S} tokens pass the context of ${this.blockSize}`);
    const feeds = {
      input_ids: new T("int64", BigInt64Array.from(ids, BigInt), [1, S]),  // (1, S)
      seqlens_k: new T("int32", Int32Array.of(L + S - 1), [1, 1]),  // the last cached position after this call
      total_sequence_length: new T("int32", Int32Array.of(L + S), [1]),
    };
    if (this.positions) feeds.position_ids = new T("int64", BigInt64Array.from(ids, (_, s) => BigInt(L + s)), [1, S]);
    if (this.packed) {
      feeds.past_key_values = new T("float32", this.cache[this.turn].subarray(0, this.rows * L * D), [this.presentNames.length, this.heads, L, D]);
    } else {
      this.presentNames.forEach((name, i) => { feeds[name.replace("present", "past_key_values")] = this.present[i]; });
    }
    const out = await session.run(feeds);
    if (this.packed) {
      const [src, dst, rows] = [this.cache[this.turn], this.cache[this.turn ^ 1], out.new_key_values.data];
      for (let r = 0; r < this.rows; r++) {  // (rows, L, D) + (rows, S, D) -> (rows, L + S, D)
        dst.set(src.subarray(r * L * D, (r + 1) * L * D), r * (L + S) * D);
        dst.set(rows.subarray(r * S * D, (r + 1) * S * D), (r * (L + S) + L) * D);
      }
      this.turn ^= 1;
    } else {
      this.dispose();
      this.present = this.presentNames.map((name) => out[name]);  // (1, heads, L + S, head_size) each, on the GPU
    }
    this.length = L + S;
    return out.logits.data.subarray((S - 1) * this.vocabSize, S * this.vocabSize);  // logits (1, S, V): the last row
  }

  decode(id) {
    return this.prefill([id], this.single);
  }
}

/** {"session.set_denormal_as_zero": "1"} -> {session: {set_denormal_as_zero: "1"}} (onnxruntime-web's `extra`). */
function configEntries(entries) {
  const extra = {};
  for (const [key, value] of Object.entries(entries)) {
    const parts = key.split(".");
    let node = extra;
    for (const part of parts.slice(0, -1)) node = node[part] ??= {};
    node[parts.at(-1)] = value;
  }
  return extra;
}

// ------------------------------------------------------------------ sampling (runtime/sampling.py)

/** Python's random.Random: MT19937 seeded by init_by_array, random() from two 32-bit draws. */
class PythonRandom {
  constructor(seed) {
    if (seed === null || seed === undefined) seed = crypto.getRandomValues(new Uint32Array(2)).reduce((a, b) => a * 2 ** 21 + (b >>> 11));
    let n = Math.abs(seed);
    const key = [];
    do { key.push(n % 2 ** 32); n = Math.floor(n / 2 ** 32); } while (n > 0);  // 32-bit words, least significant first
    this.mt = new Uint32Array(624);
    this.initGenrand(19650218);
    const mt = this.mt;
    let i = 1, j = 0;
    for (let k = Math.max(624, key.length); k; k--) {
      mt[i] = ((mt[i] ^ Math.imul(mt[i - 1] ^ (mt[i - 1] >>> 30), 1664525)) + key[j] + j) >>> 0;
      i++; j++;
      if (i >= 624) { mt[0] = mt[623]; i = 1; }
      if (j >= key.length) j = 0;
    }
    for (let k = 623; k; k--) {
      mt[i] = ((mt[i] ^ Math.imul(mt[i - 1] ^ (mt[i - 1] >>> 30), 1566083941)) - i) >>> 0;
      i++;
      if (i >= 624) { mt[0] = mt[623]; i = 1; }
    }
    mt[0] = 0x80000000;
  }

  initGenrand(s) {
    const mt = this.mt;
    mt[0] = s >>> 0;
    for (let i = 1; i < 624; i++) mt[i] = (Math.imul(1812433253, mt[i - 1] ^ (mt[i - 1] >>> 30)) + i) >>> 0;
    this.index = 624;
  }

  uint32() {
    const mt = this.mt;
    if (this.index >= 624) {
      for (let k = 0; k < 624; k++) {
        const y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7fffffff);
        mt[k] = mt[(k + 397) % 624] ^ (y >>> 1) ^ (y & 1 ? 0x9908b0df : 0);
      }
      this.index = 0;
    }
    let y = mt[this.index++];
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    return (y ^ (y >>> 18)) >>> 0;
  }

  random() {
    const a = this.uint32() >>> 5, b = this.uint32() >>> 6;
    return (a * 67108864 + b) / 9007199254740992;
  }
}

/** numpy's float64 sum along a contiguous axis (pairwise, 8 accumulators), so top-p's cut is numpy's. */
function pairwiseSum(x, start = 0, n = x.length) {
  if (n < 8) {
    let s = -0;
    for (let i = start; i < start + n; i++) s += x[i];
    return s;
  }
  if (n <= 128) {
    const r = Array.from({ length: 8 }, (_, k) => x[start + k]);
    let i = 8;
    for (; i < n - (n % 8); i += 8) for (let k = 0; k < 8; k++) r[k] += x[start + i + k];
    let s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) s += x[start + i];
    return s;
  }
  let half = Math.floor(n / 2);
  half -= half % 8;
  return pairwiseSum(x, start, half) + pairwiseSum(x, start + half, n - half);
}

function max(x) {
  let m = -Infinity;
  for (const v of x) if (v > m) m = v;
  return m;
}

function argmax(x) {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

/** The next token from logits (V,) float32, as runtime/sampling.py's `sample` picks it for one row. */
function sampleToken(logits, rng, params, seen) {
  if (params.repetitionPenalty !== 1) {  // float32 arithmetic, as numpy does on float32 logits
    const p = Math.fround(params.repetitionPenalty);
    logits = Float32Array.from(logits, (x, i) => (seen[i] ? (x > 0 ? x / p : x * p) : x));
  }
  if (params.temperature === 0) return argmax(logits);
  const V = logits.length;
  let z = Float64Array.from(logits, (x) => x / params.temperature);  // (V,)
  if (params.topK !== null && params.topK < V) {
    const kth = Float64Array.from(z).sort()[V - params.topK];  // the k-th largest value
    z = z.map((x) => (x < kth ? -Infinity : x));
  }
  if (params.topP !== null && params.topP < 1) {
    const peak = max(z);
    const probs = z.map((x) => Math.exp(x - peak));
    const total = pairwiseSum(probs);
    for (let i = 0; i < V; i++) probs[i] /= total;
    const ranked = Float64Array.from(probs).sort().reverse();  // descending
    let cum = 0, keep = 0;
    for (const q of ranked) { cum += q; if (cum - q < params.topP) keep++; }  // numpy: cumsum(ranked) - ranked < p
    const edge = ranked[keep - 1];
    z = z.map((x, i) => (probs[i] >= edge ? x : -Infinity));
  }
  const peak = max(z);
  const cdf = new Float64Array(V);  // unnormalised cumulative mass
  let cum = 0;
  for (let i = 0; i < V; i++) cdf[i] = cum += Math.exp(z[i] - peak);
  const u = rng.random() * cdf[V - 1];
  let lo = 0, hi = V - 1;  // the first of cdf[0..V-2] above u, else V-1 (numpy's searchsorted "right")
  while (lo < hi) { const mid = (lo + hi) >> 1; if (cdf[mid] <= u) lo = mid + 1; else hi = mid; }
  return lo;
}

// ------------------------------------------------------------------ text (runtime/text.py)

/** Text of `ids` as Python's Tokenizer.decode gives it (special tokens skipped; "" for no ids, where tokenizers.js throws). */
function decodeIds(tokenizer, ids) {
  return ids.length ? tokenizer.decode(ids, { skip_special_tokens: true }) : "";
}

/** Token ids in, complete text pieces out (no broken characters): text.py's IncrementalDecoder. */
class IncrementalDecoder {
  constructor(tokenizer) {
    this.tokenizer = tokenizer;
    this.ids = [];
    this.prefix = 0;
    this.read = 0;
  }

  push(token) {
    this.ids.push(token);
    const before = this.decode(this.prefix, this.read), now = this.decode(this.prefix);
    if (now.length > before.length && !now.endsWith("\ufffd")) {
      [this.prefix, this.read] = [this.read, this.ids.length];
      return now.slice(before.length);
    }
    return "";
  }

  finish() {
    const before = this.decode(this.prefix, this.read), now = this.decode(this.prefix);
    this.prefix = this.read = this.ids.length;
    return now.slice(before.length);
  }

  decode(start, end) {
    return decodeIds(this.tokenizer, this.ids.slice(start, end));
  }
}

/** Text pieces in, text pieces out, ending just before the first stop string: text.py's StopFilter. */
class StopFilter {
  constructor(stops) {
    this.stops = stops;
    this.held = "";
    this.stopped = false;
  }

  push(piece) {
    const text = this.held + piece;
    const hits = this.stops.map((s) => text.indexOf(s)).filter((i) => i >= 0);
    if (hits.length) {
      [this.held, this.stopped] = ["", true];
      return text.slice(0, Math.min(...hits));
    }
    let keep = 0;  // the longest tail of text that is a proper prefix of a stop string
    for (const stop of this.stops) {
      for (let n = Math.min(stop.length - 1, text.length); n > keep; n--) {
        if (text.endsWith(stop.slice(0, n))) { keep = n; break; }
      }
    }
    this.held = keep ? text.slice(text.length - keep) : "";
    return text.slice(0, text.length - keep);
  }

  finish() {
    const held = this.held;
    this.held = "";
    return held;
  }
}

// ------------------------------------------------------------------ the model: options, loop, stats

const DEFAULTS = { maxNewTokens: 200, temperature: 0.8, topK: null, topP: null, repetitionPenalty: 1.0, stop: [], seed: null };

/** Generation options checked as runtime/sampling.py and model.py check them: a RangeError naming the option, nothing clamped. */
function checkOptions(options) {
  const unknown = Object.keys(options).filter((k) => !(k in DEFAULTS));
  if (unknown.length) throw new RangeError(`unknown option ${unknown[0]}; expected one of ${Object.keys(DEFAULTS).join(", ")}`);
  const o = { ...DEFAULTS, ...options };
  o.stop = typeof o.stop === "string" ? [o.stop] : [...(o.stop ?? [])];
  if (!Number.isInteger(o.maxNewTokens) || o.maxNewTokens < 1) throw new RangeError(`maxNewTokens must be an integer >= 1, got ${o.maxNewTokens}`);
  if (!(o.temperature >= 0)) throw new RangeError(`temperature must be >= 0 (0 = greedy), got ${o.temperature}`);
  if (o.topK !== null && (!Number.isInteger(o.topK) || o.topK < 1)) throw new RangeError(`topK must be an integer >= 1 (or null for no limit), got ${o.topK}`);
  if (o.topP !== null && !(o.topP > 0 && o.topP <= 1)) throw new RangeError(`topP must be in (0, 1] (or null for no limit), got ${o.topP}`);
  if (!(o.repetitionPenalty > 0)) throw new RangeError(`repetitionPenalty must be > 0 (1.0 = off), got ${o.repetitionPenalty}`);
  if (o.stop.some((s) => typeof s !== "string" || !s)) throw new RangeError(`stop strings must be non-empty strings, got ${JSON.stringify(o.stop)}`);
  if (o.seed !== null && !Number.isSafeInteger(o.seed)) throw new RangeError(`seed must be an integer of at most 2**53 (or null), got ${o.seed}`);
  return o;
}

class Model {
  constructor(engine, tokenizer, manifest, info) {
    this.engine = engine;
    this.tokenizer = tokenizer;
    this.manifest = manifest;
    this.file = info.file;  // the graph this page runs
    this.decodeFile = info.decodeFile ?? null;  // and the one its one-token decode steps run, if another
    this.backend = info.backend;  // "wasm" | "webgpu"
    this.threads = info.threads;
    this.stats = null;  // the last (or current) generation's figures, updated every token
    this.busy = false;
    const newline = this.tokenizer.encode("\n", { add_special_tokens: false }).ids;
    this.startId = newline.length === 1 ? newline[0] : 0;
  }

  /** Token ids of `text`; the start token (newline) for an empty text, as model.py does. */
  encode(text) {
    if (typeof text !== "string") throw new TypeError(`a prompt must be a string, got ${typeof text}`);
    const ids = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    return ids.length ? ids : [this.startId];
  }

  decode(ids) {
    return decodeIds(this.tokenizer, ids);
  }

  /** The continuation of `prompt`, ending before the first stop string. */
  async generate(prompt, options = {}) {
    let text = "";
    for await (const piece of this.stream(prompt, options)) text += piece;
    return text;
  }

  /**
   * Text pieces as they are generated; they join to generate()'s text. A piece never holds a
   * broken character nor text that may turn out to start a stop string. One stream at a time.
   * Options are checked now; tokens are generated as the iterator is read.
   */
  stream(prompt, options = {}) {
    const o = checkOptions(options);
    const ids = typeof prompt === "string" ? this.encode(prompt) : (prompt.length ? [...prompt] : [this.startId]);
    return this.guarded(ids, o);
  }

  async *guarded(ids, o) {
    if (this.busy) throw new Error("this model is already generating; finish (or break out of) that stream first");
    this.busy = true;
    try {
      yield* this.loop(ids, o);
    } finally {
      this.busy = false;
    }
  }

  async *loop(context, o) {
    const engine = this.engine, block = engine.blockSize;
    const rng = new PythonRandom(o.seed);
    const seen = o.repetitionPenalty !== 1 ? new Uint8Array(engine.vocabSize) : null;
    if (seen) for (const id of context) seen[id] = 1;
    const decoder = new IncrementalDecoder(this.tokenizer), stopper = new StopFilter(o.stop);
    const stats = this.stats = { promptTokens: context.length, newTokens: 0, firstTokenMs: 0, decodeMs: 0, tokensPerSecond: 0 };
    const started = performance.now();
    engine.reset();
    let logits = await engine.prefill(context.slice(-block));
    for (let n = 1; ; n++) {
      const token = sampleToken(logits, rng, o, seen);
      context.push(token);
      if (seen) seen[token] = 1;
      let piece = stopper.push(decoder.push(token));
      const last = !stopper.stopped && n >= o.maxNewTokens;
      if (last) {  // the rest the decoder held back, through the stop filter
        const tail = stopper.push(decoder.finish());
        piece += stopper.stopped ? tail : tail + stopper.finish();
      }
      const now = performance.now();
      if (n === 1) stats.firstTokenMs = now - started;
      else stats.decodeMs = now - started - stats.firstTokenMs;
      stats.newTokens = n;
      stats.tokensPerSecond = n > 1 ? (n - 1) / (stats.decodeMs / 1000) : 0;
      if (piece) yield piece;
      if (stopper.stopped || last) return;
      if (engine.length >= block) {  // the sliding window: the last block//2 tokens but the newest, which decode appends
        const keep = Math.max(1, Math.floor(block / 2));
        engine.reset();
        if (keep > 1) await engine.prefill(context.slice(-keep, -1));
      }
      logits = await engine.decode(token);
    }
  }
}
