// The block is written once (src/engine/schedule.ts): each backend must fire exactly the
// schedule's hook sites, in the schedule's order, on every family — in a forward pass, in a
// prefill split in chunks, and in every decode step.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { FIXTURE_FAMILIES, makeFixtures, type FixturePaths } from "../scripts/make-fixtures.js";
import { CpuEngine } from "../src/engine/cpu/engine.js";
import { scheduleOf, siteOrder } from "../src/engine/schedule.js";
import { BLOCK_SITES, hookNames } from "../src/hooks/names.js";
import { loadHostModel } from "../src/model/load.js";

let dir: string;
let fixtures: FixturePaths[];
before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-schedule-"));
  fixtures = makeFixtures(dir);
});
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const PROMPT = [5, 77, 123, 9, 250, 31];

describe("the block schedule", () => {
  test("every block site appears once per block, in BLOCK_SITES order, on every family", () => {
    for (const f of fixtures) {
      const c = loadHostModel(f.hf).config;
      const order = siteOrder(c);
      const blockSites = order.filter((n) => n.startsWith("blocks.0.")).map((n) => n.slice("blocks.0.".length));
      assert.deepEqual(blockSites, [...BLOCK_SITES], f.family);
      assert.deepEqual(order, hookNames(c.nLayers, () => true, { learnedPos: c.pos.kind === "learned" }), f.family);
      // The quirks are steps: post-norm families have no pre-norm step, qk-norm families a qkNorm step.
      const kinds = scheduleOf(c).block.map((s) => s.kind);
      assert.equal(kinds.includes("qkNorm"), c.qkNorm.kind !== "none", f.family);
      assert.equal(kinds.includes("rope"), c.pos.kind === "rope", f.family);
      assert.equal(kinds.filter((k) => k === "copy").length, c.blockNorm === "post" ? 2 : 0, f.family);
    }
  });

  test("a names filter selects hook points by pattern, list or predicate, and a filter matching nothing is an error", () => {
    assert.deepEqual(hookNames(2, /^blocks\.1\.hook_resid_(pre|post)$/), ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]);
    assert.deepEqual(hookNames(3, (n) => n.endsWith("ln2.hook_normalized")), ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized", "blocks.2.ln2.hook_normalized"]);
    assert.deepEqual(hookNames(1, ["hook_embed", "ln_final.hook_normalized"]), ["hook_embed", "ln_final.hook_normalized"]);
    assert.throws(() => hookNames(2, /attn\.hook_results/), /no hook point matches/);
  });

  for (const family of FIXTURE_FAMILIES) {
    test(`[cpu] ${family}: forward, chunked prefill and decode steps fire exactly the schedule's sites in order`, async () => {
      const f = fixtures.find((x) => x.family === family)!;
      const host = loadHostModel(f.hf);
      const e = await CpuEngine.create(host, { threads: 1 });
      try {
        const order = siteOrder(host.config);
        e.siteTrace = [];
        await e.forward([PROMPT]);
        assert.deepEqual(e.siteTrace, order);
        // 40 rows prefill in chunks of 3 slots (128 activation rows per chunk): each chunk runs every site.
        e.siteTrace = [];
        await e.forward(Array.from({ length: 40 }, () => PROMPT), { logits: "last" });
        // ("last" logits: the head, and its ln_final site, runs after the last chunk only.)
        assert.deepEqual(e.siteTrace, [...order.slice(0, -1), ...order]);
        // generate(): one prefill pass, then one per fed-back token (3 tokens: 2 decode steps).
        e.siteTrace = [];
        await e.generate([PROMPT], { maxTokens: 3, stop: [] });
        assert.deepEqual(e.siteTrace, [...order, ...order, ...order]);
      } finally {
        await e.close();
      }
    });
  }
});
