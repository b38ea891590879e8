//! A real OAuth 2.0 identity provider for the end-to-end tests: `tests/idp/server.js`
//! (oidc-provider on Node.js) run as a child process on 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long the provider may take to print its ready line. It usually takes well under a
/// second, but one clean-clone run on a 2-core machine saw a start take more than 30 s;
/// the margin covers such a loaded CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// How long the provider may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

const READY_PREFIX: &str = "listening on ";

/// Access token format the provider issues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenFormat {
    #[default]
    Opaque,
    Jwt,
}

/// One client registered at the provider.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IdpClient {
    pub client_id: String,
    /// Empty for a `private_key_jwt` client, which has no secret.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub client_secret: String,
    /// Space-separated scopes the client may request.
    pub scope: String,
    /// `client_secret_basic` (the provider's default when `None`), `client_secret_post`
    /// or `private_key_jwt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_endpoint_auth_method: Option<String>,
    /// Public keys of a `private_key_jwt` client, as a JWK Set (RFC 7517 section 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
}

impl IdpClient {
    pub fn new(client_id: &str, client_secret: &str, scope: &str) -> Self {
        IdpClient {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            scope: scope.to_string(),
            token_endpoint_auth_method: None,
            jwks: None,
        }
    }

    /// Creates a client that authenticates with JWTs signed by the private half of
    /// `public_jwk`.
    pub fn private_key_jwt(client_id: &str, scope: &str, public_jwk: serde_json::Value) -> Self {
        IdpClient {
            client_id: client_id.to_string(),
            client_secret: String::new(),
            scope: scope.to_string(),
            token_endpoint_auth_method: Some("private_key_jwt".to_string()),
            jwks: Some(serde_json::json!({ "keys": [public_jwk] })),
        }
    }
}

/// A key pair for `private_key_jwt`: the private key as PKCS#8 PEM for the agent, the
/// public key as a JWK for the provider's client registration.
#[derive(Clone, Debug)]
pub struct ClientKey {
    pub private_pem: String,
    pub public_jwk: serde_json::Value,
}

/// Key types [`generate_client_key`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    EcP256,
    Rsa2048,
    Ed25519,
}

