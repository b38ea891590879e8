//! Responses the agent writes itself.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::{BodyExt, Full};

use super::upstream::ProxyBody;

/// Builds a short plain-text response. `text` must name the cause and carry no secret.
pub fn text(status: StatusCode, text: String) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Wraps a destination's response so it can share a type with the agent's own responses.
pub fn forwarded(response: Response<hyper::body::Incoming>) -> Response<ProxyBody> {
    response.map(|body| body.boxed())
}
