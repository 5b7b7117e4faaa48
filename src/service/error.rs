//! What can go wrong with a request, in the services' own terms.
//!
//! A service says *what* went wrong ([`ServiceError`]); the wire contract's
//! stable code follows from that ([`ServiceError::code`]); the HTTP layer
//! picks the status (`http::error`, the one place that does). A decline is
//! not an error: it is a normal answer with a reason. Messages name the
//! field, the rule or the limit, never a card number or a personal ID.

use onecard_core::disburse::BodyError;
use onecard_core::wire::{ErrorBody, ErrorCode, Invalid};

use crate::store::durable::CommitError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request breaks a rule: a field missing or out of range, a
    /// value the config does not know.
    #[error("{0}")]
    Invalid(String),
    /// The caller may not do this (a terminal that is not an offline
    /// validator uploading offline taps).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// An id (a terminal's event id, a batch id) used before for another
    /// request.
    #[error("{0}")]
    AlreadyUsed(String),
    /// What is asked is not possible from the current state (a cancelled
    /// card cannot be frozen).
    #[error("{0}")]
    Conflict(String),
    /// More than a bound allows.
    #[error("{0}")]
    TooLarge(String),
    /// A body in a format this route does not take.
    #[error("{0}")]
    UnsupportedFormat(String),
    /// The store could not be read: nothing was decided or changed.
    #[error("the gateway cannot read its store; retry shortly")]
    Store(#[from] StoreError),
    /// The decision could not be made durable: nothing was answered.
    #[error("{}", commit_message(*.0))]
    Commit(#[from] CommitError),
    /// Cannot be done now for another reason (the message says which);
    /// retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// Asked too often (the message says what and until when).
    #[error("{0}")]
    RateLimited(String),
}

fn commit_message(e: CommitError) -> &'static str {
    match e {
        CommitError::Busy => "the journal queue is full; retry shortly",
        CommitError::Closed => "the gateway is shutting down; retry on another node or shortly",
        CommitError::Failed => {
            "the gateway cannot record decisions (storage failure); retry on another node"
        }
        CommitError::Unreachable => {
            "this node cannot reach the cluster's journal; retry on another node or shortly"
        }
        CommitError::Raced { .. } => "the card was busy at another node; retry shortly",
        CommitError::TooLarge => {
            "the change writes too many cards at once for the cluster's journal; send fewer"
        }
    }
}

impl ServiceError {
    pub fn invalid(message: impl Into<String>) -> ServiceError {
        ServiceError::Invalid(message.into())
    }
    pub fn not_found(message: impl Into<String>) -> ServiceError {
        ServiceError::NotFound(message.into())
    }
    pub fn conflict(message: impl Into<String>) -> ServiceError {
        ServiceError::Conflict(message.into())
    }
    pub fn already_used(message: impl Into<String>) -> ServiceError {
        ServiceError::AlreadyUsed(message.into())
    }
    pub fn unavailable(message: impl Into<String>) -> ServiceError {
        ServiceError::Unavailable(message.into())
    }
    pub fn forbidden(message: impl Into<String>) -> ServiceError {
        ServiceError::Forbidden(message.into())
    }
    pub fn too_large(message: impl Into<String>) -> ServiceError {
        ServiceError::TooLarge(message.into())
    }
    pub fn unsupported_format(message: impl Into<String>) -> ServiceError {
        ServiceError::UnsupportedFormat(message.into())
    }

    /// The wire contract's stable code (API.md).
    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::Invalid(_) => ErrorCode::InvalidRequest,
            ServiceError::Forbidden(_) => ErrorCode::Forbidden,
            ServiceError::NotFound(_) => ErrorCode::NotFound,
            ServiceError::AlreadyUsed(_) => ErrorCode::IdempotencyConflict,
            ServiceError::Conflict(_) => ErrorCode::Conflict,
            ServiceError::TooLarge(_) => ErrorCode::PayloadTooLarge,
            ServiceError::UnsupportedFormat(_) => ErrorCode::UnsupportedMediaType,
            ServiceError::Store(_) | ServiceError::Commit(_) | ServiceError::Unavailable(_) => {
                ErrorCode::Unavailable
            }
            ServiceError::RateLimited(_) => ErrorCode::RateLimited,
        }
    }

    /// Code and message, as an answer carries them inside a `200` (an
    /// offline upload's per-event outcome).
    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string())
    }
}

impl From<Invalid> for ServiceError {
    fn from(e: Invalid) -> ServiceError {
        ServiceError::Invalid(e.0)
    }
}

impl From<BodyError> for ServiceError {
    fn from(e: BodyError) -> ServiceError {
        match e {
            BodyError::Invalid(m) => ServiceError::Invalid(m),
            BodyError::TooLarge(m) => ServiceError::TooLarge(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_code_and_says_why() {
        let cases = [
            (ServiceError::invalid("x"), "INVALID_REQUEST"),
            (ServiceError::already_used("x"), "IDEMPOTENCY_CONFLICT"),
            (ServiceError::Commit(CommitError::Busy), "UNAVAILABLE"),
            (ServiceError::Store(StoreError::Closed), "UNAVAILABLE"),
            (Invalid::new("`a` is bad").into(), "INVALID_REQUEST"),
            (
                BodyError::TooLarge("big".into()).into(),
                "PAYLOAD_TOO_LARGE",
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.code().as_str(), code, "{e}");
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(
            ServiceError::Commit(CommitError::Busy).to_string(),
            "the journal queue is full; retry shortly"
        );
    }
}
