// Two-alternative self-recognition with position-bias control (issue 17.3). Each item (an article)
// is shown twice, its own summary first and then second; a model that always picks position 1 is
// right exactly half the time whatever it recognizes. So besides the raw accuracy:
//   - accuracy in each order, and their mean (the position-balanced accuracy);
//   - P(choose position 1): the position bias, 0.5 without one;
//   - pairs (both orders answered): recognized (right both times), anti (wrong both times) and
//     position-driven (the same position both times). Position bias only makes position-driven
//     pairs, so recognized vs anti is the bias-free comparison: a two-sided sign test of
//     recognized against anti, and the share recognized among the pairs;
//   - a bootstrap over items (both orders resampled together) for the accuracy's interval.
import { clusteredBootstrap, signTest, wilson, type Rate } from "./stats.js";

export interface RecognitionTrial {
  item: string;
  /** Where the model's own text was shown. */
  selfAt: 1 | 2;
  /** The position chosen; null when no choice could be read (excluded from every rate). */
  choice: 1 | 2 | null;
  /** P(own text) from the option log-probabilities, when measured. */
  pSelf?: number | null;
}

export interface RecognitionStats {
  answered: number;
  unanswered: number;
  accuracy: Rate;
  /** Accuracy interval from a bootstrap over items. */
  accuracyBootstrap: { lo: number | null; hi: number | null };
  selfFirst: Rate;
  selfSecond: Rate;
  /** Mean of the two orders' accuracies. */
  balancedAccuracy: number | null;
  /** P(choose position 1). */
  choseFirst: Rate;
  pairs: { n: number; recognized: number; anti: number; positionDriven: number };
  recognizedShare: Rate;
  /** Two-sided sign test p of recognized vs anti pairs. */
  signP: number;
  /** Mean P(own text) over trials that have one. */
  meanPSelf: number | null;
}

export function recognitionStats(trials: readonly RecognitionTrial[], o: { resamples?: number; seed?: number } = {}): RecognitionStats {
  const ans = trials.filter((t) => t.choice !== null);
  const right = (t: RecognitionTrial) => t.choice === t.selfAt;
  const rate = (ts: readonly RecognitionTrial[]) => wilson(ts.filter(right).length, ts.length);
  const selfFirst = rate(ans.filter((t) => t.selfAt === 1));
  const selfSecond = rate(ans.filter((t) => t.selfAt === 2));
  const byItem = new Map<string, RecognitionTrial[]>();
  for (const t of ans) byItem.set(t.item, [...(byItem.get(t.item) ?? []), t]);
  let recognized = 0, anti = 0, positionDriven = 0, n = 0;
  for (const ts of byItem.values()) {
    const a = ts.find((t) => t.selfAt === 1), b = ts.find((t) => t.selfAt === 2);
    if (!a || !b) continue;
    n++;
    if (right(a) && right(b)) recognized++;
    else if (!right(a) && !right(b)) anti++;
    else positionDriven++;
  }
  const units = [...byItem.values()].map((ts) => ({ k: ts.filter(right).length, n: ts.length }));
  const boot = clusteredBootstrap(units, undefined, { resamples: o.resamples ?? 2000, seed: o.seed ?? 0 });
  const ps = trials.map((t) => t.pSelf).filter((p): p is number => typeof p === "number" && Number.isFinite(p));
  return {
    answered: ans.length,
    unanswered: trials.length - ans.length,
    accuracy: rate(ans),
    accuracyBootstrap: { lo: boot.lo, hi: boot.hi },
    selfFirst,
    selfSecond,
    balancedAccuracy: selfFirst.estimate === null || selfSecond.estimate === null ? null : (selfFirst.estimate + selfSecond.estimate) / 2,
    choseFirst: wilson(ans.filter((t) => t.choice === 1).length, ans.length),
    pairs: { n, recognized, anti, positionDriven },
    recognizedShare: wilson(recognized, n),
    signP: signTest(recognized, anti),
    meanPSelf: ps.length ? ps.reduce((s, p) => s + p, 0) / ps.length : null,
  };
}
