/*
 * Leasehold's work leases, as a Promela model for spin.
 *
 * One action, NW agents (workers) of one cluster with one slot each, NS server
 * processes, one PostgreSQL as the atomic store. Time is a global tick; every
 * deadline is a countdown that the tick lowers, so the state space is finite
 * without bounding how long a run lasts. model/README.md says what each part
 * abstracts, the bounds, and how the checks are run (model/check.sh).
 *
 * Each step names the code it stands for as file:function (paths under src/).
 *
 * Rule switches (each removes one rule; check.sh shows each breaks a property):
 *   NO_FENCING            the server applies every report, whatever its epoch
 *   NO_SELF_FENCE         agents never stop work when their guarantee runs out
 *   FENCE_ONCE_BUG        an agent self-fences once, then never again (a bug
 *                         that shipped: the fence was a state, not a timer)
 *   NO_RESTART_EXTENSION  a starting server does not extend live sessions
 *   NO_GRANT_RESEND       a hello does not resend grants the worker never got
 *   SHORT_MARGIN          the self-fence margin is smaller than the drift bound
 * Property switches (check.sh enables one at a time for the variants):
 *   P_ONCE P_EPOCH P_EXCL P_RESTART, or P_ALL; LIVENESS adds the LTL formula `live`
 *   (checked with pan -a -f) and makes faults heal and handlers finish in time.
 */

#define NW 2         /* agents: the valve and the exclusion check below are written for two */
#ifndef NS
#define NS 2         /* server processes: 1 or 2 */
#endif
#define NONE 255

/* Durations in ticks. The defaults keep the server's own rules: heartbeat
 * interval <= grace / 3 (config.ts), stale = max(4 heartbeats, grace / 2)
 * (lease-manager.ts:start), max silence = 1.5 x grace here (10 x by default). */
#ifndef G
#define G 4          /* --grace-period */
#endif
#define H 1          /* --heartbeat-interval */
#define STALE 4      /* extend-sessions-on-start.ts: staleMs = max(4 heartbeats, grace / 2) */
#ifndef MAXSIL
#define MAXSIL (G + 2) /* --max-silence */
#endif
#define DRIFT 1      /* worst error of an agent's local deadline: clock drift + a late timer */
#ifdef SHORT_MARGIN
#define MARGIN 0
#else
#define MARGIN 1     /* agent.ts: selfFenceMarginMs */
#endif
#define RETRIES 1    /* actions.max_system_retries */
#ifndef FAULTS
#define FAULTS 3     /* stream cuts, agent crashes, server crashes, stalls: at most this many */
#endif
#ifndef EPOCH_MAX
#define EPOCH_MAX 4  /* grants explored per run */
#endif
#ifndef CONN_MAX
#define CONN_MAX 5   /* streams an agent opens per run */
#endif

#if defined(P_ALL)
#define P_ONCE
#define P_EPOCH
#define P_EXCL
#define P_RESTART
#endif

/* ---- the database (store/schema.ts) ---- */
mtype = { QUEUED, LEASED, SUCCEEDED, FAILED };
mtype aState = QUEUED;     /* actions.state */
byte aEpoch = 0;           /* actions.epoch */
byte aHolder = NONE;       /* actions.worker_id */
byte aGen = 0;             /* actions.session_id: (aHolder, aGen) names a session */
byte aRetries = 0;         /* actions.system_retry_count */

bool sLive[NW];            /* sessions.ended_at is null */
byte sGen[NW];             /* the worker's current session */
short sDl[NW];             /* sessions.deadline - now, in ticks; -1: passed */
byte sSil[NW];             /* now - sessions.last_heard_at, capped at MAXSIL + 1 */
bool sLost[NW];            /* sessions.stream_lost_at is not null */
byte sTok[NW];             /* sessions.stream_token (0: none) */

/* ---- server processes (work/lease-manager.ts, work/lease/hosted.ts) ----
 * A server keeps, per hosted stream, what it needs to tell whether the stream and
 * its session are still the same; everything else it reads from the database
 * (see README: the cached deadline and the renewal timer are folded into the
 * heartbeat step). */