/// Generates a new key pair with Node.js's crypto module, which the provider needs
/// anyway, so the tests need no other tool.
pub fn generate_client_key(key_type: KeyType) -> anyhow::Result<ClientKey> {
    let (kind, options) = match key_type {
        KeyType::EcP256 => ("ec", r#"{"namedCurve":"P-256"}"#),
        KeyType::Rsa2048 => ("rsa", r#"{"modulusLength":2048}"#),
        KeyType::Ed25519 => ("ed25519", "{}"),
    };
    let script = format!(
        "const c = require('node:crypto'); \
         const k = c.generateKeyPairSync('{kind}', {options}); \
         process.stdout.write(JSON.stringify({{ \
           private_pem: k.privateKey.export({{ type: 'pkcs8', format: 'pem' }}), \
           public_jwk: k.publicKey.export({{ format: 'jwk' }}) }}));"
    );
    let output = Command::new("node")
        .args(["-e", &script])
        .stdin(Stdio::null())
        .output()
        .context("cannot run `node`; install Node.js 20 or later and put it on PATH")?;
    if !output.status.success() {
        bail!(
            "node could not generate a {kind} key: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let value: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("node printed no key pair JSON")?;
    Ok(ClientKey {
        private_pem: value["private_pem"]
            .as_str()
            .context("no private_pem in node's output")?
            .to_string(),
        public_jwk: value["public_jwk"].clone(),
    })
}

/// The provider's config file, written as JSON. tests/idp/README.md documents each field.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IdpConfig {
    /// 0 picks any free port.
    pub port: u16,
    pub access_token_format: TokenFormat,
    /// `ES256` or `RS256`, for JWT access tokens; the provider defaults to `ES256`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_signing_alg: Option<String>,
    pub token_ttl_seconds: u64,
    /// Resource indicators accepted besides the default audience `urn:tokenmesh:mesh`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    pub clients: Vec<IdpClient>,
}

impl IdpConfig {
    /// Opaque tokens valid for 300 seconds, on any free port.
    pub fn new(clients: Vec<IdpClient>) -> Self {
        IdpConfig {
            port: 0,
            access_token_format: TokenFormat::Opaque,
            jwt_signing_alg: None,
            token_ttl_seconds: 300,
            resources: Vec::new(),
            clients,
        }
    }
}

/// Request counters from `GET /test/stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct IdpStats {
    pub token_requests: u64,
    pub introspection_requests: u64,
    pub revocation_requests: u64,
    /// Requests to the three endpoints above that carried `Authorization: Basic`.
    pub basic_auth_requests: u64,
    /// `GET /jwks` requests.
    #[serde(default)]
    pub jwks_requests: u64,
}

/// A running provider. Dropping it stops the process and waits for it.
pub struct Idp {
    child: Child,
    base_url: String,
    stderr_path: PathBuf,
    // Holds the config and stderr files until the process is gone.
    _dir: tempfile::TempDir,
}

impl Idp {
    /// Writes `config` to a temporary file, starts the provider and waits for its ready
    /// line.
    pub fn start(config: &IdpConfig) -> anyhow::Result<Idp> {
        let idp_dir = idp_dir();
        let server = idp_dir.join("server.js");
        if !idp_dir.join("node_modules/oidc-provider").is_dir() {
            bail!(
                "{} has no node_modules/oidc-provider; run `cargo xtask setup`, or `npm ci` \
                 in that folder",
                idp_dir.display()
            );
        }

        let dir = tempfile::tempdir().context("cannot create a folder for the provider")?;
        let config_path = dir.path().join("idp.json");
        let stderr_path = dir.path().join("stderr.log");
        std::fs::write(&config_path, serde_json::to_vec_pretty(config)?)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let stderr = std::fs::File::create(&stderr_path)
            .with_context(|| format!("cannot create {}", stderr_path.display()))?;

        let mut child = Command::new("node")
            .arg(&server)
            .arg("--config")
            .arg(&config_path)
            .current_dir(&idp_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("cannot run `node`; install Node.js 20 or later and put it on PATH")?;

        let stdout = child.stdout.take().expect("stdout is piped");
        let (ready_tx, ready_rx) = mpsc::channel();
        // The thread reads stdout to its end, so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix(READY_PREFIX) {
                    let _ = ready_tx.send(url.trim().to_string());
                }
            }
        });

        let mut idp = Idp {
            child,
            base_url: String::new(),
            stderr_path,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match ready_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(url) => {
                    idp.base_url = url;
                    return Ok(idp);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = idp.child.wait()?;
                    bail!(
                        "identity provider {} exited ({status}) before it was ready; its \
                         stderr:\n{}",
                        server.display(),
                        idp.stderr()
                    );
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "identity provider {} printed no `{READY_PREFIX}` line within {:?}; its \
                     stderr:\n{}",
                    server.display(),
                    START_TIMEOUT,
                    idp.stderr()
                );
            }
        }
    }

    /// Returns the port the provider listens on, for a restart on the same port.
    pub fn port(&self) -> u16 {
        self.base_url
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("the issuer URL ends with the port")
    }

    /// Stops the provider and waits for it to exit, as Drop does. Connections to its port
    /// are refused afterwards.
    pub fn stop(&mut self) {
        // A reaped child's pid may belong to another process by now: signal only a child
        // that has not been waited for.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SIGTERM lets server.js close its listener, and SIGKILL follows if it hangs.
        let pid = Pid::from_raw(self.child.id() as i32);
        if kill(pid, Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Returns the issuer URL, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.base_url)
    }

    pub fn introspection_endpoint(&self) -> String {
        format!("{}/token/introspection", self.base_url)
    }

    pub fn revocation_endpoint(&self) -> String {
        format!("{}/token/revocation", self.base_url)
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.base_url)
    }

    /// Fetches the provider's request counters.
    pub async fn stats(&self) -> anyhow::Result<IdpStats> {
        let url = format!("{}/test/stats", self.base_url);
        let response = reqwest::get(&url)
            .await
            .with_context(|| format!("GET {url} failed"))?
            .error_for_status()
            .with_context(|| format!("GET {url} failed"))?;
        response
            .json()
            .await
            .with_context(|| format!("GET {url} returned no stats JSON"))
    }

    /// Adds a new signing key per algorithm (`POST /test/rotate-keys`) and returns the kids
    /// now published, newest first. New tokens are signed with the new keys.
    pub async fn rotate_keys(&self) -> anyhow::Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Rotated {
            kids: Vec<String>,
        }
        let url = format!("{}/test/rotate-keys", self.base_url);
        let rotated: Rotated = reqwest::Client::new()
            .post(&url)
            .send()
            .await
            .with_context(|| format!("POST {url} failed"))?
            .error_for_status()
            .with_context(|| format!("POST {url} failed"))?
            .json()
            .await
            .with_context(|| format!("POST {url} returned no kids"))?;
        Ok(rotated.kids)
    }

    /// Returns what the provider wrote to stderr so far, for failure messages.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.stderr_path.display()))
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `tests/idp` of this repository.
fn idp_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../idp");
    dir.canonicalize().unwrap_or(dir)
}
