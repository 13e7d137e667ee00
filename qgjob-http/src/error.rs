//! Errors: [`ApiError`] (every HTTP error answer, always `{"error": {"code", "message"}}`),
//! the [`ApiJson`] extractor that gives malformed bodies that same shape, and
//! [`ServerError`] for starting and running the server.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use qgjob_core::{CancelError, DeviceError, InvalidSpec, ReportError, SubmitError};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::store::StoreError;

/// An error answer: status, machine-readable code, message, and for 422 the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code, e.g. `stale_lease`.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// The invalid field (422 only), e.g. `priority` or `jobs[2].org_id`.
    pub field: Option<String>,
}

impl ApiError {
    /// An error with no field.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 with `code`.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 409 `conflict` about one field of the request.
    pub fn invalid_conflict(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.into()),
            ..Self::conflict("conflict", message)
        }
    }

    /// 413 `too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    /// 422 `invalid_field` naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_field",
            message: message.into(),
            field: Some(field.into()),
        }
    }

    /// 500 `internal`. The detail is logged, not sent: it may name server internals.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error",
        )
    }

    /// 503 `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let refusal = self.status.is_client_error().then(|| Refusal {
            code: self.code,
            message: self.message.clone(),
        });
        let mut err = json!({"code": self.code, "message": self.message});
        if let Some(f) = self.field {
            err["field"] = json!(f);
        }
        let mut resp = (self.status, axum::Json(json!({ "error": err }))).into_response();
        if let Some(r) = refusal {
            resp.extensions_mut().insert(r);
        }
        resp
    }
}

/// What a 4xx answer said, kept on the response for [`log_refusals`].
#[derive(Debug, Clone)]
struct Refusal {
    code: &'static str,
    message: String,
}

/// Middleware: logs every 4xx answer with its method, path and reason; 401 and 403 as
/// warnings (a misconfigured agent or CI job, or someone trying tokens), the rest at info.
/// tower-http's trace layer logs them only at debug, so an operator whose agents were
/// refused saw nothing. No message names a token.
pub async fn log_refusals(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    // Cheap clones (shared bytes): this runs for every request, refused or not.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let resp = next.run(req).await;
    let status = resp.status();
    if let Some(r) = resp.extensions().get::<Refusal>() {
        let path = uri.path();
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            tracing::warn!(%method, %path, status = status.as_u16(), code = r.code, "refused: {}", r.message);
        } else {
            tracing::info!(%method, %path, status = status.as_u16(), code = r.code, "refused: {}", r.message);
        }
    }
    resp
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::LogFull { .. } => ApiError::too_large(e.to_string()),
            other => ApiError::internal(other),
        }
    }
}

impl From<InvalidSpec> for ApiError {
    fn from(e: InvalidSpec) -> Self {
        ApiError::invalid(e.field, e.to_string())
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid { source, .. } => source.into(),
            SubmitError::IdempotencyConflict { .. } => {
                ApiError::conflict("conflict", e.to_string())
            }
            SubmitError::Duplicate(_) => ApiError::conflict("conflict", e.to_string()),
        }
    }
}

impl From<ReportError> for ApiError {
    fn from(e: ReportError) -> Self {
        match e {
            ReportError::StaleLease(_) | ReportError::NotInLease { .. } => {
                ApiError::conflict("stale_lease", e.to_string())
            }
        }
    }
}

impl From<CancelError> for ApiError {
    fn from(e: CancelError) -> Self {
        match e {
            CancelError::NotFound(_) => ApiError::not_found(e.to_string()),
            CancelError::AlreadyFinal { .. } => ApiError::conflict("already_final", e.to_string()),
        }
    }
}

impl From<DeviceError> for ApiError {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::UnknownDevice(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_device", e.to_string())
            }
            DeviceError::Lost(_) => ApiError::conflict("device_lost", e.to_string()),
            DeviceError::Busy { .. } => ApiError::conflict("conflict", e.to_string()),
            DeviceError::Held { .. } => ApiError::conflict("device_held", e.to_string()),
            DeviceError::TakenOver(_) => ApiError::conflict("device_taken", e.to_string()),
            DeviceError::Invalid(i) => i.into(),
        }
    }
}

