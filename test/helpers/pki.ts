/**
 * Certificates for tests, made with the `openssl` CLI (OpenSSL 3): a CA per
 * call to {@link createCa}, and leaf certificates it signs. EC P-256 keys, so
 * each certificate takes a few milliseconds.
 */
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";

/** PEM files of a certificate and its private key. */
export interface CertificateFiles {
  readonly certFile: string;
  readonly keyFile: string;
}

/** A CA that can sign leaf certificates. */
export interface Ca extends CertificateFiles {
  readonly name: string;
}

/** What a leaf certificate names and what it is for. */
export interface LeafOptions {
  /** Where the files go (`<name>.crt`, `<name>.key`). */
  readonly dir: string;
  /** The file name stem and the subject CN. */
  readonly name: string;
  readonly dns?: readonly string[];
  readonly ips?: readonly string[];
  readonly uris?: readonly string[];
  /** Validity in days; 30 by default. */
  readonly days?: number;
  /** A client certificate (extendedKeyUsage clientAuth) instead of a server one. */
  readonly client?: boolean;
}

const openssl = (args: readonly string[]) => execFileSync("openssl", args, { stdio: "pipe" });
const newKey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc"];

/** A self-signed CA in `dir` (`<name>.crt`, `<name>.key`). */
export function createCa(dir: string, name: string): Ca {
  const certFile = join(dir, `${name}.crt`);
  const keyFile = join(dir, `${name}.key`);
  openssl([
    "req",
    "-x509",
    "-new",
    ...newKey,
    "-keyout",
    keyFile,
    "-out",
    certFile,
    "-days",
    "30",
    "-subj",
    `/CN=${name}`,
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
  ]);
  return { name, certFile, keyFile };
}

/** A leaf certificate signed by `ca`, with the given subject alternative names. */
export function issueCertificate(ca: CertificateFiles, options: LeafOptions): CertificateFiles {
  const certFile = join(options.dir, `${options.name}.crt`);
  const keyFile = join(options.dir, `${options.name}.key`);
  const csrFile = join(options.dir, `${options.name}.csr`);
  const extFile = join(options.dir, `${options.name}.ext`);
  // A section of names (not a comma list), so that values may contain commas.
  const names = [
    ...(options.dns ?? []).map((v, i) => `DNS.${i + 1} = ${v}`),
    ...(options.ips ?? []).map((v, i) => `IP.${i + 1} = ${v}`),
    ...(options.uris ?? []).map((v, i) => `URI.${i + 1} = ${v}`),
  ];
  writeFileSync(
    extFile,
    [
      "basicConstraints = critical, CA:FALSE",
      "keyUsage = critical, digitalSignature",
      `extendedKeyUsage = ${options.client ? "clientAuth" : "serverAuth"}`,
      ...(names.length > 0 ? ["subjectAltName = @names", "[names]", ...names] : []),
      "",
    ].join("\n"),
  );
  openssl(["req", "-new", ...newKey, "-keyout", keyFile, "-out", csrFile, "-subj", `/CN=${options.name}`]);
  openssl([
    "x509",
    "-req",
    "-in",
    csrFile,
    "-CA",
    ca.certFile,
    "-CAkey",
    ca.keyFile,
    "-set_serial",
    `0x${randomBytes(8).toString("hex")}`,
    "-days",
    String(options.days ?? 30),
    "-extfile",
    extFile,
    "-out",
    certFile,
  ]);
  return { certFile, keyFile };
}
