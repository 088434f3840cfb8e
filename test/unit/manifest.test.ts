import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { afterAll, describe, expect, it } from "vitest";
import { deploymentSpec } from "../../src/cli/lease-run.js";
import {
  loadDeploymentSpec,
  loadManifest,
  MANIFEST_DEFAULTS,
  ManifestError,
  type ParseManifestOptions,
  parseManifest,
} from "../../src/cli/manifest.js";
import { DeploymentSpecSchema } from "../../src/gen/leasehold/v1/resource_pb.js";

const files: Record<string, string> = { "/m/fixtures/data.csv": "a,b\n1,2\n" };
const options: ParseManifestOptions = {
  file: "manifest.yaml",
  dir: "/m",
  readFile: (path) => {
    const text = files[path];
    if (text === undefined) throw new Error(`ENOENT: no such file, open '${path}'`);
    return new TextEncoder().encode(text);
  },
};

/** The problems parseManifest reports for `text` (fails the test if it parses). */
function problemsOf(text: string): readonly string[] {
  try {
    parseManifest(text, options);
  } catch (error) {
    if (error instanceof ManifestError) return error.problems;
    throw error;
  }
  throw new Error("the manifest parsed without a problem");
}

const MINIMAL = `
runtime: east
deployment:
  containers:
    - name: web
      argv: [sleep, "60"]
`;

