import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { normalizeHost, Router } from '../src/routing/router.ts';

function site(name: string, hosts: string[], paths: string[]) {
  return { name, hosts, routes: paths.map((path) => ({ path, route: `${name}${path}` })) };
}

describe('router', () => {
  const router = new Router([
    site('app', ['app.example.com'], ['/', '/api/', '/api/v2', '/static']),
    site('wild', ['*.apps.example.com'], ['/']),
    site('any', ['*'], ['/only/']),
  ]);
  const route = (host: string, target: string) => {
    const s = router.siteFor(host);
    return s && router.routeFor(s, target)?.route;
  };

  it('picks the site by exact name, then one-label wildcard, then catch-all', () => {
    assert.equal(router.siteFor('app.example.com')?.site.name, 'app');
    assert.equal(router.siteFor('x.apps.example.com')?.site.name, 'wild');
    assert.equal(router.siteFor('y.x.apps.example.com')?.site.name, 'any', 'a wildcard covers one label only');
    assert.equal(router.siteFor('apps.example.com')?.site.name, 'any');
    assert.equal(new Router([site('a', ['a.test'], ['/'])]).siteFor('b.test'), undefined);
  });

  it('picks the longest prefix on a segment boundary', () => {
    assert.equal(route('app.example.com', '/'), 'app/');
    assert.equal(route('app.example.com', '/api'), 'app/api/');
    assert.equal(route('app.example.com', '/api/users?x=1'), 'app/api/');
    assert.equal(route('app.example.com', '/api?x=1'), 'app/api/');
    assert.equal(route('app.example.com', '/apix'), 'app/');
    assert.equal(route('app.example.com', '/api/v2/things'), 'app/api/v2');
    assert.equal(route('app.example.com', '/api/v20'), 'app/api/');
    assert.equal(route('app.example.com', '/static'), 'app/static');
    assert.equal(route('other.test', '/only/x'), 'any/only/');
    assert.equal(route('other.test', '/nothing'), undefined);
  });

  it('normalises hosts', () => {
    assert.equal(normalizeHost('App.Example.COM:8443'), 'app.example.com');
    assert.equal(normalizeHost('example.com.'), 'example.com');
    assert.equal(normalizeHost('[::1]:443'), '::1');
    assert.equal(normalizeHost('127.0.0.1'), '127.0.0.1');
    assert.equal(normalizeHost('user@example.com'), undefined);
    assert.equal(normalizeHost('example.com:80x'), undefined);
    assert.equal(normalizeHost('[::1'), undefined);
    assert.equal(normalizeHost(''), undefined);
    assert.equal(normalizeHost(undefined), undefined);
  });
});
