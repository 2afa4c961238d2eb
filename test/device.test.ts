// Both backends compute a matmul and a softmax that match a float64 plain-JS reference, and the
// binding-size guard (engine-study issue 9) fires before an oversized tensor reaches WebGPU.
// WebGPU runs on whatever adapter Dawn finds (lavapipe in CI); without one it is skipped locally
// but fails under CI, because CI must exercise the GPU path.
import { after, before, describe, test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { numpy as np, nn } from "@jax-js/jax";
import {
  assertFitsBinding,
  getDeviceInfo,
  initDevice,
  setMaxBindingBytesOverride,
  type DeviceInfo,
  type DeviceName,
} from "../src/engine/device.js";
import { SelfscopeError } from "../src/core/errors.js";
import { Rng } from "../src/core/rng.js";

const TOL = 1e-5;

// ---- float64 reference and comparison -------------------------------------------------------

function randomMatrix(rng: Rng, rows: number, cols: number, scale = 1): Float64Array {
  const out = new Float64Array(rows * cols);
  for (let i = 0; i < out.length; i++) out[i] = (rng.next() * 2 - 1) * scale;
  return out;
}

/** The values as float32 would hold them, so the reference starts from exactly the device's inputs. */
function roundToF32(a: Float64Array): Float64Array {
  return Float64Array.from(new Float32Array(a));
}

function matmulF64(a: Float64Array, b: Float64Array, m: number, k: number, n: number): Float64Array {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let p = 0; p < k; p++) s += a[i * k + p]! * b[p * n + j]!;
      out[i * n + j] = s;
    }
  }
  return out;
}

function softmaxRowsF64(x: Float64Array, rows: number, cols: number): Float64Array {
  const out = new Float64Array(x.length);
  for (let r = 0; r < rows; r++) {
    let max = -Infinity;
    for (let c = 0; c < cols; c++) max = Math.max(max, x[r * cols + c]!);
    let sum = 0;
    for (let c = 0; c < cols; c++) sum += Math.exp(x[r * cols + c]! - max);
    for (let c = 0; c < cols; c++) out[r * cols + c] = Math.exp(x[r * cols + c]! - max) / sum;
  }
  return out;
}

/**
 * Asserts |actual - expected| <= tol * max(1, |expected|) everywhere: absolute near zero, relative
 * for large values (a 128-term f32 dot product of values ~1 is only good to ~1e-6 relative).
 * NaN anywhere fails.
 */