describe("live-test manifests", () => {
  it("parse with every field, and defaults fill what is left out", () => {
    const m = parseManifest(
      `
runtime: east
label: nightly
ttl: 20m
fixtures:
  - path: fixtures/data.csv
  - name: conf.json
    content: '{"a": 1}'
    mount: etc/conf.json
deployment:
  containers:
    - name: web
      argv: [node, server.mjs, 8080, true]
      env: {PORT: 8080, DEBUG: true, NAME: web}
      cwd: srv
  readiness:
    http: http://127.0.0.1:8080/health
    period: 500ms
    timeout: 2
  outputs_dir: out
  ready_timeout: 90s
checks:
  - http: {url: "http://127.0.0.1:8080/data.csv", body_contains: "a,b"}
  - name: not found
    http: {url: "http://127.0.0.1:8080/nope", status: 404}
    timeout: 3s
  - tcp: {port: 8080}
  - exec: {argv: [curl, -sf, "http://127.0.0.1:8080/"], exit_code: 0, stdout_contains: ok, cwd: scripts}
outputs:
  promote: [report.txt]
  collect_timeout: 2m
`,
      options,
    );
    expect(m).toMatchObject({
      dir: "/m",
      runtime: "east",
      label: "nightly",
      ttlMs: 20 * 60_000,
      deployment: {
        containers: [
          {
            name: "web",
            argv: ["node", "server.mjs", "8080", "true"],
            env: { PORT: "8080", DEBUG: "true", NAME: "web" },
            cwd: "srv",
          },
        ],
        readiness: { kind: "http", url: "http://127.0.0.1:8080/health", periodMs: 500, timeoutMs: 2000 },
        outputsDir: "out",
        readyTimeoutMs: 90_000,
      },
      promote: ["report.txt"],
      collectTimeoutMs: 120_000,
    });
    expect(m.fixtures.map((f) => [f.name, f.mount, new TextDecoder().decode(f.content)])).toEqual([
      ["data.csv", "data.csv", "a,b\n1,2\n"],
      ["conf.json", "etc/conf.json", '{"a": 1}'],
    ]);
    expect(m.checks).toEqual([
      {
        kind: "http",
        name: "GET http://127.0.0.1:8080/data.csv",
        url: "http://127.0.0.1:8080/data.csv",
        status: 200,
        bodyContains: "a,b",
        timeoutMs: MANIFEST_DEFAULTS.checkTimeoutMs,
      },
      {
        kind: "http",
        name: "not found",
        url: "http://127.0.0.1:8080/nope",
        status: 404,
        timeoutMs: 3000,
      },
      { kind: "tcp", name: "tcp 127.0.0.1:8080", host: "127.0.0.1", port: 8080, timeoutMs: 10_000 },
      {
        kind: "exec",
        name: "curl -sf http://127.0.0.1:8080/",
        command: { argv: ["curl", "-sf", "http://127.0.0.1:8080/"], env: {}, cwd: "scripts" },
        exitCode: 0,
        stdoutContains: "ok",
        timeoutMs: 10_000,
      },
    ]);
  });

  it("need only a runtime and a container; the rest has documented defaults", () => {
    const m = parseManifest(MINIMAL, options);
    expect(m).toEqual({
      dir: "/m",
      runtime: "east",
      label: "",
      ttlMs: MANIFEST_DEFAULTS.ttlMs,
      fixtures: [],
      deployment: {
        containers: [{ name: "web", argv: ["sleep", "60"], env: {}, cwd: "" }],
        readiness: undefined,
        outputsDir: "",
        readyTimeoutMs: MANIFEST_DEFAULTS.readyTimeoutMs,
      },
      checks: [],
      promote: [],
      collectTimeoutMs: MANIFEST_DEFAULTS.collectTimeoutMs,
    });
    expect(m.ttlMs).toBe(15 * 60_000);
  });

  it("the README's example in examples/http-smoke is valid", () => {
    const m = loadManifest(join(import.meta.dirname, "../../examples/http-smoke/manifest.yaml"));
    expect(m.runtime).toBe("local");
    expect(m.fixtures.map((f) => f.name)).toEqual(["server.mjs", "hello.txt", "config.json"]);
    expect(m.checks.map((c) => c.kind)).toEqual(["http", "http", "tcp", "exec"]);
    expect(m.promote).toEqual(["requests.log"]);
  });

  it("a missing required field is named by its path, and every problem is listed at once", () => {
    expect(
      problemsOf(`
label: x
checks:
  - name: first
    http: {url: "http://127.0.0.1/"}
  - http: {status: 200}
  - tcp: {host: localhost}
  - exec: {exit_code: 1}
`),
    ).toEqual([
      "runtime: is required",
      "deployment: is required",
      "checks[1].http.url: is required",
      "checks[2].tcp.port: is required",
      "checks[3].exec.argv: is required (the program and its arguments)",
    ]);
    expect(problemsOf("runtime: east\ndeployment: {}\n")).toEqual([
      "deployment.containers: is required (at least one container)",
    ]);
    expect(problemsOf("runtime: east\ndeployment: {containers: []}\n")).toEqual([
      "deployment.containers: needs at least one container",
    ]);
    expect(problemsOf("runtime: east\ndeployment: {containers: [{argv: [ls]}]}\n")).toEqual([
      "deployment.containers[0].name: is required",
    ]);
  });

  it("an unknown key is an error at every level, naming the keys that are allowed", () => {
    expect(
      problemsOf(`${MINIMAL}      image: busybox
  replicas: 2
checks:
  - http: {url: "http://x/", method: POST}
    retries: 3
fixtures:
  - {name: a, content: b, mode: "0644"}
outputs: {keep: [a]}
colour: blue
`),
    ).toEqual([
      "colour: unknown key (expected one of runtime, label, ttl, fixtures, deployment, checks, outputs)",
      "fixtures[0].mode: unknown key (expected one of name, path, content, mount)",
      "deployment.replicas: unknown key (expected one of containers, readiness, outputs_dir, ready_timeout)",
      "deployment.containers[0].image: unknown key (expected one of name, argv, env, cwd)",
      "checks[0].retries: unknown key (expected one of name, timeout, http, tcp, exec)",
      "checks[0].http.method: unknown key (expected one of url, status, body_contains)",
      "outputs.keep: unknown key (expected one of promote, collect_timeout)",
    ]);
  });

  it("a readiness URL off the agent's own host is refused before any lease exists", () => {
    const readiness = (url: string) =>
      problemsOf(`
runtime: east
deployment:
  containers: [{name: web, argv: [ls]}]
  readiness: {http: "${url}"}
`);
    expect(readiness("http://169.254.169.254/latest/meta-data/")).toEqual([
      'deployment.readiness.http: must be on the agent\'s own host (localhost, 127.0.0.0/8 or [::1]), not "169.254.169.254": the agent probes nothing else',
    ]);
    expect(readiness("http://user:pw@127.0.0.1/")).toEqual([
      "deployment.readiness.http: must not carry a user name or password (user:password@): the agent sends none",
    ]);
  });

  it("a bad duration names its field; a number means seconds", () => {
    expect(
      problemsOf(`
runtime: east
ttl: ten minutes
deployment:
  containers: [{name: web, argv: [ls]}]
  readiness: {tcp: 80, period: fast, timeout: 0s}
  ready_timeout: -5s
checks:
  - tcp: {port: 80}
    timeout: 10 s
outputs: {collect_timeout: [1]}
`),
    ).toEqual([
      'ttl: must be a duration like 500ms, 10s, 2m or 1h (got string "ten minutes")',
      'deployment.readiness.period: must be a duration like 500ms, 10s, 2m or 1h (got string "fast")',
      "deployment.readiness.timeout: must be at least 100ms",
      'deployment.ready_timeout: must be a duration like 500ms, 10s, 2m or 1h (got string "-5s")',
      'checks[0].timeout: must be a duration like 500ms, 10s, 2m or 1h (got string "10 s")',
      "outputs.collect_timeout: must be a duration like 500ms, 10s, 2m or 1h (got a list)",
    ]);
    expect(problemsOf(`${MINIMAL}ttl: 500ms\n`)).toEqual(["ttl: must be at least 1s"]);
    // A TTL is kept in whole milliseconds: a finer one is refused, not rounded up to 1s.
    expect(problemsOf(`${MINIMAL}ttl: 0.9995s\n`)).toEqual([
      'ttl: must be a whole number of milliseconds (got string "0.9995s")',
    ]);
    expect(problemsOf(`${MINIMAL}ttl: 0.9995\n`)).toEqual([
      "ttl: must be a whole number of milliseconds (got number 0.9995)",
    ]);
    expect(parseManifest(`${MINIMAL}ttl: 1.001\n`, options).ttlMs).toBe(1001);
    expect(parseManifest(`${MINIMAL}ttl: 90\n`, options).ttlMs).toBe(90_000);
    expect(parseManifest(`${MINIMAL}ttl: 1.5h\n`, options).ttlMs).toBe(90 * 60_000);
  });

  it("the server's limits are checked before any lease exists", () => {
    expect(
      problemsOf(`
runtime: east/1
label: ${"x".repeat(129)}
deployment:
  containers:
    - {name: "web server", argv: [ls], cwd: /srv, env: {"A=B": x}}
    - {name: ${"c".repeat(64)}, argv: [""]}
  readiness: {exec: {argv: [test], cwd: ../up}, period: 50ms, timeout: 11m}
  outputs_dir: /tmp/out
  ready_timeout: 25h
checks:
  - exec: {argv: [ls], cwd: ../anywhere}
outputs: {collect_timeout: 2h}
`),
    ).toEqual([
      "runtime: may contain only letters, digits, '.', '_', '-' and ':'",
      "label: must be at most 128 characters",
      "deployment.containers[0].name: may contain only letters, digits, '.', '_', '-' and ':'",
      'deployment.containers[0].env: "A=B" is not a variable name',
      'deployment.containers[0].cwd: must be a relative path inside the work directory, without .. (got "/srv")',
      "deployment.containers[1].name: must be at most 63 characters",
      "deployment.containers[1].argv[0]: must not be empty (it is the program to run)",
      'deployment.outputs_dir: must be a relative path inside the work directory, without .. (got "/tmp/out")',
      "deployment.readiness.period: must be at least 100ms",
      "deployment.readiness.timeout: must be at most 10m",
      'deployment.readiness.exec.cwd: must be a relative path inside the work directory, without .. (got "../up")',
      "deployment.ready_timeout: must be at most 24h",
      "outputs.collect_timeout: must be at most 1h",
    ]);
  });

  it("every field the server limits is checked with the server's own validator, at its manifest path", () => {
    const long = "x".repeat(100 * 1024);
    expect(
      problemsOf(`
runtime: east
label: ${"L".repeat(300)}
ttl: 100000000h
fixtures:
  - {content: a, name: a.txt, mount: ${"m/".repeat(600)}a.txt}
deployment:
  containers:
    - name: w
      argv: [echo, ${long}]
      env: {BIG: ${long}, ${"K".repeat(300)}: v}
  readiness: {http: "http://127.0.0.1/${"p".repeat(2100)}"}
  outputs_dir: ${"o".repeat(1100)}
`),
    ).toEqual([
      // Reported once, by the manifest's own check, not again by the server's.
      "label: must be at most 128 characters",
      "ttl: is longer than any server takes: a lease's TTL is at most the server's --lease-max-ttl, 24h by default " +
        '(got string "100000000h")',
      "fixtures[0].mount: must be at most 1024 characters (got 1205)",
      "deployment.containers[0].argv[1]: must be at most 65536 characters (got 102400)",
      'deployment.containers[0].env["BIG"]: must be at most 65536 characters (got 102400)',
      // The key is cut in the path, as the server cuts it.
      `deployment.containers[0].env["${"K".repeat(64)}"…]: keys must be at most 256 characters (got 300)`,
      "deployment.outputs_dir: must be at most 1024 characters (got 1100)",
      "deployment.readiness.http: must be at most 2048 characters (got 2117)",
    ]);
  });

  it("a duration too long for any request is refused with its field, a TTL with the server's maximum", () => {
    const huge = "999999999999999999999s";
    expect(
      problemsOf(`
runtime: east
ttl: ${huge}
deployment:
  containers:
    - {name: w, argv: [sleep, 1], env: {PORT: 1e400}}
  ready_timeout: ${huge}
checks:
  - {tcp: {port: 80}, timeout: ${huge}}
outputs: {collect_timeout: 1e30}
`),
    ).toEqual([
      `ttl: is longer than any server takes: a lease's TTL is at most the server's --lease-max-ttl, 24h by default (got string "${huge}")`,
      // YAML reads 1e400 as a number no double holds: it would have become the text "Infinity".
      "deployment.containers[0].env.PORT: is a number too large to write as text (Infinity); quote it to pass it as it is written",
      "deployment.ready_timeout: must be at most 24h",
      "checks[0].timeout: must be at most 24h",
      "outputs.collect_timeout: must be at most 1h",
    ]);
    expect(problemsOf(`${MINIMAL}ttl: 1e21\n`)).toEqual([
      "ttl: is longer than any server takes: a lease's TTL is at most the server's --lease-max-ttl, 24h by default (got number 1e+21)",
    ]);
  });

  it("a value of the wrong type says what it got", () => {
    expect(
      problemsOf(`
runtime: 3
label: [a]
fixtures: {name: a}
deployment:
  containers:
    - name: web
      argv: ls -l
      env: {A: {nested: 1}}
checks: {http: {url: "http://x/"}}
`),
    ).toEqual([
      "runtime: must be a string (got number 3)",
      "label: must be a string (got a list)",
      "fixtures: must be a list (got a mapping)",
      'deployment.containers[0].argv: must be a list (got string "ls -l")',
      "deployment.containers[0].env.A: must be a string (got a mapping)",
      "checks: must be a list (got a mapping)",
    ]);
    expect(problemsOf("- runtime: east\n")).toEqual(["must be a mapping (got a list)"]);
  });

  it("a check, a readiness probe and a fixture each take exactly one of their kinds", () => {
    expect(
      problemsOf(`
runtime: east
fixtures:
  - {name: a, path: a.txt, content: x}
  - {name: b}
deployment:
  containers: [{name: web, argv: [ls]}]
  readiness: {period: 1s}
checks:
  - {name: both, http: {url: "http://x/"}, tcp: {port: 1}}
  - {name: none}
`),
    ).toEqual([
      "fixtures[0]: needs exactly one of path (a file, relative to the manifest) or content (inline text)",
      "fixtures[1]: needs exactly one of path (a file, relative to the manifest) or content (inline text)",
      "deployment.readiness: needs exactly one of http, tcp, exec (got none)",
      "checks[0]: needs exactly one of http, tcp, exec (got http and tcp)",
      "checks[1]: needs exactly one of http, tcp, exec (got none)",
    ]);
  });

  it("values are checked: URLs, ports, status and exit codes, relative mounts, readable fixtures", () => {
    expect(
      problemsOf(`
runtime: east
fixtures:
  - {path: missing.txt}
  - {name: a, content: x, mount: /etc/passwd}
  - {name: b, content: x, mount: ../b}
deployment:
  containers: [{name: web, argv: [ls]}]
  readiness: {http: "ftp://x/"}
checks:
  - http: {url: "not a url"}
  - http: {url: "http://x/", status: 99}
  - tcp: {port: 70000}
  - exec: {argv: [false], exit_code: 1.5}
`),
    ).toEqual([
      "fixtures[0].path: cannot read /m/missing.txt: ENOENT: no such file, open '/m/missing.txt'",
      'fixtures[1].mount: must be a relative path inside the work directory, without .. (got "/etc/passwd")',
      'fixtures[2].mount: must be a relative path inside the work directory, without .. (got "../b")',
      'deployment.readiness.http: must be an http:// or https:// URL (got "ftp://x/")',
      'checks[0].http.url: must be an http:// or https:// URL (got "not a url")',
      "checks[1].http.status: must be an HTTP status code, a whole number from 100 to 599 (got number 99)",
      "checks[2].tcp.port: must be a port number, a whole number from 1 to 65535 (got number 70000)",
      "checks[3].exec.exit_code: must be an exit code, a whole number from 0 to 255 (got number 1.5)",
    ]);
  });

  it("names must be unique: containers, checks (also by their default names), fixtures, promoted outputs", () => {
    expect(
      problemsOf(`
runtime: east
fixtures:
  - {name: a, content: x}
  - {name: a, content: y, mount: other}
  - {name: c, content: z, mount: other}
deployment:
  containers: [{name: web, argv: [ls]}, {name: web, argv: [ls]}]
checks:
  - tcp: {port: 80}
  - tcp: {port: 80}
outputs: {promote: [r.txt, r.txt]}
`),
    ).toEqual([
      'fixtures[1].name: "a" is already used by fixtures[0].name',
      'fixtures[2].mount: "other" is already used by fixtures[1].mount',
      'deployment.containers[1].name: "web" is already used by deployment.containers[0].name',
      'checks[1].name: "tcp 127.0.0.1:80" is already used by checks[0].name',
      'outputs.promote[1]: "r.txt" is already used by outputs.promote[0]',
      "outputs.promote: needs deployment.outputs_dir (the directory the outputs are saved from)",
    ]);
  });

  it("reports a duplicate name beside the other problems of the entries that hold it", () => {
    expect(
      problemsOf(
        `
runtime: east
fixtures:
  - {name: a, path: missing.txt}
  - {name: a, content: y}
deployment:
  containers: [{name: web, argv: [ls]}]
checks:
  - {name: up, http: {url: "http://x/"}, tcp: {port: 80}}
  - {name: up, tcp: {port: 80}}
`,
      ),
    ).toEqual([
      "fixtures[0].path: cannot read /m/missing.txt: ENOENT: no such file, open '/m/missing.txt'",
      'fixtures[1].name: "a" is already used by fixtures[0].name',
      // Its mount defaults to its name.
      'fixtures[1].mount: "a" is already used by fixtures[0].mount',
      "checks[0]: needs exactly one of http, tcp, exec (got http and tcp)",
      'checks[1].name: "up" is already used by checks[0].name',
    ]);
  });

  it("YAML errors are reported with their line, and an empty file says what it needs", () => {
    expect(problemsOf("runtime: a\nruntime: b\n")).toEqual([
      expect.stringMatching(/^YAML: Map keys must be unique at line 2, column 1$/),
    ]);
    expect(problemsOf("runtime: [east\n")).toEqual([expect.stringMatching(/^YAML: .* at line 2, column 1$/)]);
    expect(problemsOf(`${MINIMAL}---\nruntime: west\n`)).toEqual([
      expect.stringMatching(/^YAML: Source contains multiple documents/),
    ]);
    expect(problemsOf("")).toEqual([
      "the manifest is empty (it must be a mapping with at least runtime and deployment)",
    ]);
    expect(() => parseManifest("runtime: 1\n", options)).toThrow(
      "manifest.yaml: invalid (2 problems):\n  runtime: must be a string (got number 1)\n  deployment: is required",
    );
  });

  it("becomes the DeploymentSpec the server gets, with the uploaded fixtures as inputs", () => {
    const spec = (readiness: string) =>
      create(
        DeploymentSpecSchema,
        deploymentSpec(
          parseManifest(
            `runtime: east
deployment:
  containers: [{name: web, argv: [node, s.mjs], env: {PORT: 80}, cwd: srv}]
  readiness: ${readiness}
  outputs_dir: out
`,
            options,
          ).deployment,
          [{ fileId: "file-1", path: "s.mjs" }],
        ),
      );
    const http = spec("{http: 'http://127.0.0.1/', period: 250ms, timeout: 3s}");
    expect(http.containers).toMatchObject([
      { name: "web", command: { argv: ["node", "s.mjs"], env: { PORT: "80" }, cwd: "srv" } },
    ]);
    expect(http.readinessProbe?.check).toEqual({ case: "httpGet", value: "http://127.0.0.1/" });
    expect(http.readinessProbe?.period).toMatchObject({ seconds: 0n, nanos: 250_000_000 });
    expect(http.readinessProbe?.timeout).toMatchObject({ seconds: 3n, nanos: 0 });
    expect(http.outputsDir).toBe("out");
    expect(http.inputs).toMatchObject([{ fileId: "file-1", path: "s.mjs" }]);
    expect(spec("{tcp: 80}").readinessProbe).toMatchObject({ check: { case: "tcpPort", value: 80 } });
    expect(spec("{tcp: 80}").readinessProbe?.period).toBeUndefined();
    expect(spec("{exec: {argv: [test, -f, ready]}}").readinessProbe?.check).toMatchObject({
      case: "exec",
      value: { argv: ["test", "-f", "ready"] },
    });
  });
});

