//! POST requests to the token and introspection endpoints: client authentication with
//! a client secret (RFC 6749 section 2.3.1) or a signed JWT assertion (RFC 7523 section
//! 2.2), and the split of the response into success, OAuth error (RFC 6749 section 5.2)
//! and anything else.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue};

use super::assertion::ASSERTION_TYPE;
use super::error_response::OAuthError;
use super::{ClientAuthMethod, ClientId};
use crate::config::secret::Secret;

/// A client that authenticates a request with its client secret.
pub(crate) struct ClientAuth<'a> {
    pub id: &'a ClientId,
    pub secret: &'a Secret,
    pub method: ClientAuthMethod,
}

/// How a request proves the client's identity.
pub(crate) enum RequestAuth<'a> {
    Secret(ClientAuth<'a>),
    /// A signed JWT in `client_assertion` (RFC 7521 section 4.2). `client_id` is sent as
    /// well, which RFC 7521 allows and some providers require.
    Assertion {
        id: &'a ClientId,
        assertion: String,
    },
}

impl<'a> From<ClientAuth<'a>> for RequestAuth<'a> {
    fn from(client: ClientAuth<'a>) -> Self {
        RequestAuth::Secret(client)
    }
}

/// Failure of a POST to an OAuth endpoint. Callers turn it into their own error type,
/// which adds the URL and the client id.
pub(crate) enum ExchangeError {
    /// No complete HTTP response arrived.
    Transport {
        kind: &'static str,
        source: reqwest::Error,
    },
    /// A status other than 200 with an OAuth error body.
    Rejected {
        status: StatusCode,
        error: OAuthError,
    },
    /// A status other than 200 with any other body, such as a proxy's HTML error page.
    NotOAuthError { status: StatusCode },
}

/// Sends `form` as an `application/x-www-form-urlencoded` POST body to `url`,
/// authenticated as `auth` says, and returns the body of a 200 response.
pub(crate) async fn post_form<'a>(
    http: &reqwest::Client,
    url: &str,
    mut form: Vec<(&'static str, String)>,
    auth: impl Into<RequestAuth<'a>>,
) -> Result<Bytes, ExchangeError> {
    let mut request = http.post(url).header(ACCEPT, "application/json");
    match auth.into() {
        RequestAuth::Secret(client) => match client.method {
            ClientAuthMethod::ClientSecretBasic => {
                request =
                    request.header(AUTHORIZATION, basic_authorization(client.id, client.secret));
            }
            ClientAuthMethod::ClientSecretPost => {
                form.push(("client_id", client.id.0.clone()));
                form.push(("client_secret", client.secret.expose().to_string()));
            }
        },
        RequestAuth::Assertion { id, assertion } => {
            form.push(("client_id", id.0.clone()));
            form.push(("client_assertion_type", ASSERTION_TYPE.to_string()));
            form.push(("client_assertion", assertion));
        }
    }

    let transport = |source: reqwest::Error| ExchangeError::Transport {
        kind: describe_transport_error(&source),
        source,
    };
    let response = request.form(&form).send().await.map_err(transport)?;
    let status = response.status();
    let body = response.bytes().await.map_err(transport)?;

    if status == StatusCode::OK {
        return Ok(body);
    }
    Err(match OAuthError::parse(&body) {
        Some(error) => ExchangeError::Rejected { status, error },
        None => ExchangeError::NotOAuthError { status },
    })
}

/// Returns a short reason for a failed HTTP exchange. The full cause stays in the
/// `reqwest::Error`.
fn describe_transport_error(error: &reqwest::Error) -> &'static str {
    if error.is_builder() {
        "the URL is invalid"
    } else if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_body() || error.is_decode() {
        "reading the response failed"
    } else {
        "the HTTP request failed"
    }
}

/// Builds `Basic base64(urlencode(id) ":" urlencode(secret))`. RFC 6749 section 2.3.1
/// requires the form-urlencoding, so a secret that contains `:` or non-ASCII characters
/// still splits correctly at the server. The value is marked sensitive, so the http crate
/// hides it when the request is printed.
fn basic_authorization(client_id: &ClientId, client_secret: &Secret) -> HeaderValue {
    let credentials = format!(
        "{}:{}",
        form_urlencode(&client_id.0),
        form_urlencode(client_secret.expose())
    );
    let encoded = format!("Basic {}", STANDARD.encode(credentials));
    let mut header =
        HeaderValue::from_str(&encoded).expect("base64 output is always a valid header value");
    header.set_sensitive(true);
    header
}

/// Encodes `value` as the `application/x-www-form-urlencoded` byte serializer of the URL
/// standard does: ASCII alphanumerics and `*-._` stay, a space becomes `+`, and every
/// other byte of the UTF-8 encoding becomes `%XX`.
fn form_urlencode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                encoded.push(byte as char);
            }
            b' ' => encoded.push('+'),
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urlencode_keeps_unreserved() {
        assert_eq!(form_urlencode("Az09*-._"), "Az09*-._");
    }

    #[test]
    fn urlencode_escapes_reserved_and_utf8() {
        assert_eq!(form_urlencode("a b"), "a+b");
        assert_eq!(form_urlencode("s3:cr t+/=&%"), "s3%3Acr+t%2B%2F%3D%26%25");
        assert_eq!(form_urlencode("é"), "%C3%A9");
    }

    #[test]
    fn basic_header_encodes_then_base64() {
        let header =
            basic_authorization(&ClientId("my client".into()), &Secret::new("p:ss", "test"));
        // base64("my+client:p%3Ass")
        assert_eq!(header.to_str().unwrap(), "Basic bXkrY2xpZW50OnAlM0Fzcw==");
        assert!(header.is_sensitive());
    }
}