function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length ${actual.length} != ${expected.length}`);
  let worst = 0;
  let worstErr = 0;
  for (let i = 0; i < expected.length; i++) {
    const e = expected[i]!;
    const err = Math.abs(actual[i]! - e) / Math.max(1, Math.abs(e));
    // NaN compares false with everything: stop at the first one rather than lose it.
    if (Number.isNaN(err) || err > worstErr) {
      worst = i;
      worstErr = err;
      if (Number.isNaN(err)) break;
    }
  }
  if (!(worstErr <= tol)) {
    assert.fail(
      `${what}: element ${worst} is ${actual[worst]}, expected ${expected[worst]} ` +
        `(scaled error ${worstErr} > ${tol})`,
    );
  }
}

// ---- checks run on each device --------------------------------------------------------------

async function checkMatmul(device: DeviceName): Promise<void> {
  const [m, k, n] = [64, 128, 32];
  const rng = new Rng(1234);
  const a = roundToF32(randomMatrix(rng, m, k));
  const b = roundToF32(randomMatrix(rng, k, n));
  const x = np.array(new Float32Array(a), { shape: [m, k] });
  const y = np.array(new Float32Array(b), { shape: [k, n] });
  assert.equal(x.device, device, "arrays are created on the device just initialised");
  const z = np.matmul(x, y);
  assert.deepEqual(z.shape, [m, n]);
  const got = await z.data(); // async read: WebGPU in Node cannot read synchronously (issue 14)
  const want = matmulF64(a, b, m, k, n);
  assertClose(got, want, TOL, `${device} matmul`);

  // Two-sided: the same comparison rejects a result that is off in one element, or NaN.
  const perturbed = Float64Array.from(got);
  perturbed[777] = perturbed[777]! + 1e-3 * Math.max(1, Math.abs(perturbed[777]!));
  assert.throws(() => assertClose(perturbed, want, TOL, "perturbed"), /element 777/);
  const withNaN = Float64Array.from(got);
  withNaN[5] = NaN;
  assert.throws(() => assertClose(withNaN, want, TOL, "NaN"), /element 5/);
}

async function checkSoftmax(device: DeviceName): Promise<void> {
  const [rows, cols] = [16, 257]; // odd width: exercises a reduction that does not tile evenly
  const rng = new Rng(99);
  const logits = roundToF32(randomMatrix(rng, rows, cols, 8));
  const x = np.array(new Float32Array(logits), { shape: [rows, cols] });
  const got = await nn.softmax(x, -1).data();
  const want = softmaxRowsF64(logits, rows, cols);
  assertClose(got, want, TOL, `${device} softmax`);

  const perturbed = Float64Array.from(got);
  perturbed[300] = perturbed[300]! + 2e-5; // softmax values are < 1, so this is an absolute 2e-5
  assert.throws(() => assertClose(perturbed, want, TOL, "perturbed"), /element 300/);
}

// ---- tests ----------------------------------------------------------------------------------

describe("wasm device", () => {
  let info: DeviceInfo;
  before(async () => {
    info = await initDevice("wasm");
  });

  test("reports itself", () => {
    assert.deepEqual(info, { name: "wasm", adapter: "wasm", maxBindingBytes: Infinity, shaderF16: false });
    assert.deepEqual(getDeviceInfo(), info);
  });

  test("initDevice is idempotent", async () => {
    const again = await Promise.all([initDevice("wasm"), initDevice("wasm")]);
    assert.deepEqual(again, [info, info]);
  });

  test("matmul [64,128]x[128,32] matches float64", () => checkMatmul("wasm"));
  test("softmax matches float64", () => checkSoftmax("wasm"));

  describe("binding limit", () => {
    after(() => setMaxBindingBytesOverride(undefined));

    test("has none by default", () => {
      assert.doesNotThrow(() => assertFitsBinding(2 ** 40, "a 1 TiB tensor"));
    });

    test("an override forces one, so chunking paths can be tested on wasm", () => {
      setMaxBindingBytesOverride(1024);
      assert.equal(getDeviceInfo()?.maxBindingBytes, 1024);
      assert.doesNotThrow(() => assertFitsBinding(1024, "embed"));
      assert.throws(
        () => assertFitsBinding(1025, "model.embed_tokens.weight"),
        (e: unknown) =>
          e instanceof SelfscopeError &&
          /model\.embed_tokens\.weight needs 1025 bytes/.test(e.message) &&
          /1024 bytes maximum storage-buffer binding of wasm/.test(e.message),
      );
      setMaxBindingBytesOverride(undefined);
      assert.equal(getDeviceInfo()?.maxBindingBytes, Infinity);
      assert.doesNotThrow(() => assertFitsBinding(1025, "embed"));
    });

    test("rejects a nonsensical override", () => {
      for (const bad of [0, -1, 1.5, NaN, Infinity]) {
        assert.throws(() => setMaxBindingBytesOverride(bad), SelfscopeError);
      }
    });
  });
});

describe("webgpu device", () => {
  let info: DeviceInfo | undefined;
  let skipReason: string | undefined;

  before(async () => {
    try {
      info = await initDevice("webgpu");
    } catch (e) {
      // Missing adapter is an environment problem, reported as a SelfscopeError, never a crash.
      if (!(e instanceof SelfscopeError)) throw e;
      if (process.env.CI) {
        throw new Error(`WebGPU must run in CI, but: ${e.message}`, { cause: e });
      }
      skipReason = `no WebGPU adapter (${e.message.split(".")[0]}); run scripts/install-system-deps.sh`;
    }
  });

  /** Registers a test that is skipped, with the reason, when there is no adapter outside CI. */
  function gpuTest(name: string, fn: (info: DeviceInfo, t: TestContext) => void | Promise<void>): void {
    test(name, async (t) => {
      if (!info) {
        t.skip(skipReason ?? "WebGPU unavailable");
        return;
      }
      await fn(info, t);
    });
  }

  gpuTest("reports its adapter and limits", (info, t) => {
    t.diagnostic(`adapter: ${info.adapter}`);
    t.diagnostic(`maxStorageBufferBindingSize: ${info.maxBindingBytes}; shader-f16: ${info.shaderF16}`);
    assert.equal(info.name, "webgpu");
    assert.ok(info.adapter.length > 0 && info.adapter !== "wasm");
    assert.ok(Number.isInteger(info.maxBindingBytes) && info.maxBindingBytes >= 2 ** 27, "spec minimum is 128 MiB");
    assert.deepEqual(getDeviceInfo(), info);
  });

  gpuTest("matmul [64,128]x[128,32] matches float64", () => checkMatmul("webgpu"));
  gpuTest("softmax matches float64", () => checkSoftmax("webgpu"));

  gpuTest("switching back to wasm and again to webgpu works in one process", async (info) => {
    assert.deepEqual(await initDevice("wasm"), { name: "wasm", adapter: "wasm", maxBindingBytes: Infinity, shaderF16: false });
    await checkMatmul("wasm");
    assert.deepEqual(await initDevice("webgpu"), info);
    await checkMatmul("webgpu");
  });

  gpuTest("assertFitsBinding throws past the device limit", (info) => {
    assert.doesNotThrow(() => assertFitsBinding(info.maxBindingBytes, "exactly the limit"));
    assert.throws(() => assertFitsBinding(info.maxBindingBytes + 4, "lm_head.weight"), (e: unknown) =>
      e instanceof SelfscopeError && /lm_head\.weight needs .* webgpu/.test(e.message),
    );
    // An override can lower the limit but never raise it past what the device can bind.
    setMaxBindingBytesOverride(info.maxBindingBytes * 2);
    try {
      assert.equal(getDeviceInfo()?.maxBindingBytes, info.maxBindingBytes);
    } finally {
      setMaxBindingBytesOverride(undefined);
    }
  });

  gpuTest("an embedding larger than a lavapipe-sized limit is caught before it is allocated", async (info, t) => {
    if (info.maxBindingBytes > 256 * 2 ** 20) {
      t.skip(`device binds up to ${info.maxBindingBytes} bytes; this demonstration is for limits <= 256 MiB`);
      return;
    }
    // A Llama-style token embedding whose f32 size is just past the limit (on lavapipe's 128 MiB:
    // the 156 MiB matrix of engine-study probe p16, which computed zeros instead of failing).
    const hidden = 256;
    const vocab = Math.floor(info.maxBindingBytes / (hidden * 4)) + 1024;
    const bytes = vocab * hidden * 4;
    let allocated = false;
    const loadEmbedding = () => {
      assertFitsBinding(bytes, `embedding [${vocab}, ${hidden}] f32`);
      allocated = true; // the engine would allocate here; the guard must stop it first
      return np.ones([vocab, hidden]);
    };
    assert.throws(loadEmbedding, (e: unknown) => e instanceof SelfscopeError && /must be split into chunks/.test(e.message));
    assert.equal(allocated, false);

    // The same matrix split into row chunks that each fit (the first exactly at the limit)
    // computes correctly. Weights come from host data so each chunk is a real device buffer.
    const rowsPerChunk = Math.floor(info.maxBindingBytes / (hidden * 4));
    const x = np.ones([1, hidden]);
    let checked = 0;
    for (let start = 0; start < vocab; start += rowsPerChunk) {
      const rows = Math.min(rowsPerChunk, vocab - start);
      assertFitsBinding(rows * hidden * 4, `embedding rows ${start}..${start + rows}`);
      const w = np.array(new Float32Array(rows * hidden).fill(1), { shape: [rows, hidden] });
      const y = await np.matmul(x.ref, w.transpose()).data();
      assert.equal(y.length, rows);
      assert.equal(y[0], hidden);
      assert.equal(y[rows - 1], hidden);
      checked += rows;
    }
    x.dispose();
    assert.equal(checked, vocab);
  });
});
