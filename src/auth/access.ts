import { Code, LeaseholdError, quote } from "../errors.js";

/**
 * Roles a policy grants (README, "Securing Leasehold"):
 * - `agent`: run a worker (`WorkerService.Connect`) in its clusters, with a
 *   worker id matching its pattern; and upload the files its deployments
 *   produce (`CreateFile` naming `output_of`, a run its session holds, in
 *   that run's lease; no other file, so that an agent cannot plant files in
 *   a client's lease, and no other resource, so that it cannot make other
 *   agents run anything); and download the
 *   input files of the deployments its own sessions hold leased
 *   (`file.download.input`; no other file: an agent is no reader).
 * - `reader`: get, list and watch everything in its clusters, events included.
 * - `submitter`: what a reader may, plus submit and cancel its own actions,
 *   create scope leases and use its own (promote, commit, roll back, set a
 *   result, wait, collect outputs, create and delete their resources).
 * - `operator`: everything in its clusters, others' work included: drain
 *   and forget workers, resume expiries, delete and debug leases, cancel any action, and run a
 *   worker.
 */
export const ROLES = ["agent", "reader", "submitter", "operator"] as const;
export type Role = (typeof ROLES)[number];

/**
 * One right an RPC needs. Each is held per cluster (a scope lease's runtime
 * counts as its cluster). `*.own` rights are limited to what the caller
 * created; the matching `*.any` right (operators) covers everyone's.
 */
export const RIGHTS = [
  "worker.connect",
  "worker.read",
  "worker.drain",
  /** ForgetWorker: free the id of a worker without a live session (operators). */
  "worker.forget",
  "cluster.read",
  "cluster.resume_expiries",
  "action.submit",
  "action.read",
  "action.cancel.own",
  "action.cancel.any",
  "lease.create",
  "lease.read",
  "lease.use.own",
  "lease.use.any",
  "lease.debug",
  "lease.delete",
  "resource.create",
  "resource.read",
  "file.upload",
  /**
   * DownloadFile of a file that is an input of a deployment whose action is
   * leased right now to a session the caller's principal opened, in a cluster
   * where it holds this right. Not a read right: what an agent may fetch is
   * what the deployment's creator (who had `resource.read` on it) gave it.
   */
  "file.download.input",
  "event.read",
] as const;
export type Right = (typeof RIGHTS)[number];

const READER: readonly Right[] = [
  "worker.read",
  "cluster.read",
  "action.read",
  "lease.read",
  "resource.read",
  "event.read",
];

/** What each role holds, in the clusters of its binding. */
export const ROLE_RIGHTS: Readonly<Record<Role, readonly Right[]>> = {
  agent: ["worker.connect", "file.upload", "file.download.input"],
  reader: READER,
  submitter: [
    ...READER,
    "action.submit",
    "action.cancel.own",
    "lease.create",
    "lease.use.own",
    "resource.create",
  ],
  operator: RIGHTS,
};

/** Where a role applies. Globs: `*` matches any run of characters, `?` one character. */
export interface RoleBinding {
  readonly role: Role;
  /** Cluster (runtime) globs; `["*"]` is every cluster. */
  readonly clusters: readonly string[];
  /** Worker-id glob an agent must use in its hello; `*` by default. */
  readonly workerIds: string;
}

/** Who a caller proved to be, and how. */
export interface Identity {
  /** The principal: a certificate's SAN, a JWT's subject, a static token's principal. */
  readonly principal: string;
  /** How it was proved. */
  readonly via: "mtls" | "jwt" | "static-token";
  /** Roles that come with the credential itself (static tokens created with `--role`). */
  readonly bindings?: readonly RoleBinding[];
  /**
   * From when this server refuses the credential (epoch ms), if it ever
   * does: a JWT's exp plus the tolerated clock skew, a client certificate's
   * notAfter. Caches must not outlive it, and streams opened with it end then.
   */
  readonly expiresAtMs?: number;
}

/**
 * What one caller may do. Handlers check the cluster-scoped rights of what a
 * call touches (`require`); the adapter has already checked that the caller
 * holds the method's right somewhere (`holdsAnywhere`).
 */