bool up[NS];
byte hTok[NS * NW];        /* the stream of worker w this server hosts (0: none) */
#define IX(s, w) ((s) * NW + (w))
/* Server s is running and not paused. */
#define UP(s) (up[s] && !paused[s])
/* Server s reads the stream of agent w. */
#define READS(s, w) (cSrv[w] == s && !stalled[w])
/* The session w's stream token names: live, and on stream t. */
#define ON(w, t) (sLive[w] && sTok[w] == (t))
/* Server s hosts a stream of w that the agent no longer has (it broke, or the agent left it). */
#define GONE(s, w) (hTok[IX(s, w)] != 0 && !(cSrv[w] == s && cTok[w] == hTok[IX(s, w)]))
/* Server s hosts the agent's stream, but the session ended or moved to another stream. */
#define ENDED(s, w) (hTok[IX(s, w)] != 0 && cSrv[w] == s && cTok[w] == hTok[IX(s, w)] && !ON(w, hTok[IX(s, w)]))
/* The epoch session w holds (0: none). */
#define HELD(w) (aState == LEASED && aHolder == w && aGen == sGen[w] -> aEpoch : 0)
/* Server s may grant to w: a hosted stream whose session is live on it and holds nothing. */
#define ROOM(s, w) (hTok[IX(s, w)] != 0 && ON(w, hTok[IX(s, w)]) && HELD(w) == 0)

/* ---- agents (agent/agent.ts) ---- */
mtype = { L_NONE, L_WAIT, L_RUN, L_REPORT };
mtype = { SUCC, REL };
bool alive[NW];
byte cSrv[NW];             /* the server of the agent's open stream, NONE when it has none */
byte cTok[NW];             /* the token of its latest stream */
bool welcomed[NW];
short agDl[NW];            /* agent.ts `deadline` - now: the local self-fence deadline; guaranteed while > 0 */
bool hbOut[NW];            /* a heartbeat awaits its ack */
bool beat[NW];             /* a heartbeat went out in this tick (one per heartbeat interval) */
mtype lSt[NW];             /* the agent's one slot: its lease */
byte lEp[NW];              /* the lease's epoch */
mtype lKind[NW];           /* the pending report's kind (L_REPORT) */
#ifdef FENCE_ONCE_BUG
bool fencedOnce[NW];       /* the agent fenced once already */
#endif

/* ---- streams: one per agent at a time; a break loses what is in flight ---- */
mtype = { HELLO, HB, DONE, WELCOME, ACK, GRANT, REVOKE, RESULT };
chan toS[NW] = [4] of { mtype, byte, mtype };
chan toA[NW] = [6] of { mtype, byte, byte };

byte faults = FAULTS;
bool stalled[NW];          /* the agent's stream delivers nothing, either way (fault) */
bool paused[NS];           /* the server process does nothing: event loop blocked, GC (fault) */
bool slowDb[NS];           /* the server's renewals do not reach the database (fault) */

/* Scratch values of one atomic step: not part of the state. */
hidden byte x, y, i;
hidden short d;
hidden byte s_, w_;
hidden mtype m, k;
hidden byte resumed, revoked;

/* ---- ghosts: what the properties read ---- */
byte completions = 0;      /* accepted successful completions */
byte win[NW];              /* ticks left in the window after a server start (P_RESTART) */

inline maxTo(v, x) { if :: (x) > (v) -> v = (x) :: else -> skip fi }

/* The agent's side of a stream ending: what was in flight is lost. */
inline endStream(w) {
  cSrv[w] = NONE;
  welcomed[w] = false;
  hbOut[w] = false;
  do :: nempty(toA[w]) -> toA[w]?_, _, _ :: empty(toA[w]) -> break od;
  do :: nempty(toS[w]) -> toS[w]?_, _, _ :: empty(toS[w]) -> break od
}

/* The lease the agent lists in hellos and heartbeats (agent.ts heldLeases). */
#define LISTED(w) (lSt[w] != L_NONE -> lEp[w] : 0)

