// The trained params as a safetensors file: LoRA factors as PEFT names them per module
// (…lora_A [rank, in], …lora_B [out, rank]), vectors and deltas as themselves, scales as [1]; the
// training config goes in the metadata ("selfscope.train") with each param's description.
import { readSafetensorsHeader, readStTensor, writeSafetensors, openSafetensors } from "../io/safetensors.js";
import { UsageError } from "../core/errors.js";
import type { TrainParam } from "../engine/grad.js";
import type { Intervention, Plan } from "../hooks/plan.js";
import { arraysOf, paramKey } from "./params.js";
import { createHash } from "node:crypto";
import fs from "node:fs";
import { Model, type LoadOptions } from "../model/model.js";

type Desc = Record<string, unknown> & { kind: string; key: string };

export function writeAdapter(file: string, params: TrainParam[], config: Record<string, unknown>): void {
  const tensors: Record<string, { data: Float32Array; shape: number[] }> = {};
  const descs: Desc[] = params.map((p, i) => {
    const key = paramKey(p, i);
    if (p.kind === "lora") {
      const dIn = p.a.length / p.rank;
      tensors[`${key}.lora_A`] = { data: p.a, shape: [p.rank, dIn] };
      tensors[`${key}.lora_B`] = { data: p.b, shape: [p.b.length / p.rank, p.rank] };
      return { kind: "lora", key, layer: p.layer, linear: p.linear, rank: p.rank, scale: p.scale ?? 1 };
    }
    if (p.kind === "scale") {
      tensors[key] = { data: Float32Array.of(p.value), shape: [1] };
      tensors[`${key}.vector`] = { data: p.vector, shape: [p.vector.length] };
      return { kind: "scale", key, at: p.at, ...(p.pos ? { pos: p.pos } : {}) };
    }
    const [v] = arraysOf(p);
    tensors[key] = { data: v!, shape: [v!.length] };
    const q = p as { kind: string; at?: string; name?: string; pos?: unknown };
    return { kind: q.kind, key, ...(q.at ? { at: q.at } : {}), ...(q.name ? { name: q.name } : {}), ...(q.pos ? { pos: q.pos } : {}) };
  });
  writeSafetensors(file, tensors, { "selfscope.train": JSON.stringify({ config, params: descs }) });
}

/** Read an adapter written by writeAdapter back into TrainParams (and its config). */
export function readAdapter(file: string): { params: TrainParam[]; config: Record<string, unknown> } {
  const meta = readSafetensorsHeader(file).metadata?.["selfscope.train"];
  if (!meta) throw new UsageError(`${file}: not a selfscope adapter (no "selfscope.train" metadata)`);
  const { config, params } = JSON.parse(meta) as { config: Record<string, unknown>; params: Desc[] };
  const set = openSafetensors(file);
  const t = (name: string) => readStTensor(set, name).data;
  const out = params.map((d): TrainParam => {
    if (d.kind === "lora") return { kind: "lora", layer: d.layer as number, linear: d.linear as never, rank: d.rank as number, scale: d.scale as number, a: t(`${d.key}.lora_A`), b: t(`${d.key}.lora_B`) };
    if (d.kind === "vector") return { kind: "vector", at: d.at as never, value: t(d.key), ...(d.pos ? { pos: d.pos as never } : {}) };
    if (d.kind === "scale") return { kind: "scale", at: d.at as never, value: t(d.key)[0]!, vector: t(`${d.key}.vector`), ...(d.pos ? { pos: d.pos as never } : {}) };
    if (d.kind === "delta") return { kind: "delta", name: d.name, value: t(d.key) } as unknown as TrainParam;
    throw new UsageError(`${file}: unknown param kind ${d.kind}`);
  });
  return { params: out, config };
}

/**
 * The inference plan of an adapter's vector and scale params (`model.withPlan(adapterPlan(p))` runs a
 * trained vector in forward/generate). LoRA and weight deltas change weights, which a plan cannot:
 * they are refused until the engine applies them at inference (or a merged export exists).
 */
export function adapterPlan(params: TrainParam[]): Plan {
  return params.map((p): Intervention => {
    if (p.kind === "vector") return { op: "add", at: p.at, vector: p.value, scale: 1, ...(p.pos ? { pos: p.pos } : {}) };
    if (p.kind === "scale") return { op: "add", at: p.at, vector: p.vector, scale: p.value, ...(p.pos ? { pos: p.pos } : {}) };
    throw new UsageError(`adapter param ${paramKey(p, 0)} (${p.kind}) changes weights; only vector and scale adapters load as a plan today`);
  });
}

/** The adapter file a model was loaded with, as a run header records it. */
export interface AdapterRef {
  path: string;
  sha256: string;
}

/**
 * Load `model` with a trained adapter applied at inference (`--adapter`): LoRA factors and weight deltas
 * merged into the weights at load, vectors and scales as a standing plan. The adapter's sha256 enters the
 * model's weightsHash, so a run's header, its resume check and the vector cache see the adapted model.
 */
export async function loadWithAdapter(model: string, adapter: string | undefined, opts: LoadOptions = {}): Promise<{ model: Model; adapter: AdapterRef | null }> {
  if (adapter === undefined) return { model: await Model.load(model, opts), adapter: null };
  if (!fs.existsSync(adapter) || !fs.statSync(adapter).isFile()) throw new UsageError(`--adapter ${adapter}: no such file (selfscope train writes OUT/adapter.safetensors)`);
  const { params } = readAdapter(adapter);
  const sha256 = createHash("sha256").update(fs.readFileSync(adapter)).digest("hex");
  const weightParams = params.filter((p) => p.kind === "lora" || p.kind === "delta");
  const planParams = params.filter((p) => p.kind === "vector" || p.kind === "scale");
  let m: Model;
  try {
    m = await Model.load(model, { ...opts, ...(weightParams.length > 0 ? { merge: { params: weightParams, id: sha256 } } : {}) });
  } catch (e) {
    if (e instanceof UsageError && /^export: /.test(e.message)) throw new UsageError(`--adapter ${adapter}: ${e.message.slice(8)} (an adapter trained on another model?)`);
    throw e;
  }
  for (const p of planParams) {
    const n = p.kind === "vector" ? p.value.length : p.vector.length;
    if (n !== m.config.dModel) {
      m.dispose();
      throw new UsageError(`--adapter ${adapter}: a ${p.kind} of ${n} numbers at ${p.at}, but ${model} has d_model ${m.config.dModel} (an adapter trained on another model?)`);
    }
  }
  const ref = { path: adapter, sha256 };
  return { model: planParams.length > 0 ? m.withPlan(adapterPlan(planParams), { owning: true }) : m, adapter: ref };
}