export interface Access {
  /**
   * The principal recorded as the actor of what this call changes. When
   * authentication is off it is `anonymous`.
   */
  readonly actor: string;
  /** False when no credentials are configured: every call is allowed. */
  readonly enforced: boolean;
  /**
   * From when the credential that proved this access is refused (epoch ms;
   * see {@link Identity.expiresAtMs}); undefined if it does not expire. Open
   * streams end then (rpc/stream-registry.ts).
   */
  readonly expiresAtMs?: number | undefined;
  /** Whether the caller holds `right` in `cluster`. */
  can(right: Right, cluster: string): boolean;
  /** Whether the caller holds `right` in at least one cluster. */
  holdsAnywhere(right: Right): boolean;
  /** Throws PERMISSION_DENIED naming the right and cluster unless `can(right, cluster)`. */
  require(right: Right, cluster: string): void;
  /**
   * For a call naming one thing by id, once it is read: throws `missing()`
   * (the NOT_FOUND of an id that does not exist) unless the caller holds
   * `right`, the read right of that kind of thing, in `cluster`. A caller
   * learns nothing of what it may not read, not even that its id exists;
   * a refusal it may see (PERMISSION_DENIED for a change it may not make)
   * comes after this.
   */
  requireVisible(right: Right, cluster: string, missing: () => Error): void;
  /**
   * Whether the caller may change something `owner` created: `<right>.any`
   * in the cluster, or `<right>.own` when the caller is the owner.
   */
  canOwned(right: "action.cancel" | "lease.use", cluster: string, owner: string): boolean;
  /**
   * For a change to something `owner` created: passes when {@link canOwned};
   * throws PERMISSION_DENIED naming the right it lacks otherwise.
   */
  requireOwned(right: "action.cancel" | "lease.use", cluster: string, owner: string): void;
  /**
   * For a list: passes when the caller holds `right` in every cluster;
   * otherwise throws PERMISSION_DENIED unless `cluster` (the request's filter)
   * is set and allowed. Scoped callers must name the cluster they list. The
   * refusal of an empty filter names `field`, the request's field that holds
   * it (ErrorInfo metadata `filter`), so that a client can name its own flag.
   */
  requireListScope(right: Right, cluster: string, field?: "cluster" | "runtime"): void;
  /**
   * The cluster globs in which the caller holds `right`, for a listing of
   * all it may read (EventService without a cluster filter); undefined when
   * it holds `right` in every cluster.
   */
  clustersWith(right: Right): readonly string[] | undefined;
  /**
   * `right` in every cluster, for what belongs to none (a resource made
   * outside any lease); the refusal says `why` it takes that.
   */
  requireEverywhere(right: Right, why: string): void;
  /** For a hello: whether an agent may use `workerId` in `cluster`. */
  mayRunWorker(cluster: string, workerId: string): boolean;
}

/** The reason of ErrorInfo on PERMISSION_DENIED. */
export const PERMISSION_DENIED_REASON = "PERMISSION_DENIED";
/** The reason of ErrorInfo on UNAUTHENTICATED. */
export const UNAUTHENTICATED_REASON = "UNAUTHENTICATED";

/** The actor of calls when authentication is off. */
export const ANONYMOUS = "anonymous";

/**
 * What is wrong with `name` as a principal, to follow its name in a message
 * (`"anonymous" is reserved: …`), or undefined when nothing is. Every source
 * of principals refuses these: token file entries, `token create`, a JWT's
 * principal claim, a client certificate's SAN. {@link ANONYMOUS} is the actor
 * of everything done while authentication was off, and a credential of that
 * name would own all of it; surrounding whitespace and control characters
 * make names that print alike and are not the same.
 */
export function principalProblem(name: string): string | undefined {
  if (name === "") return "is empty";
  if (name === ANONYMOUS)
    return "is reserved: it is the caller when authentication is off, and owns what was made then";
  if (name.trim() !== name) return "has leading or trailing whitespace";
  if (/\p{Cc}/u.test(name)) return "holds a control character";
  return undefined;
}

/** Access when no credentials are configured: everything, as `anonymous`. */
export const OPEN_ACCESS: Access = Object.freeze({
  actor: ANONYMOUS,
  enforced: false,
  can: () => true,
  holdsAnywhere: () => true,
  require: () => {},
  requireVisible: () => {},
  canOwned: () => true,
  requireOwned: () => {},
  requireListScope: () => {},
  clustersWith: () => undefined,
  requireEverywhere: () => {},
  mayRunWorker: () => true,
});