inline startRun(w) {
#ifdef P_EXCL
  /* Exclusive execution: no other agent runs the action while this one starts it. */
  assert(lSt[1 - w] != L_RUN);
#endif
  lSt[w] = L_RUN;
  printf("agent %d: starts epoch %d (local deadline in %d)\n", w, lEp[w], agDl[w])
}

/* store/queries/reap-sessions.ts reapSessions: ends session w and expires its lease. */
inline endSession(w) {
  sLive[w] = false;
  sTok[w] = 0;
  if
  :: aState == LEASED && aHolder == w && aGen == sGen[w] ->
     aRetries++;
     if
     :: aRetries > RETRIES -> aState = FAILED
     :: else -> aState = QUEUED
     fi;
     aHolder = NONE
  :: else -> skip
  fi
}

/* reap-sessions.ts: the mass-disconnect valve. A session counts (as live, and as lost when its
 * stream is lost or its deadline passed) unless it has been silent past MAXSIL. More than
 * --partition-share 0.5 of the counted sessions lost, and at least PARTITION_MIN_LOST = 2:
 * the cluster is partitioned and none of its counted sessions is reaped. The code counts only
 * sessions holding leases; with one action, at most one session holds a lease here, so that rule
 * could never fire, and the model keeps counting every session instead. What the properties need
 * of the valve holds for either rule: it only withholds reaps, and never past MAXSIL. */
#define COUNTED(w) (sLive[w] && sSil[w] <= MAXSIL)
#define LOSTW(w) (COUNTED(w) && (sLost[w] || sDl[w] < 0))
#define NLOST ((LOSTW(0) -> 1 : 0) + (LOSTW(1) -> 1 : 0))
#define NLIVE ((COUNTED(0) -> 1 : 0) + (COUNTED(1) -> 1 : 0))
#define OVER (NLOST >= 2 && 2 * NLOST > NLIVE)
#define REAPABLE(w) (sLive[w] && sDl[w] < 0 && (sSil[w] > MAXSIL || !OVER))

/* Sends that find a full channel would block inside an atomic step: the bounds are chosen so
 * that they never do, and this says so if they are changed. */
inline sendA(w, a, b, c) { if :: nfull(toA[w]) -> toA[w]!a, b, c :: full(toA[w]) -> assert(false) fi }
inline sendS(w, a, b, c) { if :: nfull(toS[w]) -> toS[w]!a, b, c :: full(toS[w]) -> assert(false) fi }

/* ---------------------------------------------------------------------------- */

/* The self-fence timer is due: a running handler's local deadline passed. */
#if defined(NO_SELF_FENCE)
#define FENCE_DUE(w) false
#elif defined(FENCE_ONCE_BUG)
#define FENCE_DUE(w) (alive[w] && lSt[w] == L_RUN && agDl[w] <= 0 && !fencedOnce[w])
#else
#define FENCE_DUE(w) (alive[w] && lSt[w] == L_RUN && agDl[w] <= 0)
#endif

