import { createPrivateKey, type KeyObject, X509Certificate } from "node:crypto";
import { createSecureContext, type PeerCertificate } from "node:tls";
import * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import {
  createFileReloader,
  DEFAULT_POLL_MS,
  type ReloadOutcome,
  readCredentialFileSync,
} from "../auth/file-reloader.js";
import { LeaseholdError } from "../errors.js";

type CertificateProvider = grpc.experimental.CertificateProvider;
type CaListener = (update: { caCertificate: Buffer } | null) => void;
type IdentityListener = (update: { certificate: Buffer; privateKey: Buffer } | null) => void;

/** The PEM files of a TLS server (`serve --tls-cert … --tls-key … [--tls-client-ca …]`). */
export interface ServerTlsFiles {
  /** The server's certificate chain (leaf first), PEM. */
  readonly certFile: string;
  /** The private key of the leaf certificate, PEM. */
  readonly keyFile: string;
  /** CA certificates that sign client certificates, PEM; without it no client certificate is asked for. */
  readonly clientCaFile?: string | undefined;
  /**
   * "require": a client certificate signed by clientCa is needed to connect;
   * "optional": clients may connect without one (then they need a token), a
   * certificate they do present must verify. Only with clientCaFile.
   */
  readonly clientAuth: "require" | "optional";
}

/** Server credentials whose certificates follow their files. */
export interface ReloadingServerCredentials {
  readonly credentials: grpc.ServerCredentials;
  /** Re-reads the files now (tests call it; a poll does it too). Resolves once applied or rejected. */
  reload(): Promise<ReloadOutcome>;
  /** The same certificates for an HTTPS server (the console), following each rotation. */
  readonly material: TlsMaterialSource;
  /** Stops watching the files; the certificates in force stay in force. */
  close(): void;
}

/** Certificates in force for a Node HTTPS server, and word of each rotation. */
export interface TlsMaterialSource {
  /** The certificate, key and client CA in force, as `tls.createSecureContext` takes them. */
  current(): { cert: Buffer; key: Buffer; ca?: Buffer };
  /** Whether to ask clients for a certificate (there is a client CA). */
  readonly requestCert: boolean;
  /** Whether a connection without a verified client certificate is refused (`--tls-client-auth require`). */
  readonly rejectUnauthorized: boolean;
  /** Calls `listener` with the new material after each rotation; returns its off. */
  onChange(listener: (material: { cert: Buffer; key: Buffer; ca?: Buffer }) => void): () => void;
}

/** What the files held, checked. */
interface TlsMaterial {
  readonly cert: Buffer;
  readonly key: Buffer;
  readonly ca: Buffer | undefined;
  /** The leaf, for log lines. */
  readonly leaf: X509Certificate;
}

const FLAG = { cert: "--tls-cert", key: "--tls-key", ca: "--tls-client-ca" } as const;

/**
 * TLS server credentials for grpc-js from PEM files, rotated in place when
 * the files change.
 *
 * The files are checked at once (synchronously): a bad file throws
 * INVALID_ARGUMENT naming its flag (`--tls-cert`, `--tls-key`,
 * `--tls-client-ca`) and path, so `serve` ends with a message saying what to
 * fix. Then they are polled every `pollMs` (1 s by default). A change is
 * applied only when two polls in a row read the files the same (see
 * createFileReloader) and all files are complete and consistent (each PEM parses,
 * the key belongs to the certificate, the certificate has not expired, and
 * Node accepts them as a secure context); otherwise the old certificates stay
 * and a warning names the file. A rotation written in several steps
 * (certificate, then key) is applied once the last step lands.
 *
 * Applying calls `setSecureContext` on grpc-js's HTTP/2 server: open
 * connections and their streams go on with the certificates they
 * handshook with, new handshakes get the new ones.
 *
 * Why not grpc-js's FileWatcherCertificateProvider: it applies whatever it
 * reads (a half-written file included: grpc-js then fails to set the
 * context and refuses every new connection), and it reports a failed read as
 * "no certificate", which also makes the server refuse new connections.
 * Our providers only ever report a checked certificate, never `null`.
 */
