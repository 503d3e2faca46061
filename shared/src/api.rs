//! Consumer-facing errors in the OpenAI format:
//! `{"error":{"message","type","code","param"}}`.
//!
//! Every error a consumer can see is an [`ApiError`]; its [`ErrorKind`] decides the
//! status, the `type` and the `code` by one exhaustive match, and its message is
//! written for the client, never an internal error's text.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// What went wrong, in the consumer's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    InvalidJson,
    Unauthenticated,
    InsufficientFunds,
    ModelNotFound,
    NotFound,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    NoCapacity,
    Timeout,
    ProviderError,
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::InvalidJson => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::InsufficientFunds => StatusCode::PAYMENT_REQUIRED,
            ErrorKind::ModelNotFound | ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::NoCapacity | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::ProviderError => StatusCode::BAD_GATEWAY,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `type` field, grouped as OpenAI groups its errors.
    pub fn error_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::InvalidJson
            | ErrorKind::ModelNotFound
            | ErrorKind::NotFound
            | ErrorKind::Conflict
            | ErrorKind::PayloadTooLarge
            | ErrorKind::UnsupportedMediaType => "invalid_request_error",
            ErrorKind::Unauthenticated => "authentication_error",
            ErrorKind::InsufficientFunds => "insufficient_quota",
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::NoCapacity | ErrorKind::Unavailable => "service_unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::ProviderError => "provider_error",
            ErrorKind::Internal => "server_error",
        }
    }

    /// The machine-readable `code` field; also the metrics label of the error.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::InvalidJson => "invalid_json",
            ErrorKind::Unauthenticated => "invalid_api_key",
            ErrorKind::InsufficientFunds => "insufficient_funds",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::NoCapacity => "no_capacity",
            ErrorKind::Timeout => "timeout",
            ErrorKind::ProviderError => "provider_error",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal_error",
        }
    }
}

/// An error as the consumer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, for invalid requests.
    pub param: Option<String>,
    /// Seconds, sent as `Retry-After` on 429 and 503.
    pub retry_after_secs: Option<u32>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            retry_after_secs: None,
        }
    }

    /// An invalid request that names the field at fault.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(field.to_owned()),
            ..Self::new(ErrorKind::InvalidRequest, message)
        }
    }

    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                error_type: self.kind.error_type().to_owned(),
                code: Some(self.kind.code().to_owned()),
                param: self.param.clone(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.code())
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.kind.status();
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(self.kind);
        response
    }
}

/// The JSON error body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub error_type: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
}
