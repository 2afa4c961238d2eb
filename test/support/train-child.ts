// Child process for test/train-resume.test.ts: runs `selfscope train` (trainCommand) with the JSON
// arguments in argv[2] and SIGKILLs itself right after optimizer step argv[3] (mid-training: after the
// step's loss line is written, before any later checkpoint), as a crash or `kill -9` would.
import { trainCommand, type TrainArgs } from "../../src/cli/train.js";

const args = JSON.parse(process.argv[2]!) as TrainArgs;
const killAt = Number(process.argv[3]);
await trainCommand(args, {
  onStep: (r) => {
    if (r.step === killAt) process.kill(process.pid, "SIGKILL");
  },
});
