//! The credential step: from what the terminal read to the card it names.
//!
//! A tap carries the card number itself. A scan carries a signed dynamic QR
//! token; until issuer keys are configured (the credentials issue), scanning
//! is refused with a clear `400` rather than guessed at.

use crate::model::CardNo;
use crate::wire::{ApiError, Credential};

pub fn resolve(credential: &Credential) -> Result<&CardNo, ApiError> {
    match credential {
        Credential::Tap(card) => Ok(card),
        Credential::Scan(_) => Err(ApiError::invalid(
            "scanning is not configured on this gateway: no QR issuer keys are set up, so `kind: scan` cannot be verified; tap the card instead",
        )),
    }
}
