// Parses wrk or h2load output (stdin) into one JSON line: { value, unit, error? }.
// A run counts as failed when nothing completed or more than 1% of requests failed or answered
// something other than 2xx/3xx, so an error page served fast never passes for throughput.
// Usage: wrk ... | node bench/parse-output.mjs wrk
import { readFileSync } from 'node:fs';

const tool = process.argv[2];
const text = readFileSync(0, 'utf8');
const number = (re) => { const m = re.exec(text); return m ? Number(m[1]) : undefined; };
const lastLine = () => text.trim().split('\n').filter(Boolean).slice(-2).join(' ').slice(0, 200);

let result;
if (tool === 'wrk') {
  const rate = number(/Requests\/sec:\s+([\d.]+)/);
  const requests = number(/(\d+) requests in/) ?? 0;
  const non2xx = number(/Non-2xx or 3xx responses:\s+(\d+)/) ?? 0;
  const m = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(text);
  const socketErrors = m ? m.slice(1).reduce((a, b) => a + Number(b), 0) : 0;
  if (rate === undefined || requests === 0) result = { error: `wrk: ${lastLine() || 'no output'}` };
  else if (non2xx > requests * 0.01) result = { error: `${non2xx} of ${requests} answers not 2xx/3xx` };
  else if (socketErrors > requests * 0.01) result = { error: `${socketErrors} socket errors (${m[0]})` };
  else result = { value: rate, unit: 'req/s' };
} else if (tool === 'h2load') {
  const rate = number(/finished in [\d.]+\w+, ([\d.]+) req\/s/);
  const done = number(/requests: \d+ total, \d+ started, (\d+) done/) ?? 0;
  const ok = number(/status codes: (\d+) 2xx/) ?? 0;
  if (rate === undefined || done === 0) result = { error: `h2load: ${lastLine() || 'no output'}` };
  else if (done - ok > done * 0.01) result = { error: `${done - ok} of ${done} answers not 2xx` };
  else result = { value: rate, unit: 'req/s' };
} else {
  throw new Error(`unknown tool ${tool}`);
}
process.stdout.write(`${JSON.stringify({ value: null, ...result })}\n`);
