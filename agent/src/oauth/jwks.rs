//! JSON Web Key Sets (RFC 7517) that verify JWT access tokens. A key set comes from a
//! configured URL or from the issuer's metadata (OpenID Connect Discovery 1.0, then RFC
//! 8414). It is refreshed once it is older than the refresh interval, refetched when a
//! token names an unknown `kid` (at most once per minimum refetch interval), and kept
//! while the issuer is unreachable.

use std::{
    collections::HashMap,
    str::FromStr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse},
};
use reqwest::StatusCode;

/// Largest discovery or JWKS document accepted. Real key sets are a few KiB.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Source of the keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// A JWKS URL, fetched directly.
    JwksUrl(String),
    /// An issuer whose metadata document names the JWKS URL (`jwks_uri`).
    Issuer(String),
}

/// Fetch and refresh settings of one key set.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeySetConfig {
    pub source: KeySource,
    /// Keys older than this are refreshed in the background on the next lookup.
    pub refresh_interval: Duration,
    /// Minimum time between two fetch attempts, for unknown `kid` refetches and retries
    /// after a failed fetch.
    pub min_refetch_interval: Duration,
}

/// A public key from the set, usable with the algorithms that [`VerificationKey::fits`].
pub struct VerificationKey {
    pub kid: Option<String>,
    /// The key's `alg` member, when the set names one.
    pub alg: Option<Algorithm>,
    family: AlgorithmFamily,
    curve: Option<EllipticCurve>,
    key: DecodingKey,
}

impl VerificationKey {
    /// Checks that this key may verify a signature made with `alg`: the key type and curve
    /// match, and the key's own `alg`, when present, equals `alg`.
    pub fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|own| own != alg) {
            return false;
        }
        if !self.family.algorithms().contains(&alg) {
            return false;
        }
        match alg {
            Algorithm::ES256 => self.curve == Some(EllipticCurve::P256),
            Algorithm::ES384 => self.curve == Some(EllipticCurve::P384),
            Algorithm::EdDSA => self.curve == Some(EllipticCurve::Ed25519),
            _ => true,
        }
    }

    pub fn decoding_key(&self) -> &DecodingKey {
        &self.key
    }
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

/// Counters of one key set, read by tests and ready to export as metrics.
#[derive(Debug, Default)]
pub struct KeySetStats {
    /// Fetches that returned a usable key set.
    pub fetches: AtomicU64,
    /// Fetches that failed: issuer unreachable, HTTP error or unusable document.
    pub fetch_failures: AtomicU64,
    /// Fetches started because a token named a `kid` the set did not contain.
    pub unknown_kid_refetches: AtomicU64,
    /// Lookups served with keys older than the refresh interval because the issuer
    /// could not be reached.
    pub stale_lookups: AtomicU64,
}

impl KeySetStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Failure to fetch a key set. Messages name the URL and what to check.
#[derive(Clone, Debug, thiserror::Error)]
pub enum KeySetError {
    #[error("GET {url} failed: {source}; check that the issuer is reachable from the node")]
    Transport {
        url: String,
        #[source]
        source: Arc<reqwest::Error>,
    },
    #[error("GET {url} returned HTTP {status}; check the issuer and jwks_url settings")]
    Status { url: String, status: StatusCode },
    #[error("{url} returned an invalid document: {reason}")]
    InvalidDocument { url: String, reason: String },
    #[error(
        "the metadata at {url} names issuer {found:?}, not the configured {expected:?}; set \
         issuer to the provider's exact issuer identifier"
    )]
    IssuerMismatch {
        url: String,
        expected: String,
        found: String,
    },
    #[error(
        "the JWKS at {url} contains no usable signing key (RSA of 2048 bits or more, EC \
         P-256 or P-384, Ed25519; symmetric and encryption keys are skipped)"
    )]
    NoUsableKeys { url: String },
}

