// A real OAuth 2.1 / OpenID Connect authorization server for tests/test_oauth_oidc.py:
// node-oidc-provider (a certified implementation), issuing JWT access tokens for RFC 8707
// resource indicators through the client_credentials grant, with ES256 and RS256 keys made here.
// Usage: node server.mjs PORT   (0: any free port; the ready line names the real one), with
// OIDC_PROVIDER_DIR naming the directory oidc-provider is installed in (.cache/oidc/node_modules/
// oidc-provider) and OIDC_ALG the access tokens' algorithm (ES256 by default, or RS256).
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const { default: Provider } = await import(
  pathToFileURL(join(process.env.OIDC_PROVIDER_DIR, 'lib', 'index.js')).href
);

function key(type, options, alg) {
  const { privateKey } = generateKeyPairSync(type, options);
  return { ...privateKey.export({ format: 'jwk' }), kid: `${alg}-${randomUUID().slice(0, 8)}`, alg, use: 'sig' };
}

const keys = [
  key('ec', { namedCurve: 'P-256' }, 'ES256'),
  key('rsa', { modulusLength: 2048 }, 'RS256'),
];
const port = Number(process.argv[2] || 0);
const http = await import('node:http');
const server = http.createServer();
await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;
const alg = process.env.OIDC_ALG || 'ES256';

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'agent',
      client_secret: 'agent-secret',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      scope: 'mcp:tools mcp:admin',
    },
  ],
  jwks: { keys },
  scopes: ['mcp:tools', 'mcp:admin'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => undefined,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator) => ({
        scope: 'mcp:tools mcp:admin',
        audience: resourceIndicator,
        accessTokenTTL: 300,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg } },
      }),
    },
  },
});
server.on('request', provider.callback());
console.log(`oidc provider listening on ${issuer}`);