export function createReloadingServerCredentials(
  files: ServerTlsFiles,
  log: Logger,
  options: { pollMs?: number; now?: () => number } = {},
): ReloadingServerCredentials {
  const now = options.now ?? Date.now;
  const paths = [files.certFile, files.keyFile, ...(files.clientCaFile ? [files.clientCaFile] : [])];
  const initial = paths.map((path, i) =>
    readCredentialFileSync(path, [FLAG.cert, FLAG.key, FLAG.ca][i] ?? ""),
  );
  let current = checkTlsMaterial(files, initial, now());

  const identityListeners = new Set<IdentityListener>();
  const materialListeners = new Set<(material: ReturnType<TlsMaterialSource["current"]>) => void>();
  const caListeners = new Set<CaListener>();
  const sendIdentity = (listener: IdentityListener) =>
    listener({ certificate: current.cert, privateKey: current.key });
  const sendCa = (listener: CaListener) => {
    if (current.ca) listener({ caCertificate: current.ca });
  };
  // Two providers, each serving one kind, so that a mix-up of the two
  // arguments below shows (the server would get no certificate) instead of
  // passing silently. grpc-js creates the HTTP/2 server without certificates
  // and sets them when a provider reports; it registers its own watcher only
  // after adding its listener to the providers, so the current value is
  // reported on a microtask, not from inside `add…Listener` (where grpc-js
  // would store it without passing it on, and drop every connection).
  const identityProvider: CertificateProvider = {
    addIdentityCertificateListener(listener) {
      identityListeners.add(listener);
      queueMicrotask(() => identityListeners.has(listener) && sendIdentity(listener));
    },
    removeIdentityCertificateListener: (listener) => void identityListeners.delete(listener),
    addCaCertificateListener() {},
    removeCaCertificateListener() {},
  };
  const caProvider: CertificateProvider = {
    addCaCertificateListener(listener) {
      caListeners.add(listener);
      queueMicrotask(() => caListeners.has(listener) && sendCa(listener));
    },
    removeCaCertificateListener: (listener) => void caListeners.delete(listener),
    addIdentityCertificateListener() {},
    removeIdentityCertificateListener() {},
  };

  // Client certificates are asked for (`requestCert`) only with a CA to check
  // them; `clientAuth` means nothing without one. With "optional", Node still
  // verifies a certificate a client presents, but lets the connection through
  // when it does not verify; grpc-js then reports no peer certificate for it
  // (`getAuthContext()` reads only `socket.authorized` sockets), so such a
  // client is treated as one without a certificate and needs a token.
  const requireClientCertificate = files.clientCaFile !== undefined && files.clientAuth === "require";
  // grpc-js 1.14 declares this function's parameters as (caProvider,
  // identityProvider, …) but passes the first to the credentials constructor
  // as the identity provider and the second as the CA provider
  // (build/src/server-credentials.js); the tests cover the order used here.
  const credentials = grpc.experimental.createCertificateProviderServerCredentials(
    identityProvider,
    files.clientCaFile !== undefined ? caProvider : null,
    requireClientCertificate,
  );

  const reloader = createFileReloader({
    files: paths,
    initial,
    what: "TLS certificate",
    log,
    pollMs: options.pollMs ?? DEFAULT_POLL_MS,
    parse: (contents) => checkTlsMaterial(files, contents, now()),
    apply(next) {
      const identityChanged = !next.cert.equals(current.cert) || !next.key.equals(current.key);
      const caChanged = !(next.ca && current.ca ? next.ca.equals(current.ca) : next.ca === current.ca);
      current = next;
      // Each update makes grpc-js set a new secure context; either order gives
      // a consistent one (the CA is independent of the certificate and key).
      if (identityChanged) for (const listener of identityListeners) sendIdentity(listener);
      if (caChanged) for (const listener of caListeners) sendCa(listener);
      for (const listener of materialListeners) listener(materialOf(next));
      log.info(
        {
          certFile: files.certFile,
          subject: next.leaf.subject,
          subjectAltName: next.leaf.subjectAltName,
          validTo: next.leaf.validTo,
          fingerprint256: next.leaf.fingerprint256,
          clientCaChanged: caChanged,
        },
        "TLS certificate rotated: new connections get the new one",
      );
    },
  });

  const materialOf = (m: TlsMaterial) => ({ cert: m.cert, key: m.key, ...(m.ca ? { ca: m.ca } : {}) });
  const material: TlsMaterialSource = {
    current: () => materialOf(current),
    requestCert: files.clientCaFile !== undefined,
    rejectUnauthorized: requireClientCertificate,
    onChange(listener) {
      materialListeners.add(listener);
      return () => materialListeners.delete(listener);
    },
  };
  return { credentials, material, reload: reloader.reload, close: reloader.close };
}

/**
 * Checks the contents of the TLS files (in the order cert, key, CA) and
 * returns them; throws INVALID_ARGUMENT naming the flag of the bad file.
 */
