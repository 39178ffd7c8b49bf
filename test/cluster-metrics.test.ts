/**
 * `workers` > 1: `/metrics` merges every worker's registry (observability/cluster-metrics.ts), over
 * node:cluster's real IPC, with each metric's aggregator. The fixture's two workers count known,
 * different amounts, so one worker's figures can never pass for the sum.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { test } from 'node:test';

const FIXTURE = fileURLToPath(new URL('./helpers/cluster-metrics-fixture.ts', import.meta.url));

test('the aggregated metrics of two workers: counters add up, the config version is the lowest, reloads count once', async () => {
  const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', FIXTURE], { timeout: 30_000 });
  const { text } = JSON.parse(stdout.trim().split('\n').at(-1)!) as { text: string };
  const value = (pattern: RegExp): number => {
    const match = pattern.exec(text);
    assert.ok(match, `${pattern} in:\n${text.slice(0, 2000)}`);
    return Number(match[1]);
  };
  // Worker 0 finished 10 requests, worker 1 finished 20.
  assert.equal(value(/^gatehouse_http_requests_total\{site="a\.test",route="\/",code="2xx"\} (\d+)$/m), 30);
  assert.equal(value(/^gatehouse_http_request_duration_seconds_count\{site="a\.test",route="\/"\} (\d+)$/m), 30);
  assert.equal(value(/^gatehouse_http_response_body_bytes_total\{site="a\.test",route="\/"\} (\d+)$/m), 3000);
  // Gauges that add up: tunnels 0 + 1.
  assert.equal(value(/^gatehouse_websocket_tunnels_open (\d+)$/m), 1);
  // Worker 0 serves version 2, worker 1 version 3: the lowest.
  assert.equal(value(/^gatehouse_config_version (\d+)$/m), 2);
  // One reload signal, seen by each worker: counted once.
  assert.equal(value(/^gatehouse_config_reloads_total\{result="success"\} (\d+)$/m), 1);
});