proctype Agent(byte w) {
end:
  do
  /* agent.ts connect/openStream: a stream to any server that is up; the hello lists the held lease. */
  :: atomic {
       alive[w] && cSrv[w] == NONE && cTok[w] < CONN_MAX && (up[0] || up[NS - 1]) ->
       if
       :: up[0] -> s_ = 0
       :: up[NS - 1] -> s_ = NS - 1
       fi;
       cTok[w]++;
       cSrv[w] = s_;
       x = LISTED(w); sendS(w, HELLO, x, SUCC);
       printf("agent %d: opens stream %d to server %d, hello lists epoch %d\n", w, cTok[w], s_, x)
     }
  /* agent.ts handle: one message from the server. */
  :: atomic {
       alive[w] && cSrv[w] != NONE && !stalled[w] && nempty(toA[w]) ->
       toA[w]?m, x, y;
       if
       :: m == WELCOME ->
          /* agent.ts "welcome": a revoked lease stops at once; a finished one keeps its report. */
          welcomed[w] = true;
          if
          :: x && (lSt[w] == L_RUN || lSt[w] == L_WAIT) -> lSt[w] = L_NONE; lEp[w] = 0; lKind[w] = 0
          :: else -> skip
          fi;
          /* The first heartbeat at once, then reports never answered. */
          if
          :: !beat[w] -> x = LISTED(w); sendS(w, HB, x, SUCC); hbOut[w] = true; beat[w] = true
          :: else -> skip
          fi;
          if
          :: lSt[w] == L_REPORT -> sendS(w, DONE, lEp[w], lKind[w])
          :: else -> skip
          fi
       :: m == ACK ->
          /* agent.ts "heartbeatAck": deadline = max(deadline, sent + remaining - margin).
           * sent + remaining is at most the stored deadline as it is now, so that is taken (the
           * most an ack can give), or a tick less (an older heartbeat's ack), and it is off by up
           * to DRIFT (drift over the interval, a timer that fires late). See README. */
          hbOut[w] = false;
          if
          :: x && sLive[w] ->
             if
#ifndef LIVENESS
             /* (Not when liveness is checked: always the oldest ack, forever, is not a schedule
              * that real renewals produce; see README.) */
             :: d = 0 - 1
#endif
             :: d = 0
             :: d = DRIFT
             fi;
             maxTo(agDl[w], sDl[w] - MARGIN + d);
             printf("agent %d: ack, stored deadline in %d, local deadline in %d\n", w, sDl[w], agDl[w])
          :: else -> skip
          fi;
          /* startWaiting: a held grant starts once the guarantee outlasts the next heartbeat. */
          if
          :: lSt[w] == L_WAIT && agDl[w] > H -> startRun(w)
          :: else -> skip
          fi
       :: m == GRANT ->
          /* agent.ts startAction: run it if mayStart(), else hold it and ask for a fresh ack. */
          /* A report still pending here is about an epoch the action has left (it was granted
           * again), so it would be fenced: dropping it is the same to the server. */
#if !defined(NO_SELF_FENCE) && !defined(FENCE_ONCE_BUG) && !defined(SHORT_MARGIN) && !defined(NO_FENCING)
          assert(lSt[w] == L_NONE || lSt[w] == L_REPORT);
#endif
          lEp[w] = x;
          if
          :: agDl[w] > H -> startRun(w)
          :: else ->
             lSt[w] = L_WAIT;
             if
             :: !hbOut[w] && !beat[w] -> x = LISTED(w); sendS(w, HB, x, SUCC); hbOut[w] = true; beat[w] = true
             :: else -> skip
             fi
          fi
       :: m == REVOKE ->
          /* agent.ts "revoke": the lease is no longer this worker's. */
          if
          :: lEp[w] == x && (lSt[w] == L_RUN || lSt[w] == L_WAIT) -> lSt[w] = L_NONE; lEp[w] = 0; lKind[w] = 0
          :: else -> skip
          fi
       :: m == RESULT ->
          /* agent.ts "reportResult": accepted or fenced, the grant is done with. */
          if
          :: lSt[w] == L_REPORT && lEp[w] == x -> lSt[w] = L_NONE; lEp[w] = 0; lKind[w] = 0
          :: else -> skip
          fi
       fi
     }
  /* agent.ts conn.beat: a heartbeat listing the held lease (one awaits its ack at a time here). */
  :: atomic {
       alive[w] && cSrv[w] != NONE && welcomed[w] && !hbOut[w] && !beat[w] ->
       x = LISTED(w); sendS(w, HB, x, SUCC); hbOut[w] = true; beat[w] = true
     }
  /* agent.ts run: the handler returns; its completion is reported (now, or after the next welcome). */
  :: atomic {
       alive[w] && lSt[w] == L_RUN ->
       lSt[w] = L_REPORT; lKind[w] = SUCC;
       printf("agent %d: epoch %d succeeded\n", w, lEp[w]);
       if
       :: cSrv[w] != NONE && welcomed[w] -> sendS(w, DONE, lEp[w], SUCC)
       :: else -> skip
       fi
     }
#ifndef NO_SELF_FENCE
  /* agent.ts selfFence: the local deadline passed; the handler stops and the lease is released. */
  :: atomic {
       FENCE_DUE(w) ->
#ifdef FENCE_ONCE_BUG
       fencedOnce[w] = true;
#endif
       lSt[w] = L_REPORT; lKind[w] = REL;
       printf("agent %d: self-fences epoch %d\n", w, lEp[w]);
       if
       :: cSrv[w] != NONE && welcomed[w] -> sendS(w, DONE, lEp[w], REL)
       :: else -> skip
       fi
     }
#endif
  /* agent.ts onEnd (keepalive): the agent gives up on a stream that answers nothing: a
   * heartbeat from an earlier tick is still unanswered. */
  :: atomic {
       cSrv[w] != NONE && (stalled[w] || paused[cSrv[w]]) && hbOut[w] && !beat[w] ->
       endStream(w);
       printf("agent %d: leaves its stream\n", w)
     }
  od
}

