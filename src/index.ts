// selfscope's public API: named re-exports only. Everything here takes and returns host data.
export { Model, type LoadOptions, type Prompt } from "./model/model.js";
export { ActivationCache } from "./engine/cache.js";
export type { ForwardOptions, ForwardResult, GenerateOptions, GenerateResult, Row, SampleOptions } from "./engine/types.js";
export type { ModelConfig } from "./engine/config.js";
export { describeSampler, sampleOptions, type EffectiveSampler, type SamplerRequest } from "./model/sampling.js";
export { hookName, BLOCK_SITES, type HookName, type BlockSite } from "./hooks/names.js";
export type { Intervention, Plan, PosSpec } from "./hooks/plan.js";
export { SelfscopeError, ModelFileError, WeightShapeError, UnsupportedArchitectureError, UsageError, NumericalError } from "./core/errors.js";
export type { Tokenizer } from "./io/tokenizer.js";
export type { ChatMessage } from "./io/chat-template.js";
export type { DeviceName, DeviceInfo } from "./engine/device.js";
export { BUNDLED_MODEL } from "./core/package.js";
