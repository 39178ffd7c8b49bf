/**
 * The plain-YAML shortcut of config loading (src/config/plain-yaml.ts) must read every document it
 * accepts exactly as the `yaml` package does, and leave everything else to it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { parse } from 'yaml';
import { parsePlainYaml } from '../src/config/plain-yaml.js';
import { parseConfig } from '../src/config/load.js';

const same = (text: string) => {
  const quick = parsePlainYaml(text);
  if (quick !== undefined) assert.deepEqual(quick, parse(text) ?? null, text);
  return quick;
};

test('the shipped configs read the same through the shortcut and through yaml', () => {
  assert.notEqual(same(readFileSync('config/default.yaml', 'utf8')), undefined);
  same(readFileSync('config/gatehouse.example.yaml', 'utf8')); // uses forms outside the subset: read by yaml
});

test('plain documents: block and flow collections, quotes, comments, core-schema scalars', () => {
  const documents = [
    'a: 1\nb: -2\nc: true\nd: false\ne: null\nf: ~\ng: 10s\nh: "quoted # not a comment"\ni: \'single\'\n',
    'listen:\n  http: 80\n  https: "127.0.0.1:8443"   # comment\n\n# full-line comment\nsites:\n- hosts: [a.test, "*.b.test"]\n  routes:\n    - path: /api/\n      upstreams:\n        - http://127.0.0.1:8081\n        - { url: http://127.0.0.1:8082, weight: 2 }\n',
    'sites:\n  - { hosts: [site1.test], tls: static, redirect: false, routes: [{ path: /, upstreams: ["http://127.0.0.1:1"] }] }\n',
    'list:\n  -\n    a: 1\n  - b\nempty:\nafter: x\n',
    'x: yes\ny: on\nz: 1_000\nv: 0.0.0.0:80\nw: 64KiB\nu: a b c\n',
    '',
  ];
  for (const text of documents) assert.notEqual(same(text), undefined, text);
});

test('anything else is left to yaml (undefined), never read differently', () => {
  const documents = [
    'a: &x 1\nb: *x\n', 'a: !!str 1\n', 'a: |\n  text\n', 'a: >\n  folded\n', 'a: 1.5\n', 'a: 0x1F\n', 'a: .inf\n',
    'a: 007\n', 'a: +5\n', 'a: True\n', 'a: NULL\n', 'a: "esc\\"aped"\n', "a: 'it''s'\n", 'a: 1\na: 2\n',
    '---\na: 1\n', 'a:\n\t- 1\n', 'a: [1,\n  2]\n', 'a: multi\n  line\n', '? complex\n: key\n', '1: numeric key\n',
    'a: *.example.test\n', 'a: b: c\n', 'a: [x: y]\n', 'a: {b}\n', '- a\nb: 1\n', 'a:\n    b: 1\n  c: 2\n', 'a: "unterminated\n',
    '__proto__: 1\n', 'a: @x\n', 'a: `x`\n', 'a: -x\n', 'a: 99999999999999999\n',
  ];
  for (const text of documents) {
    let expected: unknown;
    try { expected = parse(text, { uniqueKeys: true }); } catch { expected = Symbol('error'); }
    const quick = parsePlainYaml(text);
    if (quick !== undefined) assert.deepEqual(quick, expected, JSON.stringify(text));
  }
  assert.equal(parsePlainYaml('a: &x 1\nb: *x\n'), undefined);
  assert.equal(parsePlainYaml('a: 1\na: 2\n'), undefined);
});

test('a config with a problem is still refused with file:line (the shortcut never hides errors)', () => {
  const text = 'sites:\n  - { hosts: [a.test], tls: off, routes: [{ path: /, upstreams: ["http://127.0.0.1:1"] }] }\n  - { hosts: [a.test], tls: off, routes: [{ path: /, upstreams: ["localhost:80"] }] }\n';
  assert.notEqual(parsePlainYaml(text), undefined);
  assert.throws(() => parseConfig(text, { source: 'x.yaml', baseDir: '/tmp' }), (error: Error) => {
    assert.match(error.message, /GH_CONFIG_INVALID: sites\[1\]\.routes\[0\]\.upstreams\[0\]: .*\(x\.yaml:3\)/);
    return true;
  });
  const duplicate = 'sites:\n  - { hosts: [a.test], tls: off, routes: [{ path: /, upstreams: ["http://127.0.0.1:1"] }] }\n  - { hosts: [a.test], tls: off, routes: [{ path: /, upstreams: ["http://127.0.0.1:1"] }] }\n';
  assert.throws(() => parseConfig(duplicate, { source: 'x.yaml', baseDir: '/tmp' }), /already served by sites\[0\] \(x\.yaml:3\)/);
});
