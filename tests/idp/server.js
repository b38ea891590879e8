// OAuth 2.0 identity provider for the tokenmesh end-to-end tests, built on oidc-provider.
// Usage: node server.js --config FILE. README.md beside this file describes FILE and the
// endpoints. It listens on 127.0.0.1 only and prints one line
// `listening on http://127.0.0.1:PORT` to stdout when it accepts requests.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const TOKEN_PATH = '/token';
const INTROSPECTION_PATH = '/token/introspection';
const REVOCATION_PATH = '/token/revocation';
const STATS_PATH = '/test/stats';
const ROTATE_KEYS_PATH = '/test/rotate-keys';
const JWKS_PATH = '/jwks';

// Resource indicator added to every client-credentials request that names none. Tokens
// carry it as their `aud` claim, and a JWT access token cannot be issued without one.
const DEFAULT_AUDIENCE = 'urn:tokenmesh:mesh';
const AUTH_METHODS = new Set(['client_secret_basic', 'client_secret_post', 'private_key_jwt']);
const SIGNING_ALGS = new Set(['ES256', 'RS256']);

function fail(message) {
  process.stderr.write(`idp: ${message}\n`);
  process.exit(2);
}

function readConfig(path) {
  let config;
  try {
    config = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    fail(`cannot read config file ${path}: ${err.message}`);
  }

  const {
    port = 0,
    access_token_format: format = 'opaque',
    jwt_signing_alg: signingAlg = 'ES256',
    token_ttl_seconds: ttl = 300,
    audience = DEFAULT_AUDIENCE,
    resources = [],
    clients,
  } = config;

  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    fail(`port ${port} is invalid; use 0 for any free port or a number up to 65535`);
  }
  if (format !== 'opaque' && format !== 'jwt') {
    fail(`access_token_format "${format}" is invalid; use "opaque" or "jwt"`);
  }
  if (!SIGNING_ALGS.has(signingAlg)) {
    fail(`jwt_signing_alg "${signingAlg}" is invalid; use "ES256" or "RS256"`);
  }
  if (!Number.isInteger(ttl) || ttl <= 0) {
    fail(`token_ttl_seconds ${ttl} is invalid; use a positive whole number of seconds`);
  }
  if (!Array.isArray(resources) || !resources.every((r) => typeof r === 'string')) {
    fail('resources is invalid; use a list of resource indicator strings');
  }
  if (!Array.isArray(clients) || clients.length === 0) {
    fail('clients is missing or empty; register at least one client');
  }
  for (const client of clients) {
    const method = client.token_endpoint_auth_method ?? 'client_secret_basic';
    if (typeof client.client_id !== 'string') {
      fail('every client needs a client_id string');
    }
    if (!AUTH_METHODS.has(method)) {
      fail(`client ${client.client_id}: token_endpoint_auth_method "${method}" is invalid; use client_secret_basic, client_secret_post or private_key_jwt`);
    }
    if (method === 'private_key_jwt') {
      if (!Array.isArray(client.jwks?.keys) || client.jwks.keys.length === 0) {
        fail(`client ${client.client_id}: private_key_jwt needs a jwks with at least one public key`);
      }
    } else if (typeof client.client_secret !== 'string') {
      fail(`client ${client.client_id}: ${method} needs a client_secret string`);
    }
  }

  return {
    port, format, signingAlg, ttl, audience, resources, clients,
  };
}

// Both an EC P-256 and an RSA key go into the JWKS, so a verifier finds either algorithm.
// Their kids end in `generation`: 1 at start, one more after each key rotation.
function generateKeys(generation) {
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return [
    { ...ec.privateKey.export({ format: 'jwk' }), kid: `es256-${generation}`, use: 'sig', alg: 'ES256' },
    { ...rsa.privateKey.export({ format: 'jwk' }), kid: `rs256-${generation}`, use: 'sig', alg: 'RS256' },
  ];
}