/// Failure to find a key for a token.
#[derive(Clone, Debug, thiserror::Error)]
pub enum KeyLookupError {
    #[error("no key in the set matches kid {kid:?} and the token's algorithm")]
    UnknownKey { kid: Option<String> },
    #[error("no key set is available: {0}")]
    Unavailable(#[source] KeySetError),
}

#[derive(Default)]
struct State {
    keys: Arc<Vec<Arc<VerificationKey>>>,
    /// Time of the last successful fetch; `None` until one succeeds.
    fetched_at: Option<Instant>,
    /// Time of the last fetch attempt, successful or not.
    attempted_at: Option<Instant>,
    last_error: Option<KeySetError>,
    refreshing: bool,
}

/// One issuer's keys, shared by every request that names this source.
pub struct KeySet {
    config: KeySetConfig,
    http: reqwest::Client,
    state: RwLock<State>,
    /// Held during a fetch, so concurrent lookups send one request, never several.
    fetching: tokio::sync::Mutex<()>,
    pub stats: KeySetStats,
}

impl KeySet {
    pub fn new(config: KeySetConfig, http: reqwest::Client) -> KeySet {
        KeySet {
            config,
            http,
            state: RwLock::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
            stats: KeySetStats::default(),
        }
    }

    pub fn config(&self) -> &KeySetConfig {
        &self.config
    }