/* ---------------------------------------------------------------------------- */

proctype Server(byte s) {
end:
  do
  /* rpc/services/worker-service.ts + lease-manager.ts: a message from a stream this server holds. */
  :: atomic {
       UP(s) && (READS(s, 0) && nempty(toS[0]) || READS(s, 1) && nempty(toS[1])) ->
       if
       :: READS(s, 0) && nempty(toS[0]) -> w_ = 0
       :: READS(s, 1) && nempty(toS[1]) -> w_ = 1
       fi;
       toS[w_]?m, x, k;
       i = IX(s, w_);
       if
       :: m == HELLO ->
          /* store/queries/open-session.ts openSession, one transaction. A live session past its
           * deadline is reaped first (obeying the valve), then resumed or started. */
          if :: REAPABLE(w_) -> endSession(w_) :: else -> skip fi;
          resumed = sLive[w_];
#ifdef P_RESTART
          /* A worker back within the grace period after a server start finds its session. */
          assert(win[w_] == 0 || resumed);
#endif
          if
          :: resumed -> maxTo(sDl[w_], G)
          :: else -> sGen[w_]++; sLive[w_] = true; sDl[w_] = G
          fi;
          sSil[w_] = 0; sLost[w_] = false; sTok[w_] = cTok[w_];
          hTok[i] = cTok[w_];
          /* open-session.ts sortHeld: listed and current -> resumed; listed otherwise -> revoked. */
          y = HELD(w_);
          revoked = (x != 0 && x != y);
          printf("server %d: hello of agent %d: session %d (resumed %d), listed epoch %d (revoked %d)\n",
            s, w_, sGen[w_], resumed, x, revoked);
          sendA(w_, WELCOME, revoked, 0);
#ifndef NO_GRANT_RESEND
          /* lease-manager.ts open: a lease of the session the worker did not list is sent again. */
          if
          :: y != 0 && x != y -> sendA(w_, GRANT, y, 0)
          :: else -> skip
          fi;
#endif
          y = 0; resumed = 0; revoked = 0
       :: m == HB ->
          /* work/lease/renewal.ts renew -> store/queries/renew-sessions.ts: the deadline becomes
           * last heard + grace. Here that happens with the heartbeat, unless the database is
           * slow (a late or failed renewal); see README. */
          if
          :: ON(w_, hTok[i]) && !slowDb[s] -> sDl[w_] = G; sSil[w_] = 0
          :: else -> skip
          fi;
          /* lease-manager.ts receive "heartbeat": the ack carries the stored deadline's time left
           * (hosted.ts remainingMs); a listed lease that is not the stream's is revoked. */
          y = ON(w_, hTok[i]);
          sendA(w_, ACK, y, 0);
          printf("server %d: heartbeat of agent %d, deadline in %d\n", s, w_, sDl[w_]);
          if
          :: ON(w_, hTok[i]) && x != 0 && x != HELD(w_) -> sendA(w_, REVOKE, x, 0)
          :: else -> skip
          fi
       :: m == DONE ->
          /* work/lease/reports.ts finish -> store/queries/finish-actions.ts: applied only if
           * (action, epoch) is the current lease of this stream's session. */
          if
#ifdef NO_FENCING
          :: true ->
#else
          :: aState == LEASED && aEpoch == x && aHolder == w_ && aGen == sGen[w_] && sLive[w_] ->
#endif
#ifdef P_EPOCH
             /* No report is accepted from an epoch that is not the action's current one. */
             assert(aState == LEASED && aEpoch == x && aHolder == w_ && aGen == sGen[w_]);
#endif
             printf("server %d: accepts %e of epoch %d from agent %d\n", s, k, x, w_);
             if
             :: k == SUCC ->
#ifdef P_ONCE
                /* At most one accepted completion. */
                assert(completions == 0);
#endif
                completions++;
                aState = SUCCEEDED
             :: else -> aState = QUEUED
             fi;
             aHolder = NONE
          :: else -> printf("server %d: fences %e of epoch %d from agent %d\n", s, k, x, w_)
          fi;
          sendA(w_, RESULT, x, 0)
       fi;
       w_ = 0; i = 0; m = 0; x = 0; k = 0
     }
  /* lease-manager.ts (stream end) -> store/queries/mark-stream-lost.ts: a hosted stream is gone;
   * if its session is still on it, the session enters grace (stream lost, deadline kept). */
  :: atomic {
       UP(s) && (GONE(s, 0) || GONE(s, 1)) ->
       if
       :: GONE(s, 0) -> w_ = 0
       :: GONE(s, 1) -> w_ = 1
       fi;
       i = IX(s, w_);
       if
       :: ON(w_, hTok[i]) -> sLost[w_] = true; sTok[w_] = 0;
          printf("server %d: stream of agent %d lost, deadline in %d\n", s, w_, sDl[w_])
       :: else -> skip
       fi;
       hTok[i] = 0; w_ = 0; i = 0
     }
  /* renewal.ts renew: a hosted stream whose session ended (reaped) or moved to another stream
   * (taken over, here or on another process) is closed with SESSION_ENDED. */
  :: atomic {
       UP(s) && (ENDED(s, 0) || ENDED(s, 1)) ->
       if
       :: ENDED(s, 0) -> w_ = 0
       :: ENDED(s, 1) -> w_ = 1
       fi;
       endStream(w_);
       printf("server %d: ends the stream of agent %d (session ended or moved)\n", s, w_);
       hTok[IX(s, w_)] = 0; w_ = 0
     }
  /* work/lease/reaper.ts reap -> reap-sessions.ts: sessions past their deadline end, with their
   * leases, unless the valve holds their cluster. */
  :: atomic {
       UP(s) && (REAPABLE(0) || REAPABLE(1)) ->
       if
       :: REAPABLE(0) -> w_ = 0
       :: REAPABLE(1) -> w_ = 1
       fi;
       printf("server %d: reaps session %d of agent %d\n", s, sGen[w_], w_);
       endSession(w_); w_ = 0
     }
  /* work/lease/dispatch.ts run -> store/queries/settle-and-grant.ts (claim + grant): a queued
   * action goes to a hosted stream with room, epoch + 1, if its session is live on that stream. */
  :: atomic {
       UP(s) && aState == QUEUED && aEpoch < EPOCH_MAX && (ROOM(s, 0) || ROOM(s, 1)) ->
       if
       :: ROOM(s, 0) -> w_ = 0
       :: ROOM(s, 1) -> w_ = 1
       fi;
       aState = LEASED; aEpoch++; aHolder = w_; aGen = sGen[w_];
       printf("server %d: grants epoch %d to agent %d\n", s, aEpoch, w_);
       /* hosted.ts sendGrant: written to the stream, lost if the agent has left it. */
       if
       :: cSrv[w_] == s && cTok[w_] == hTok[IX(s, w_)] -> sendA(w_, GRANT, aEpoch, 0)
       :: else -> skip
       fi;
       w_ = 0
     }
  od
}