function buildProvider(issuer, config, keys) {
  const allScopes = new Set();
  for (const client of config.clients) {
    for (const scope of (client.scope ?? '').split(' ').filter(Boolean)) {
      allScopes.add(scope);
    }
  }
  const resourceServer = (audience) => ({
    scope: [...allScopes].join(' '),
    audience,
    accessTokenTTL: config.ttl,
    accessTokenFormat: config.format,
    jwt: { sign: { alg: config.signingAlg } },
  });
  const knownResources = new Set([config.audience, ...config.resources]);

  return new Provider(issuer, {
    clients: config.clients.map((client) => ({
      client_id: client.client_id,
      client_secret: client.client_secret,
      jwks: client.jwks,
      // oidc-provider rejects an empty scope string, and a client registered without
      // one may request any scope listed below.
      scope: client.scope || undefined,
      token_endpoint_auth_method: client.token_endpoint_auth_method ?? 'client_secret_basic',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
    })),
    // Listing every client scope as a known scope makes the provider reject a scope that
    // the requesting client is not registered for, with `invalid_scope`.
    scopes: ['openid', ...allScopes],
    // oidc-provider signs with the first key of the wanted algorithm, so the newest
    // keys come first.
    jwks: { keys },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      // Any confidential client may introspect any token: in the mesh, the validating
      // proxy authenticates as its own client, never as the client that owns the token.
      introspection: {
        enabled: true,
        allowedPolicy: async (ctx, client) => client.clientAuthMethod !== 'none',
      },
      // Only the client that owns a token may revoke it.
      revocation: {
        enabled: true,
        allowedPolicy: async (ctx, client, token) => {
          if (token.clientId !== client.clientId) {
            throw new errors.InvalidRequest('client is not authorized to revoke the presented token');
          }
          return true;
        },
      },
      resourceIndicators: {
        enabled: true,
        // Without a `resource`, the `audience` parameter (as Auth0 clients send it)
        // selects the resource server, and else the configured audience.
        // oidc-provider passes only its own grant parameters on, so `audience` is read
        // from the parsed form body.
        defaultResource: async (ctx) => ctx.oidc.body?.audience ?? config.audience,
        getResourceServerInfo: async (ctx, resource) => {
          if (!knownResources.has(resource)) {
            throw new errors.InvalidTarget(`unknown resource indicator; this provider serves ${[...knownResources].join(', ')}`);
          }
          return resourceServer(resource);
        },
      },
    },
    ttl: {
      ClientCredentials: config.ttl,
      AccessToken: config.ttl,
    },
  });
}

function main() {
  const { values } = parseArgs({ options: { config: { type: 'string' } } });
  if (!values.config) {
    fail('missing --config FILE');
  }
  const config = readConfig(values.config);

  const stats = {
    token_requests: 0,
    introspection_requests: 0,
    revocation_requests: 0,
    basic_auth_requests: 0,
    jwks_requests: 0,
  };
  let handler = null;
  let issuer = null;
  let keys = generateKeys(1);
  let keyGeneration = 1;

  // Builds the provider with the current keys and routes requests to it. Tokens are kept
  // across a rebuild, because oidc-provider's memory adapter is shared by the process.
  const startProvider = () => {
    let provider;
    try {
      provider = buildProvider(issuer, config, keys);
    } catch (err) {
      fail(`invalid provider configuration: ${err.message}`);
    }
    // Error descriptions never contain a secret or a token value.
    provider.on('server_error', (ctx, err) => {
      process.stderr.write(`idp: server error on ${ctx.path}: ${err.stack}\n`);
    });
    provider.on('grant.error', (ctx, err) => {
      process.stderr.write(`idp: token request failed: ${err.error}: ${err.error_description}\n`);
    });
    handler = provider.callback();
  };

  const server = createServer((req, res) => {
    const path = new URL(req.url, 'http://127.0.0.1').pathname;

    if (req.method === 'GET' && path === STATS_PATH) {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(stats));
      return;
    }

    // Adds a new signing key per algorithm, with new kids, and signs new tokens with
    // them. The old keys stay published, so tokens already issued still verify.
    if (req.method === 'POST' && path === ROTATE_KEYS_PATH && handler !== null) {
      keyGeneration += 1;
      keys = [...generateKeys(keyGeneration), ...keys];
      startProvider();
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ kids: keys.map((key) => key.kid) }));
      return;
    }

    if (req.method === 'GET' && path === JWKS_PATH) {
      stats.jwks_requests += 1;
    }

    if (req.method === 'POST') {
      const counter = {
        [TOKEN_PATH]: 'token_requests',
        [INTROSPECTION_PATH]: 'introspection_requests',
        [REVOCATION_PATH]: 'revocation_requests',
      }[path];
      if (counter) {
        stats[counter] += 1;
        if (/^basic /i.test(req.headers.authorization ?? '')) {
          stats.basic_auth_requests += 1;
        }
      }
    }

    if (handler === null) {
      res.writeHead(503, { 'content-type': 'text/plain' });
      res.end('provider is starting\n');
      return;
    }
    handler(req, res);
  });

  // The issuer contains the port, so the socket is bound first and the provider built
  // afterwards. A request that arrives in between gets 503.
  server.listen(config.port, '127.0.0.1', () => {
    const { port } = server.address();
    issuer = `http://127.0.0.1:${port}`;
    startProvider();
    process.stdout.write(`listening on ${issuer}\n`);
  });

  server.on('error', (err) => fail(`cannot listen on 127.0.0.1:${config.port}: ${err.message}`));

  const stop = () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main();