    /// Returns the keys that may verify a token signed with `alg` and naming `kid`.
    /// Fetches the set on first use, starts a background refresh when it is older than
    /// the refresh interval, and refetches once when no key matches.
    pub async fn keys_for(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<Arc<VerificationKey>>, KeyLookupError> {
        let (keys, fetched_at) = self.snapshot();
        let keys = match fetched_at {
            None => {
                self.fetch_if_allowed(None).await;
                let (keys, fetched_at) = self.snapshot();
                if fetched_at.is_none() {
                    let error = self.read_state().last_error.clone();
                    return Err(KeyLookupError::Unavailable(error.unwrap_or_else(|| {
                        KeySetError::NoUsableKeys {
                            url: self.source_url().to_string(),
                        }
                    })));
                }
                keys
            }
            Some(at) => {
                if at.elapsed() >= self.config.refresh_interval {
                    if self.read_state().last_error.is_some() {
                        self.stats.stale_lookups.fetch_add(1, Ordering::Relaxed);
                    }
                    self.refresh_in_background();
                }
                keys
            }
        };

        let matching = select(&keys, kid, alg);
        if !matching.is_empty() {
            return Ok(matching);
        }

        self.fetch_if_allowed(Some(&self.stats.unknown_kid_refetches))
            .await;
        let (keys, _) = self.snapshot();
        let matching = select(&keys, kid, alg);
        if matching.is_empty() {
            return Err(KeyLookupError::UnknownKey {
                kid: kid.map(str::to_string),
            });
        }
        Ok(matching)
    }

    fn snapshot(&self) -> (Arc<Vec<Arc<VerificationKey>>>, Option<Instant>) {
        let state = self.read_state();
        (state.keys.clone(), state.fetched_at)
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn source_url(&self) -> &str {
        match &self.config.source {
            KeySource::JwksUrl(url) | KeySource::Issuer(url) => url,
        }
    }

    /// Fetches the set unless another task did so while this one waited, or the last
    /// attempt is more recent than the minimum refetch interval. `reason` counts the
    /// fetch when one is sent.
    async fn fetch_if_allowed(&self, reason: Option<&AtomicU64>) {
        let waited_since = self.read_state().attempted_at;
        let _guard = self.fetching.lock().await;
        let attempted_at = self.read_state().attempted_at;
        if attempted_at != waited_since {
            return;
        }
        if attempted_at.is_some_and(|at| at.elapsed() < self.config.min_refetch_interval) {
            return;
        }
        if let Some(counter) = reason {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.fetch_now().await;
    }

    fn refresh_in_background(self: &Arc<Self>) {
        {
            let mut state = self.write_state();
            let retry_due = state
                .attempted_at
                .is_none_or(|at| at.elapsed() >= self.config.min_refetch_interval);
            if state.refreshing || !retry_due {
                return;
            }
            state.refreshing = true;
        }
        let set = self.clone();
        tokio::spawn(async move {
            set.fetch_if_allowed(None).await;
            set.write_state().refreshing = false;
        });
    }

    /// Sends the requests and stores the outcome. A failure keeps the previous keys.
    async fn fetch_now(&self) {
        let result = fetch_keys(&self.http, &self.config.source).await;
        let mut state = self.write_state();
        state.attempted_at = Some(Instant::now());
        match result {
            Ok((url, keys)) => {
                self.stats.fetches.fetch_add(1, Ordering::Relaxed);
                let kids: Vec<&str> = keys.iter().filter_map(|k| k.kid.as_deref()).collect();
                tracing::info!(jwks.url = %url, keys = ?kids, "fetched JWKS");
                state.keys = Arc::new(keys);
                state.fetched_at = Some(Instant::now());
                state.last_error = None;
            }
            Err(error) => {
                self.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                match state.fetched_at {
                    Some(at) => tracing::warn!(
                        source = self.source_url(),
                        error = %error,
                        keys = state.keys.len(),
                        keys.age_s = at.elapsed().as_secs(),
                        "JWKS refresh failed; tokens are still checked with the keys already fetched"
                    ),
                    None => tracing::warn!(
                        source = self.source_url(),
                        error = %error,
                        "JWKS fetch failed; JWT access tokens are answered with 503 until it succeeds"
                    ),
                }
                state.last_error = Some(error);
            }
        }
    }
}

fn select(
    keys: &[Arc<VerificationKey>],
    kid: Option<&str>,
    alg: Algorithm,
) -> Vec<Arc<VerificationKey>> {
    keys.iter()
        .filter(|key| kid.is_none_or(|kid| key.kid.as_deref() == Some(kid)))
        .filter(|key| key.fits(alg))
        .cloned()
        .collect()
}

/// Key sets by source, shared by every validator that names the same source.
// NOTE: a set whose source or intervals a reload removed stays here, unused, until the
// agent restarts.
pub struct KeySets {
    http: reqwest::Client,
    sets: Mutex<HashMap<KeySetConfig, Arc<KeySet>>>,
}

impl KeySets {
    pub fn new(http: reqwest::Client) -> KeySets {
        KeySets {
            http,
            sets: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the key set for `config`, creating it on first use. Nothing is fetched
    /// until the first lookup.
    pub fn get(&self, config: &KeySetConfig) -> Arc<KeySet> {
        let mut sets = self
            .sets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        sets.entry(config.clone())
            .or_insert_with(|| Arc::new(KeySet::new(config.clone(), self.http.clone())))
            .clone()
    }

    /// Returns every key set created so far, for a metrics exporter to read their
    /// [`KeySetStats`].
    pub fn all(&self) -> Vec<Arc<KeySet>> {
        let sets = self
            .sets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        sets.values().cloned().collect()
    }
}

/// Fetches the set from `source` and returns the JWKS URL it came from with its keys.
async fn fetch_keys(
    http: &reqwest::Client,
    source: &KeySource,
) -> Result<(String, Vec<Arc<VerificationKey>>), KeySetError> {
    let url = match source {
        KeySource::JwksUrl(url) => url.clone(),
        KeySource::Issuer(issuer) => discover_jwks_uri(http, issuer).await?,
    };
    let body = get_document(http, &url).await?;
    let keys = parse_jwks(&url, &body)?;
    Ok((url, keys))
}

#[derive(serde::Deserialize)]
struct Metadata {
    issuer: Option<String>,
    jwks_uri: Option<String>,
}

/// Reads `jwks_uri` from the issuer's metadata: OpenID Connect Discovery 1.0 section 4
/// first, then the RFC 8414 section 3 location when the first returns 404. Both
/// documents must name exactly the configured issuer.
async fn discover_jwks_uri(http: &reqwest::Client, issuer: &str) -> Result<String, KeySetError> {
    let mut last = None;
    for url in metadata_urls(issuer) {
        let body = match get_document(http, &url).await {
            Ok(body) => body,
            Err(KeySetError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                last = Some(KeySetError::Status { url, status });
                continue;
            }
            Err(e) => return Err(e),
        };
        let metadata: Metadata =
            serde_json::from_slice(&body).map_err(|e| KeySetError::InvalidDocument {
                url: url.clone(),
                reason: format!("not a metadata document ({e})"),
            })?;
        let found = metadata.issuer.unwrap_or_default();
        if found != issuer {
            return Err(KeySetError::IssuerMismatch {
                url,
                expected: issuer.to_string(),
                found,
            });
        }
        return metadata.jwks_uri.ok_or(KeySetError::InvalidDocument {
            url,
            reason: "jwks_uri is missing; set jwks_url in the validator".to_string(),
        });
    }
    Err(last.expect("metadata_urls returns at least one URL"))
}

/// Returns the OpenID Connect Discovery URL (issuer + `/.well-known/openid-configuration`) and the
/// RFC 8414 URL (`/.well-known/oauth-authorization-server` inserted before the issuer's
/// path).
fn metadata_urls(issuer: &str) -> Vec<String> {
    let trimmed = issuer.trim_end_matches('/');
    let mut urls = vec![format!("{trimmed}/.well-known/openid-configuration")];
    if let Ok(parsed) = url::Url::parse(issuer) {
        let path = parsed.path().trim_end_matches('/');
        let origin = parsed.origin().ascii_serialization();
        urls.push(format!(
            "{origin}/.well-known/oauth-authorization-server{path}"
        ));
    }
    urls
}

async fn get_document(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, KeySetError> {
    let transport = |source| KeySetError::Transport {
        url: url.to_string(),
        source: Arc::new(source),
    };
    let mut response = http
        .get(url)
        .header(http::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(transport)?;
    let status = response.status();
    if !status.is_success() {
        return Err(KeySetError::Status {
            url: url.to_string(),
            status,
        });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(KeySetError::InvalidDocument {
                url: url.to_string(),
                reason: format!("larger than {MAX_DOCUMENT_BYTES} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(serde::Deserialize)]
struct JwksDocument {
    keys: Vec<serde_json::Value>,
}

/// Parses a JWKS and keeps the public signing keys this agent can verify with. Symmetric
/// (`oct`) keys, encryption keys and keys of unknown types are skipped, so a shared
/// secret can never verify a token.
fn parse_jwks(url: &str, body: &[u8]) -> Result<Vec<Arc<VerificationKey>>, KeySetError> {
    let document: JwksDocument =
        serde_json::from_slice(body).map_err(|e| KeySetError::InvalidDocument {
            url: url.to_string(),
            reason: format!("not a JWKS ({e})"),
        })?;
    let mut keys = Vec::new();
    for value in document.keys {
        match verification_key(value) {
            Ok(key) => keys.push(Arc::new(key)),
            Err(reason) => tracing::debug!(jwks.url = url, reason, "JWKS key skipped"),
        }
    }
    if keys.is_empty() {
        return Err(KeySetError::NoUsableKeys {
            url: url.to_string(),
        });
    }
    Ok(keys)
}

fn verification_key(value: serde_json::Value) -> Result<VerificationKey, String> {
    if value.get("kty").and_then(|v| v.as_str()) == Some("oct") {
        return Err("symmetric key".to_string());
    }
    let jwk: Jwk = serde_json::from_value(value).map_err(|e| format!("unsupported key: {e}"))?;
    if matches!(&jwk.common.public_key_use, Some(key_use) if *key_use != PublicKeyUse::Signature) {
        return Err("not a signing key".to_string());
    }
    let alg = match jwk.common.key_algorithm {
        Some(key_alg) => Some(
            Algorithm::from_str(&key_alg.to_string())
                .map_err(|_| format!("algorithm {key_alg} does not sign"))?,
        ),
        None => None,
    };
    let (family, curve) = match &jwk.algorithm {
        AlgorithmParameters::RSA(params) => {
            let modulus = base64_decoded_len(&params.n);
            if modulus < 256 {
                return Err(format!("RSA key of {} bits is too short", modulus * 8));
            }
            (AlgorithmFamily::Rsa, None)
        }
        AlgorithmParameters::EllipticCurve(params) => {
            if !matches!(params.curve, EllipticCurve::P256 | EllipticCurve::P384) {
                return Err(format!("curve {:?} is not supported", params.curve));
            }
            (AlgorithmFamily::Ec, Some(params.curve.clone()))
        }
        AlgorithmParameters::OctetKeyPair(params) => {
            if params.curve != EllipticCurve::Ed25519 {
                return Err(format!("curve {:?} is not supported", params.curve));
            }
            (AlgorithmFamily::Ed, Some(params.curve.clone()))
        }
        AlgorithmParameters::OctetKey(_) => return Err("symmetric key".to_string()),
    };
    if alg.is_some_and(|alg| !family.algorithms().contains(&alg)) {
        return Err("the key's alg does not match its type".to_string());
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("invalid key: {e}"))?;
    Ok(VerificationKey {
        kid: jwk.common.key_id,
        alg,
        family,
        curve,
        key,
    })
}

/// Length in bytes of unpadded base64url text, leading zero bytes included.
fn base64_decoded_len(text: &str) -> usize {
    text.trim_end_matches('=').len() * 3 / 4
}

#[cfg(test)]
pub(crate) mod tests;