describe("deployment spec files", () => {
  const dir = mkdtempSync(join(tmpdir(), "leasehold-spec-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const write = (name: string, text: string) => {
    const path = join(dir, name);
    writeFileSync(path, text);
    return path;
  };
  const load = (path: string) => loadDeploymentSpec(path, (plan) => deploymentSpec(plan, []));

  it("read the proto3 JSON of a DeploymentSpec, as JSON or YAML", () => {
    const fromJsonFile = load(
      write(
        "spec.json",
        JSON.stringify({
          containers: [{ name: "web", command: { argv: ["sleep", "60"] } }],
          readinessProbe: { tcpPort: 8080, period: "0.5s" },
          outputsDir: "out",
          inputs: [{ fileId: "f1", path: "a.txt" }],
        }),
      ),
    );
    const fromYamlFile = load(
      write(
        "spec.yaml",
        `containers:
  - name: web
    command: {argv: [sleep, "60"]}
readiness_probe: {tcp_port: 8080, period: 0.5s}
outputs_dir: out
inputs: [{file_id: f1, path: a.txt}]
`,
      ),
    );
    expect(fromYamlFile).toEqual(fromJsonFile);
    expect(fromJsonFile.readinessProbe?.check).toEqual({ case: "tcpPort", value: 8080 });
  });

  it("name the field that is wrong", () => {
    const problems = (text: string) => {
      try {
        load(write("bad.yaml", text));
      } catch (error) {
        return (error as ManifestError).problems;
      }
      return [];
    };
    expect(problems("containers: [{name: web, command: {argv: ls}}]\n")).toEqual([
      expect.stringContaining("leasehold.v1.Command.argv"),
    ]);
    expect(problems("containers: []\nreplicas: 2\n")).toEqual([expect.stringContaining('key "replicas"')]);
    expect(problems("- a\n")).toEqual(["must be a DeploymentSpec object (got a list)"]);
    expect(() => load(join(dir, "missing.json"))).toThrow(/cannot read the spec: ENOENT/);
    // The message says both shapes a spec may take.
    expect(problems("containers: []\nreplicas: 2\n")).toEqual([
      expect.stringContaining("or as a manifest's deployment (containers[].argv, readiness, outputs_dir)"),
    ]);
  });

  it("read a manifest's deployment as the same spec lease run would send", () => {
    const asManifest = load(
      write(
        "manifest-shape.yaml",
        `containers:
  - name: web
    argv: [python3, -m, http.server, "8080"]
    env: {A: "1"}
readiness: {tcp: 8080}
outputs_dir: out
`,
      ),
    );
    const asSpec = load(
      write(
        "spec-shape.yaml",
        `containers:
  - name: web
    command: {argv: [python3, -m, http.server, "8080"], env: {A: "1"}}
readinessProbe: {tcpPort: 8080}
outputsDir: out
`,
      ),
    );
    expect(asManifest).toEqual(asSpec);
    // Checked as a manifest's deployment is, every problem named by its path.
    let problems: readonly string[] = [];
    try {
      load(write("manifest-bad.yaml", "containers: [{name: web, argv: []}]\nreadiness: {tcp: 0}\n"));
    } catch (error) {
      problems = (error as ManifestError).problems;
    }
    expect(problems).toEqual([
      expect.stringMatching(/^deployment\.containers\[0\]\.argv: /),
      expect.stringMatching(/^deployment\.readiness\.tcp: /),
    ]);
  });
});
