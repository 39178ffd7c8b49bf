/**
 * The worker thread of {@link loadConfigFileOffThread}: parses and validates one config text (YAML,
 * schema, the rules that span options, each problem with its file:line) away from the thread that
 * serves, and posts back the schema's output, or the problems. See `load.ts`.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { ConfigError, parseConfig, type ParseJob, type ParseAnswer } from './load.js';

const job = workerData as ParseJob;
let answer: ParseAnswer;
try {
  const capture: { parsed?: unknown } = {};
  parseConfig(job.text, { source: job.source, baseDir: job.baseDir }, capture);
  answer = { parsed: capture.parsed };
} catch (error) {
  answer = error instanceof ConfigError ? { issues: error.issues } : { failure: (error as Error)?.message ?? String(error) };
}
parentPort!.postMessage(answer);
