import type { FaultKind } from "./checker.js";

/** A seeded PRNG (mulberry32): the same seed gives the same numbers in [0, 1) on every machine. */
export function createRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** One fault the schedule asks for. */
export interface PlannedFault {
  readonly id: number;
  readonly kind: FaultKind;
  /** A worker id, `server-<i>`, or `postgres`. */
  readonly target: string;
  /** When, in ms after the chaos phase began. */
  readonly atMs: number;
  /**
   * How long: stall and refuse, how long they last; agent and server kill,
   * the wait before the restart; PostgreSQL, how long it stays stopped
   * between the stop and the start (which take time of their own); cut, 0.
   */
  readonly durationMs: number;
}

export interface ScheduleOptions {
  readonly durationMs: number;
  readonly workers: readonly string[];
  readonly servers: number;
  readonly graceMs: number;
}

/** Relative frequency of each kind after the first of each. */
const WEIGHTS: Readonly<Record<FaultKind, number>> = {
  cut: 3,
  stall: 3,
  refuse: 2,
  "agent-kill": 2,
  "server-kill": 1.5,
  "pg-outage": 0.5,
  "pg-restart": 0.25,
};

/**
 * The faults of one run, decided by the seed alone: which, when, on what, for
 * how long. Every kind comes once (in a seeded order) before the rest are
 * drawn by weight, so even a short run has each. A target takes one fault at
 * a time, with a recovery pause after it; one server is down at a time, and
 * PostgreSQL has one outage at a time. Every fault ends within the duration.
 *
 * Durations, with G the grace period: stall and refuse 0.1–1.75 G (some
 * shorter than a self-fence, some past the deadline); agent restart after
 * 0.05–1.75 G; server restart after 0.05–1 G; a PostgreSQL outage that stays
 * stopped 0–0.15 G (with the stop and start, well under G), and a restart
 * that stays stopped 1.25–2 G (past every deadline).
 */
export function planFaults(seed: number, options: ScheduleOptions): PlannedFault[] {
  const random = createRandom(seed);
  const G = options.graceMs;
  const between = (lo: number, hi: number) => Math.round(lo + (hi - lo) * random());
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)] as T;

  const kinds = Object.keys(WEIGHTS) as FaultKind[];
  const firsts = [...kinds];
  for (let i = firsts.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [firsts[i], firsts[j]] = [firsts[j] as FaultKind, firsts[i] as FaultKind];
  }
  const total = kinds.reduce((sum, k) => sum + WEIGHTS[k], 0);
  const drawKind = (): FaultKind => {
    let r = random() * total;
    for (const k of kinds) {
      r -= WEIGHTS[k];
      if (r < 0) return k;
    }
    return "cut";
  };
  const durationOf = (kind: FaultKind): number => {
    switch (kind) {
      case "cut":
        return 0;
      case "stall":
      case "refuse":
        return between(0.1 * G, 1.75 * G);
      case "agent-kill":
        return between(0.05 * G, 1.75 * G);
      case "server-kill":
        return between(0.05 * G, G);
      case "pg-outage":
        return between(0, 0.15 * G);
      case "pg-restart":
        return between(1.25 * G, 2 * G);
    }
  };
  /** How long a fault really keeps its target busy: restarts take time beyond the plan. */
  const busyFor = (kind: FaultKind, ms: number): number =>
    kind === "pg-outage" || kind === "pg-restart" ? ms + 2 * G : ms + G / 2;

  /** When each target (a worker, "servers", "postgres") is free again. */
  const freeAt = new Map<string, number>();
  const faults: PlannedFault[] = [];
  let at = between(0.25 * G, 0.75 * G);
  while (at < options.durationMs) {
    const lock = (target: string) => (target.startsWith("server-") ? "servers" : target);
    const targetsOf = (kind: FaultKind) =>
      kind === "server-kill"
        ? Array.from({ length: options.servers }, (_, i) => `server-${i}`)
        : kind === "pg-outage" || kind === "pg-restart"
          ? ["postgres"]
          : [...options.workers];
    const freeNow = (kind: FaultKind) => targetsOf(kind).filter((t) => (freeAt.get(lock(t)) ?? 0) <= at);
    // The first of each kind that can go now, else one drawn by weight.
    const first = firsts.find((k) => freeNow(k).length > 0);
    const kind = first ?? drawKind();
    const durationMs = durationOf(kind);
    const free = freeNow(kind);
    if (free.length > 0 && at + busyFor(kind, durationMs) <= options.durationMs) {
      const target = pick(free);
      faults.push({ id: faults.length + 1, kind, target, atMs: at, durationMs });
      freeAt.set(lock(target), at + busyFor(kind, durationMs));
      if (first !== undefined) firsts.splice(firsts.indexOf(first), 1);
    }
    at += between(0.25 * G, 0.9 * G);
  }
  return faults;
}