/// A JSON body extractor whose every failure is an [`ApiError`]: 400 `malformed_json` for
/// bytes that are not JSON, 415-free (any content type is read as JSON), 413 for bodies over
/// the limit, 422 naming the field for a missing or invalid field, 400 `bad_request` for a
/// value of the wrong type.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if let Some(e) = crate::intake::refused_body(&rej) {
                e
            } else if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large("request body is too large")
            } else {
                ApiError::bad_request(rej.body_text())
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Path parameters, with a bad one (e.g. invalid UTF-8 in `%FF`) answered in the JSON error
/// shape rather than axum's plain text.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|rej| ApiError::bad_request(rej.body_text()))
    }
}

/// Parses a JSON body with the same error mapping as [`ApiJson`].
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // One pass; the error's category tells "not JSON at all" from "JSON of the wrong shape".
    let malformed = |inner: &serde_json::Error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("body is not valid JSON: {inner}"),
        )
    };
    // Fast path without path tracking; only a failing body is parsed again to name the field.
    if let Ok(v) = serde_json::from_slice::<T>(bytes) {
        return Ok(v);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        use serde_json::error::Category;
        let path = e.path().to_string();
        let inner = e.into_inner();
        if matches!(
            inner.classify(),
            Category::Syntax | Category::Eof | Category::Io
        ) {
            return malformed(&inner);
        }
        // serde_json appends " at line L column C" to data errors; the path says more.
        let full = inner.to_string();
        let msg = match full.rfind(" at line ") {
            Some(i) => full[..i].to_string(),
            None => full,
        };
        if let Some(rest) = msg.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or_default();
            let field = if path == "." || path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            };
            return ApiError::invalid(field, msg);
        }
        if msg.starts_with("invalid type") || msg.starts_with("invalid length") {
            return ApiError::bad_request(format!("{path}: {msg}"));
        }
        // Validation inside a type (names, targets, states) or unknown variants.
        ApiError::invalid(path, msg)
    })?;
    // Trailing bytes after the value are malformed too.
    de.end().map_err(|e| malformed(&e))?;
    Ok(value)
}

/// Starting or running the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding or serving failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The store could not be opened or read.
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    /// The stored jobs could not rebuild the scheduler.
    #[error("cannot restore the scheduler: {0}")]
    Restore(#[from] qgjob_core::RestoreError),
    /// The configuration is not usable.
    #[error("configuration error: {0}")]
    Config(String),
    /// What the server needs cannot be had: its address is taken, another server holds
    /// its store, its database is unreachable, or a store write failed while serving.
    #[error("{0}")]
    Unavailable(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    /// A log sink the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn refusals_are_logged_with_their_reason() {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let app = axum::Router::new()
                .route(
                    "/secret",
                    axum::routing::get(|| async {
                        Err::<(), _>(ApiError::unauthorized("unknown token"))
                    }),
                )
                .route(
                    "/missing",
                    axum::routing::get(|| async { Err::<(), _>(ApiError::not_found("no job j1")) }),
                )
                .route("/fine", axum::routing::get(|| async { "ok" }))
                .layer(axum::middleware::from_fn(log_refusals));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            let answers = tokio::task::spawn_blocking(move || {
                ["/secret", "/missing", "/fine"].map(|p| get(addr, p))
            })
            .await
            .unwrap();
            assert!(answers[0].starts_with("HTTP/1.1 401"), "{}", answers[0]);
            assert!(answers[1].starts_with("HTTP/1.1 404"), "{}", answers[1]);
            assert!(answers[2].starts_with("HTTP/1.1 200"), "{}", answers[2]);
        });
        let log = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert!(
            lines[0].contains("WARN")
                && lines[0].contains("refused: unknown token")
                && lines[0].contains("path=/secret")
                && lines[0].contains("status=401"),
            "{log}"
        );
        assert!(
            lines[1].contains("INFO")
                && lines[1].contains("refused: no job j1")
                && lines[1].contains("code=\"not_found\"")
                && lines[1].contains("method=GET"),
            "{log}"
        );
    }
}