function checkTlsMaterial(files: ServerTlsFiles, contents: readonly Buffer[], nowMs: number): TlsMaterial {
  const [cert, key, ca] = contents;
  if (!cert || !key) throw new Error("checkTlsMaterial: the certificate and key contents are required");
  const chain = parseCertificates(cert, FLAG.cert, files.certFile);
  const leaf = chain[0] as X509Certificate;
  const validTo = Date.parse(leaf.validTo);
  if (validTo < nowMs)
    throw LeaseholdError.invalidArgument(
      FLAG.cert,
      `the certificate in ${files.certFile} expired at ${new Date(validTo).toISOString()}`,
    );
  const privateKey = parsePrivateKey(key, files.keyFile);
  if (!leaf.checkPrivateKey(privateKey))
    throw LeaseholdError.invalidArgument(
      FLAG.key,
      `the key in ${files.keyFile} does not belong to the certificate in ${files.certFile} (are both files from the same rotation?)`,
    );
  if (ca && files.clientCaFile) parseCertificates(ca, FLAG.ca, files.clientCaFile);
  try {
    // What grpc-js will do with them: anything Node refuses here would make
    // grpc-js drop every new connection.
    createSecureContext({ cert, key, ...(ca ? { ca } : {}) });
  } catch (error) {
    throw LeaseholdError.invalidArgument(
      FLAG.cert,
      `${files.certFile} with ${files.keyFile}: ${(error as Error).message}`,
    );
  }
  return { cert, key, ca, leaf };
}

const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----[\s\S]*?-----END \1-----/g;

/** Every certificate of a PEM file; a truncated or garbled one is INVALID_ARGUMENT. */
function parseCertificates(pem: Buffer, flag: string, path: string): X509Certificate[] {
  const text = pem.toString("utf8");
  const begins = text.match(/-----BEGIN /g)?.length ?? 0;
  const blocks = [...text.matchAll(PEM_BLOCK)];
  if (blocks.length < begins)
    throw LeaseholdError.invalidArgument(
      flag,
      `${path} ends inside a PEM block (is it still being written?)`,
    );
  const certificates = blocks.filter((b) => b[1] === "CERTIFICATE");
  if (certificates.length === 0)
    throw LeaseholdError.invalidArgument(
      flag,
      `${path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`,
    );
  return certificates.map((block, i) => {
    try {
      return new X509Certificate(block[0]);
    } catch (error) {
      throw LeaseholdError.invalidArgument(
        flag,
        `certificate ${i + 1} in ${path} cannot be parsed (${(error as Error).message})`,
      );
    }
  });
}

function parsePrivateKey(pem: Buffer, path: string): KeyObject {
  const text = pem.toString("utf8");
  const begins = text.match(/-----BEGIN /g)?.length ?? 0;
  if (begins > [...text.matchAll(PEM_BLOCK)].length)
    throw LeaseholdError.invalidArgument(
      FLAG.key,
      `${path} ends inside a PEM block (is it still being written?)`,
    );
  try {
    return createPrivateKey(pem);
  } catch (error) {
    throw LeaseholdError.invalidArgument(
      FLAG.key,
      `${path} holds no usable private key in PEM (${(error as Error).message}); an encrypted key is not supported`,
    );
  }
}

/**
 * The principal a client certificate proves: its first URI subject
 * alternative name (a SPIFFE id such as `spiffe://example.org/agent/a1`),
 * else its first DNS name, else undefined (the certificate names no
 * principal, and the caller needs a token).
 *
 * There is deliberately no fallback to the subject's common name: CNs are
 * free text that many CAs copy from the request without checking (the CA
 * vouches for SANs; RFC 6125 and browsers dropped CN matching for this
 * reason), and a CN that happened to equal a policy's principal would grant
 * its roles.
 */
export function principalOfCertificate(cert: PeerCertificate): string | undefined {
  const names = parseSubjectAltNames(cert.subjectaltname ?? "");
  return names.find((n) => n.type === "URI")?.value ?? names.find((n) => n.type === "DNS")?.value;
}

/**
 * Parses Node's rendering of subject alternative names:
 * `DNS:a, URI:spiffe://x, IP Address:1.2.3.4`. A value with a comma, a quote,
 * a backslash or a control character is written as a JSON string
 * (`URI:"spiffe://x/a\u002cb"`), so that the list splits unambiguously.
 */
export function parseSubjectAltNames(text: string): { type: string; value: string }[] {
  const names: { type: string; value: string }[] = [];
  let i = 0;
  while (i < text.length) {
    const colon = text.indexOf(":", i);
    if (colon < 0) break;
    const type = text.slice(i, colon).trim();
    let value: string;
    let end: number;
    if (text[colon + 1] === '"') {
      // Find the closing quote, skipping escaped characters.
      end = colon + 2;
      while (end < text.length && text[end] !== '"') end += text[end] === "\\" ? 2 : 1;
      end += 1;
      try {
        value = JSON.parse(text.slice(colon + 1, end)) as string;
      } catch {
        // Not a value we can read unambiguously: it names nobody.
        value = "";
      }
      const comma = text.indexOf(",", end);
      end = comma < 0 ? text.length : comma;
    } else {
      const comma = text.indexOf(", ", colon + 1);
      end = comma < 0 ? text.length : comma;
      value = text.slice(colon + 1, end);
    }
    if (value !== "") names.push({ type, value });
    i = end + 1;
    while (text[i] === " ") i += 1;
  }
  return names;
}
