import * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import { createJwtVerifier, type JwtVerifier } from "../auth/jwt.js";
import { EMPTY_POLICY, loadReloadingPolicy, type Policy } from "../auth/policy.js";
import { loadStaticTokens, type StaticTokens } from "../auth/static-tokens.js";
import type { AuthConfig, TlsConfig } from "../config.js";
import { type Authenticator, createAuthenticator } from "./authenticator.js";
import { createReloadingServerCredentials, type ReloadingServerCredentials } from "./tls.js";

/** The port's credentials and the authentication of its calls. */
export interface ServerSecurity {
  readonly credentials: grpc.ServerCredentials;
  /** Undefined when no credentials are configured: every call is allowed. */
  readonly authenticator: Authenticator | undefined;
  /** The reloading TLS credentials (tests rotate certificates through it). */
  readonly tls: ReloadingServerCredentials | undefined;
  /** Stops watching files and JWKS. */
  close(): void;
}

/**
 * Reads every certificate, key, token and policy file now, so that a bad one
 * stops `serve` at once with a message naming its flag (INVALID_ARGUMENT);
 * later changes to the certificate and token files are picked up while
 * running, and a bad change keeps what was loaded.
 */
export function createServerSecurity(
  options: { readonly tls: TlsConfig | undefined; readonly auth: AuthConfig },
  log: Logger,
): ServerSecurity {
  const opened: { close(): void }[] = [];
  const close = () => {
    for (const o of opened.reverse()) o.close();
  };
  try {
    const tls = options.tls
      ? createReloadingServerCredentials(
          {
            certFile: options.tls.certFile,
            keyFile: options.tls.keyFile,
            clientCaFile: options.tls.clientCaFile,
            clientAuth: options.tls.clientAuth,
          },
          log,
        )
      : undefined;
    if (tls) opened.push(tls);
    let authenticator: Authenticator | undefined;
    if (options.auth.enabled) {
      let policy: Policy = EMPTY_POLICY;
      if (options.auth.policyFile) {
        const reloading = loadReloadingPolicy(options.auth.policyFile, log);
        opened.push(reloading);
        policy = reloading;
      }
      let staticTokens: StaticTokens | undefined;
      if (options.auth.tokensFile) {
        staticTokens = loadStaticTokens(options.auth.tokensFile, log);
        opened.push(staticTokens);
      }
      let jwt: JwtVerifier | undefined;
      if (options.auth.jwt) {
        jwt = createJwtVerifier(options.auth.jwt, log);
        opened.push(jwt);
      }
      authenticator = createAuthenticator({ policy, staticTokens, jwt, log });
      log.info(
        {
          mtls: Boolean(options.tls?.clientCaFile),
          staticTokens: Boolean(staticTokens),
          jwt: Boolean(jwt),
          policyBindings: policy.size,
          reflection: options.auth.reflection,
        },
        policy.size === 0
          ? "authentication on, and no --auth-policy: only roles carried by static tokens grant anything"
          : "authentication on; calls the policy does not allow are refused",
      );
    }
    return {
      credentials: tls?.credentials ?? grpc.ServerCredentials.createInsecure(),
      authenticator,
      tls,
      close,
    };
  } catch (error) {
    close();
    throw error;
  }
}
