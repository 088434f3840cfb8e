import { X509Certificate } from "node:crypto";
import type { Http2Session } from "node:http2";
import type { Server as NetServer } from "node:net";
import { type DetailedPeerCertificate, TLSSocket } from "node:tls";
import type { Logger } from "pino";
import type { TlsMaterialSource } from "./tls.js";

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g;

/**
 * Closes the open connections whose client certificate does not chain to
 * `--tls-client-ca` once it changes; returns the function that stops.
 *
 * A TLS connection's client certificate is verified once, at its handshake,
 * and grpc-js reports it verified for every call the connection carries
 * after that: a connection made under the old CA kept authenticating new
 * calls with a certificate the new CA would refuse. Node cannot run its
 * handshake verification again on an open connection, so on each change of
 * the CA file every open connection with a verified client certificate has
 * its chain (as the client sent it) checked here against the new CA's
 * certificates, and a connection it no longer verifies is closed gracefully
 * (HTTP/2 GOAWAY): its open streams go on to their end, as on any
 * certificate rotation, and its next call opens a new connection, which is
 * verified against the new CA.
 */
export function closeConnectionsOnClientCaChange(
  servers: Iterable<NetServer>,
  material: TlsMaterialSource,
  log: Logger,
): () => void {
  const sessions = new Set<Http2Session>();
  const track = (session: Http2Session) => {
    sessions.add(session);
    session.once("close", () => sessions.delete(session));
  };
  const listening = [...servers];
  for (const server of listening) server.on("session", track);
  let ca = material.current().ca;
  const off = material.onChange((next) => {
    const changed = !(next.ca && ca ? next.ca.equals(ca) : next.ca === ca);
    ca = next.ca;
    if (!changed || !next.ca) return;
    const anchors = (next.ca.toString("utf8").match(PEM_CERTIFICATE) ?? []).map(
      (pem) => new X509Certificate(pem),
    );
    let closed = 0;
    for (const session of sessions) {
      const socket = session.socket;
      // Only a verified certificate names a caller; one that did not verify (optional client auth) never did.
      if (!(socket instanceof TLSSocket) || !socket.authorized || session.closed || session.destroyed)
        continue;
      const peer = socket.getPeerCertificate(true);
      if (!peer.raw || chainsTo(peer, anchors)) continue;
      closed++;
      try {
        session.goaway();
        session.close();
      } catch {
        session.destroy();
      }
    }
    if (closed > 0)
      log.warn(
        { connections: closed },
        `closed ${closed} connections whose client certificate does not chain to the new --tls-client-ca; their open streams go on`,
      );
  });
  return () => {
    off();
    for (const server of listening) server.off("session", track);
    sessions.clear();
  };
}

/**
 * Whether the certificate, through the chain its client sent, is issued and
 * signed by one of `anchors` (or is one of them).
 */
export function chainsTo(peer: DetailedPeerCertificate, anchors: readonly X509Certificate[]): boolean {
  const seen = new Set<string>();
  let at: DetailedPeerCertificate | undefined = peer;
  while (at?.raw && !seen.has(at.fingerprint256)) {
    seen.add(at.fingerprint256);
    const cert = new X509Certificate(at.raw);
    if (anchors.some((a) => a.fingerprint256 === cert.fingerprint256)) return true;
    if (anchors.some((a) => cert.checkIssued(a) && cert.verify(a.publicKey))) return true;
    const issuer: DetailedPeerCertificate | undefined = at.issuerCertificate;
    // The next link must really have signed this one, or the chain is not one.
    if (!issuer?.raw || !cert.verify(new X509Certificate(issuer.raw).publicKey)) return false;
    at = issuer;
  }
  return false;
}