/* ---------------------------------------------------------------------------- */

inline crashAgent(w) {
  alive[w] = false;
  endStream(w);
  lSt[w] = L_NONE; lEp[w] = 0; lKind[w] = 0; agDl[w] = -1
#ifdef FENCE_ONCE_BUG
  ; fencedOnce[w] = false
#endif
}

inline crashServer(s) {
  up[s] = false; paused[s] = false; slowDb[s] = false;
  if :: cSrv[0] == s -> endStream(0) :: else -> skip fi;
  if :: cSrv[1] == s -> endStream(1) :: else -> skip fi;
  hTok[IX(s, 0)] = 0; hTok[IX(s, 1)] = 0
}

/* Faults, at most FAULTS in a run, at any moment. */
proctype Chaos() {
end:
  do
  :: faults > 0 ->
     atomic {
       faults--;
       if
       /* A stream breaks (proxy cut, connection reset). */
       :: cSrv[0] != NONE -> endStream(0); printf("FAULT: stream of agent 0 cut\n")
       :: cSrv[1] != NONE -> endStream(1); printf("FAULT: stream of agent 1 cut\n")
       /* A stream stalls: nothing gets through, either way, until it heals or the agent leaves it. */
       :: cSrv[0] != NONE && !stalled[0] -> stalled[0] = true; printf("FAULT: stream of agent 0 stalls\n")
       :: cSrv[1] != NONE && !stalled[1] -> stalled[1] = true; printf("FAULT: stream of agent 1 stalls\n")
       /* kill -9 of an agent: its handlers stop with it. */
       :: alive[0] -> crashAgent(0); printf("FAULT: agent 0 killed\n")
       :: alive[1] -> crashAgent(1); printf("FAULT: agent 1 killed\n")
       /* kill -9 of a server: its streams end; the database keeps everything. */
       :: up[0] -> crashServer(0); printf("FAULT: server 0 killed\n")
       :: up[NS - 1] -> crashServer(NS - 1); printf("FAULT: server %d killed\n", NS - 1)
       /* A server stops for a while (a blocked event loop). */
       :: up[0] && !paused[0] -> paused[0] = true; printf("FAULT: server 0 paused\n")
       :: up[NS - 1] && !paused[NS - 1] -> paused[NS - 1] = true; printf("FAULT: server %d paused\n", NS - 1)
       /* A server's renewals stop reaching the database while it goes on answering heartbeats. */
       :: up[0] && !slowDb[0] -> slowDb[0] = true; printf("FAULT: server 0 cannot renew\n")
       :: up[NS - 1] && !slowDb[NS - 1] -> slowDb[NS - 1] = true; printf("FAULT: server %d cannot renew\n", NS - 1)
       fi
     }
  od
}