/** A glob (`*`, `?`) as an anchored regular expression. */
export function globRegExp(glob: string): RegExp {
  const body = glob
    .replace(/[.+^${}()|[\]\\]/g, "\\$&")
    .replace(/\*/g, ".*")
    .replace(/\?/g, ".");
  return new RegExp(`^${body}$`, "s");
}

/**
 * Compiled globs: an events watch matches every event against its caller's
 * cluster globs, and compiling them each time cost a RegExp per event per
 * glob. Policies hold a few globs; the cache is emptied past 1,000 anyway.
 */
const compiledGlobs = new Map<string, RegExp>();

/** Whether `value` matches `glob`. */
export function matchesGlob(glob: string, value: string): boolean {
  if (glob === "*") return true;
  if (!glob.includes("*") && !glob.includes("?")) return glob === value;
  let compiled = compiledGlobs.get(glob);
  if (!compiled) {
    if (compiledGlobs.size >= 1000) compiledGlobs.clear();
    compiled = globRegExp(glob);
    compiledGlobs.set(glob, compiled);
  }
  return compiled.test(value);
}

/** PERMISSION_DENIED with ErrorInfo naming the principal and the right. */
export function permissionDenied(
  actor: string,
  right: string,
  where: string,
  extra: Record<string, string> = {},
): LeaseholdError {
  return new LeaseholdError(Code.PermissionDenied, `${quote(actor)} lacks the right ${right} ${where}`, {
    reason: PERMISSION_DENIED_REASON,
    metadata: { principal: actor, right, ...extra },
  });
}

/**
 * The access of one identity under the bindings the policy (and the
 * credential) give it.
 */
export function accessOf(
  actor: string,
  bindings: readonly RoleBinding[],
  expiresAtMs?: number | undefined,
): Access {
  const holds = (right: Right, binding: RoleBinding) => ROLE_RIGHTS[binding.role].includes(right);
  const can = (right: Right, cluster: string) =>
    bindings.some((b) => holds(right, b) && b.clusters.some((g) => matchesGlob(g, cluster)));
  const everywhere = (right: Right) => bindings.some((b) => holds(right, b) && b.clusters.includes("*"));
  const require = (right: Right, cluster: string) => {
    if (!can(right, cluster))
      throw permissionDenied(actor, right, `in cluster ${quote(cluster)}`, { cluster });
  };
  const canOwned = (right: "action.cancel" | "lease.use", cluster: string, owner: string) =>
    can(`${right}.any`, cluster) || (owner !== "" && owner === actor && can(`${right}.own`, cluster));
  return Object.freeze({
    actor,
    enforced: true,
    expiresAtMs,
    can,
    holdsAnywhere: (right: Right) => bindings.some((b) => holds(right, b)),
    require,
    requireVisible(right: Right, cluster: string, missing: () => Error) {
      if (!can(right, cluster)) throw missing();
    },
    canOwned,
    requireOwned(right: "action.cancel" | "lease.use", cluster: string, owner: string) {
      if (canOwned(right, cluster, owner)) return;
      if (can(`${right}.own`, cluster)) {
        throw permissionDenied(
          actor,
          `${right}.any`,
          `in cluster ${quote(cluster)}: it may change only what it created, and this was created by ${quote(owner || "nobody known")}`,
          { cluster, owner },
        );
      }
      throw permissionDenied(actor, `${right}.own`, `in cluster ${quote(cluster)}`, { cluster });
    },
    requireListScope(right: Right, cluster: string, field: "cluster" | "runtime" = "cluster") {
      if (everywhere(right)) return;
      if (cluster === "") {
        throw permissionDenied(
          actor,
          right,
          `in every cluster; name one of its clusters in the request's ${field} filter`,
          { filter: field },
        );
      }
      require(right, cluster);
    },
    clustersWith(right: Right) {
      if (everywhere(right)) return undefined;
      return [...new Set(bindings.filter((b) => holds(right, b)).flatMap((b) => b.clusters))];
    },
    requireEverywhere(right: Right, why: string) {
      if (!everywhere(right)) throw permissionDenied(actor, right, `in every cluster: ${why}`);
    },
    mayRunWorker(cluster: string, workerId: string) {
      return bindings.some(
        (b) =>
          holds("worker.connect", b) &&
          b.clusters.some((g) => matchesGlob(g, cluster)) &&
          matchesGlob(b.workerIds, workerId),
      );
    },
  });
}
