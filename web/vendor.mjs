// Copies the few browser files `edgecraft export --web` ships from the locked npm packages into
// the Python package (edgecraft/export/web_assets/vendor/), so an installed edgecraft needs no npm.
// `.mjs` files are renamed `.js`: Python 3.11's http.server sends .mjs with a MIME type that
// Chromium refuses for module scripts, and edgecraft.js tells onnxruntime-web the new names.
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "edgecraft", "export", "web_assets", "vendor");
const ort = join(here, "node_modules", "onnxruntime-web");
const tok = join(here, "node_modules", "@huggingface", "tokenizers");

const files = {
  // WebAssembly: the API and its threaded SIMD runtime
  "ort.wasm.min.js": join(ort, "dist", "ort.wasm.min.mjs"),
  "ort-wasm-simd-threaded.js": join(ort, "dist", "ort-wasm-simd-threaded.mjs"),
  "ort-wasm-simd-threaded.wasm": join(ort, "dist", "ort-wasm-simd-threaded.wasm"),
  // WebGPU (and WebAssembly for the operators it leaves on the CPU)
  "ort.webgpu.min.js": join(ort, "dist", "ort.webgpu.min.mjs"),
  "ort-wasm-simd-threaded.asyncify.js": join(ort, "dist", "ort-wasm-simd-threaded.asyncify.mjs"),
  "ort-wasm-simd-threaded.asyncify.wasm": join(ort, "dist", "ort-wasm-simd-threaded.asyncify.wasm"),
  "tokenizers.min.js": join(tok, "dist", "tokenizers.min.mjs"),
  // Apache-2.0 asks for its licence beside the copy; onnxruntime-web's MIT notice heads each file
  "LICENSE.tokenizers.txt": join(tok, "LICENSE"),
};

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
for (const [name, src] of Object.entries(files)) copyFileSync(src, join(out, name));
const version = (dir) => JSON.parse(readFileSync(join(dir, "package.json"), "utf8")).version;
const versions = { "onnxruntime-web": version(ort), "@huggingface/tokenizers": version(tok) };
writeFileSync(join(out, "versions.json"), JSON.stringify(versions, null, 2) + "\n");
console.log(`vendor: ${Object.keys(files).length} files into ${out}`, versions);