/* lease-manager.ts start -> store/queries/extend-sessions-on-start.ts: every live session
 * heard within max silence gets a deadline of at least now + grace; the ones nobody renewed
 * for STALE ticks lose their stream. */
inline startServer(s) {
  up[s] = true;
  printf("server %d: starts\n", s);
  w_ = 0;
  do
  :: w_ < NW ->
     if
     :: sLive[w_] && sSil[w_] <= MAXSIL ->
#ifndef NO_RESTART_EXTENSION
        maxTo(sDl[w_], G);
#endif
        if :: sSil[w_] >= STALE -> sLost[w_] = true; sTok[w_] = 0 :: else -> skip fi;
#ifdef P_RESTART
        win[w_] = G + 1;
#endif
        skip
     :: else -> skip
     fi;
     w_++
  :: else -> break
  od;
  w_ = 0
}

/* What ends a fault, some time later (weakly fair: it does happen). */
proctype Healer() {
end:
  do
  /* The agent is started again with the same worker id. */
  :: atomic { !alive[0] -> alive[0] = true; printf("agent 0: started again\n") }
  :: atomic { !alive[1] -> alive[1] = true; printf("agent 1: started again\n") }
  :: atomic { stalled[0] -> stalled[0] = false; printf("healed: stream of agent 0\n") }
  :: atomic { stalled[1] -> stalled[1] = false; printf("healed: stream of agent 1\n") }
  :: atomic { paused[0] -> paused[0] = false; printf("healed: server 0 resumes\n") }
  :: atomic { paused[NS - 1] -> paused[NS - 1] = false; printf("healed: server %d resumes\n", NS - 1) }
  :: atomic { slowDb[0] -> slowDb[0] = false; printf("healed: server 0 renews again\n") }
  :: atomic { slowDb[NS - 1] -> slowDb[NS - 1] = false; printf("healed: server %d renews again\n", NS - 1) }
  /* The server is started again. */
  :: atomic { !up[0] -> startServer(0) }
  :: atomic { !up[NS - 1] -> startServer(NS - 1) }
  od
}

