//! What a client sees when a request fails: an HTTP status, a stable code
//! (API.md) and a message, in the body `{"error": {"code", "message"}}`.
//!
//! This is the one place where errors get a status: the layers below say
//! what went wrong in their own terms ([`ServiceError`], a decoder's
//! [`Invalid`]) and the `From` impls here turn them into an [`ApiError`].
//! A storage failure is logged here, once, with its cause; the client is
//! told only that it may retry.

use http::StatusCode;

use onecard_core::wire::{ErrorBody, ErrorCode, Invalid};

use crate::service::error::ServiceError;

/// A client-visible failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {}: {message}", status(*code), code.as_str())]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// `Retry-After` in seconds where it is not the code's usual one
    /// ([`retry_after_s`]): load shedding asks for longer.
    pub retry_after_s: Option<u32>,
}

/// The HTTP status of each stable code.
pub fn status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::IdempotencyConflict | ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// `429` and `503` tell the client when to come back (API.md), in seconds.
pub fn retry_after_s(code: ErrorCode) -> Option<u32> {
    match code {
        ErrorCode::RateLimited | ErrorCode::Unavailable => Some(1),
        _ => None,
    }
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// This refusal with `Retry-After: seconds` (at least 1).
    pub fn retry_after(mut self, seconds: u32) -> ApiError {
        self.retry_after_s = Some(seconds.max(1));
        self
    }

    /// The `Retry-After` this error is answered with, if any.
    pub fn retry_after_header(&self) -> Option<u32> {
        retry_after_s(self.code).map(|usual| self.retry_after_s.unwrap_or(usual))
    }
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    pub fn status(&self) -> StatusCode {
        status(self.code)
    }

    pub fn detail(&self) -> ErrorBody {
        ErrorBody::new(self.code, self.message.clone())
    }

    /// `{"error": {"code": "...", "message": "..."}}`
    pub fn body(&self) -> Vec<u8> {
        self.detail().to_vec()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        match &e {
            ServiceError::Store(cause) => tracing::error!(error = %cause, "storage read failed"),
            ServiceError::Commit(cause) => {
                tracing::debug!(error = %cause, "a commit was refused")
            }
            _ => {}
        }
        ApiError::new(e.code(), e.to_string())
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> ApiError {
        ApiError::invalid(e.0)
    }
}

impl From<onecard_core::disburse::BodyError> for ApiError {
    fn from(e: onecard_core::disburse::BodyError) -> ApiError {
        ServiceError::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_status_and_busy_ones_say_when_to_retry() {
        for &code in ErrorCode::ALL {
            let s = status(code);
            assert!(s.is_client_error() || s.is_server_error(), "{code:?}");
            assert_eq!(
                retry_after_s(code).is_some(),
                matches!(s.as_u16(), 429 | 503),
                "{code:?}"
            );
        }
        let e = ApiError::new(ErrorCode::RateLimited, "slow down");
        assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            e.body(),
            br#"{"error":{"code":"RATE_LIMITED","message":"slow down"}}"#
        );
    }

    #[test]
    fn service_errors_keep_their_code_and_message() {
        let e = ApiError::from(ServiceError::already_used("`event_id` was used"));
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert_eq!(e.code, ErrorCode::IdempotencyConflict);
        assert_eq!(e.message, "`event_id` was used");
    }
}
