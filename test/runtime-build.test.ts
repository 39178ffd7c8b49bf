/**
 * `buildRuntimeInTurns` (reloads) builds the same runtime as `buildRuntime`, a slice of sites per
 * turn of the event loop, so the serving thread answers requests in between.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseConfig } from '../src/config/load.ts';
import { buildRuntime, buildRuntimeInTurns, type Runtime } from '../src/routing/runtime.ts';

const silent = { info() {}, warn() {} };

function config(count: number) {
  const sites = Array.from({ length: count }, (_, i) =>
    `  - hosts: [s${i}.test, www.s${i}.test]\n    tls: "off"\n${i % 2 === 0 ? '    hsts: 1y\n' : ''}    routes:\n      - path: /api\n        strip_prefix: true\n        upstreams: ["http://127.0.0.1:${1000 + i}"]\n      - upstreams: ["http://127.0.0.1:9", "http://127.0.0.2:9"]\n`).join('');
  return parseConfig(`sites:\n${sites}`, { source: 'test.yaml', baseDir: '/' });
}

/** What the router and /status see of a runtime. */
function shape(runtime: Runtime) {
  return {
    upstreams: runtime.upstreams.map((u) => u.origin),
    sites: runtime.sites.map((site) => ({ hosts: site.hosts, hsts: site.hsts, headers: site.httpsResponseHeaders, routes: site.routes.map(({ path, route }) => [path, route.strip, route.upstreams.map((u) => u.origin)]) })),
    routed: ['s0.test', 'www.s57.test', 's99.test', 'nope.test'].map((host) => {
      const routed = runtime.router.siteFor(host);
      return routed === undefined ? undefined : [routed.site.hosts[0], runtime.router.routeFor(routed, '/api/x')?.route.strip];
    }),
    states: runtime.upstreamStates().map((s) => [s.hosts, s.path, s.policy, s.upstreams.length]),
  };
}

test('the same runtime as buildRuntime, one slice of sites per turn', async () => {
  const { sites } = config(100);
  const whole = buildRuntime(sites, silent);
  let turns = 0;
  let counting = true;
  const count = () => { if (counting) { turns++; setImmediate(count); } };
  setImmediate(count);
  const sliced = await buildRuntimeInTurns(sites, silent, {}, 10);
  counting = false;
  try {
    assert.deepEqual(shape(sliced), shape(whole));
    assert.equal(sliced.sites.length, 100);
    // 100 sites, 10 a slice: 9 turns given back to the event loop.
    assert.ok(turns >= 9, `${turns} turns ran during the build`);
  } finally {
    await whole.close();
    await sliced.close();
  }
});