/* ---------------------------------------------------------------------------- */

/* Time. A tick may not pass a running handler's passed local deadline: that is
 * the self-fence timer, whose lateness is part of DRIFT. */

/* Healthy processes act within the tick: agents open streams, read them, heartbeat and
 * finish handlers; servers read streams, notice ended ones, reap and grant. Only faults
 * (a stalled stream, a paused server, a crashed process) let time pass over them. */
#define AGENT_DUE(w) (alive[w] && (cSrv[w] == NONE && cTok[w] < CONN_MAX && (up[0] || up[NS - 1]) \
  || cSrv[w] != NONE && !stalled[w] && len(toA[w]) > 0 || cSrv[w] != NONE && welcomed[w] && !hbOut[w] && !beat[w] \
  || HANDLER_DUE(w)))
/* Handlers run for any number of ticks when safety is checked; for liveness they finish. */
#ifdef LIVENESS
#define HANDLER_DUE(w) (lSt[w] == L_RUN)
#else
#define HANDLER_DUE(w) false
#endif
#define SERVER_DUE(s) (UP(s) && (READS(s, 0) && len(toS[0]) > 0 || READS(s, 1) && len(toS[1]) > 0 \
  || GONE(s, 0) || GONE(s, 1) || ENDED(s, 0) || ENDED(s, 1) || REAPABLE(0) || REAPABLE(1) \
  || aState == QUEUED && aEpoch < EPOCH_MAX && (ROOM(s, 0) || ROOM(s, 1))))
#ifdef LIVENESS
/* For liveness a stall, a pause or a slow database heals within the tick it began in:
 * otherwise the schedule may keep a worker from its server for as long as the bounds allow. */
#define HEAL_DUE (stalled[0] || stalled[1] || paused[0] || paused[NS - 1] || slowDb[0] || slowDb[NS - 1])
#else
#define HEAL_DUE false
#endif
#define DUE (AGENT_DUE(0) || AGENT_DUE(1) || SERVER_DUE(0) || SERVER_DUE(NS - 1) || HEAL_DUE)

proctype Clock() {
end:
  do
  :: atomic {
       !FENCE_DUE(0) && !FENCE_DUE(1) && !DUE ->
       printf("tick\n");
       w_ = 0;
       do
       :: w_ < NW ->
          if :: agDl[w_] >= 0 -> agDl[w_]-- :: else -> skip fi;
          beat[w_] = false;
          if :: sLive[w_] && sDl[w_] >= 0 -> sDl[w_]-- :: else -> skip fi;
          if :: sLive[w_] && sSil[w_] <= MAXSIL -> sSil[w_]++ :: else -> skip fi;
#ifdef P_RESTART
          if :: win[w_] > 0 -> win[w_]-- :: else -> skip fi;
#endif
          w_++
       :: else -> break
       od;
       w_ = 0
     }
  od
}

#ifdef LIVENESS
/* Every submitted action reaches a final state (pan -a -f: under weak fairness). */
ltl live { <> (aState == SUCCEEDED || aState == FAILED) }
#endif

init {
  atomic {
    alive[0] = true; alive[1] = true;
    cSrv[0] = NONE; cSrv[1] = NONE;
    agDl[0] = -1; agDl[1] = -1;
    lSt[0] = L_NONE; lSt[1] = L_NONE;
    up[0] = true; up[NS - 1] = true;
    run Clock();
    run Server(0);
    if :: NS > 1 -> run Server(1) :: else -> skip fi;
    run Agent(0);
    run Agent(1);
    run Chaos();
    run Healer()
  }
}
