//! Terminal trust: the security team blocks a stolen or lost validator's
//! certificate (by serial or SHA-256 fingerprint) and lifts a block. A
//! block is durable and audited before it is answered; from then on the
//! handshake refuses the certificate, and every connection open with it
//! closes itself (it waits on the list's changes, `http::ingress`).

use serde::Serialize;

use crate::service::cardlife::Actor;
use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::store::durable::{Commit, Op};
use crate::store::terminal_blocks::{self, Entry};
use crate::store::Cf;

/// What a block or an unblock answers.
#[derive(Debug, Serialize)]
pub struct BlockAnswer {
    pub key: String,
    #[serde(flatten)]
    pub entry: Option<Entry>,
    pub blocked: bool,
    /// `false`: it was already so (a retried request changes nothing).
    pub changed: bool,
}

/// A reason is for people reading the audit: bounded, one line.
pub const REASON_CHARS_MAX: usize = 200;

impl Gateway {
    /// Blocks the certificate `key` names (`serial:<hex>` or
    /// `sha256:<hex>`, as [`terminal_blocks::parse_key`] writes it).
    pub async fn block_terminal(
        &self,
        actor: &Actor,
        key: &str,
        terminal: Option<String>,
        reason: String,
        now_ms: i64,
    ) -> Result<BlockAnswer, ServiceError> {
        let _one = self.lists.lock().await;
        if let Some(entry) = self.terminal_blocks.get(key) {
            return Ok(BlockAnswer {
                key: key.to_owned(),
                entry: Some(entry),
                blocked: true,
                changed: false,
            });
        }
        if self.terminal_blocks.len() >= terminal_blocks::ENTRIES_MAX {
            return Err(ServiceError::TooLarge(format!(
                "the block list holds {} certificates, its limit; lift old blocks or revoke through the CA's CRL",
                terminal_blocks::ENTRIES_MAX
            )));
        }
        let entry = Entry {
            terminal,
            reason,
            by: actor.name.clone(),
            at_ms: now_ms,
        };
        let detail =
            serde_json::json!({"key": key, "terminal": entry.terminal, "reason": entry.reason});
        let ops = vec![
            Op::Put(
                Cf::TerminalBlocks,
                key.as_bytes().to_vec(),
                serde_json::to_vec(&entry).expect("plain records serialize"),
            ),
            self.audit
                .op(&actor.entry("block_terminal", None, Some(detail), now_ms)),
        ];
        let pending = self.journal.submit(Commit::new(None, ops))?;
        pending.durable().await?;
        // In a cluster the applier sets it from the stream's write. Set
        // after the commit is durable: a block answered is a block kept.
        if !self.journal.applies_memory() {
            self.terminal_blocks.set(key, Some(entry.clone()));
        }
        tracing::warn!(key, terminal = entry.terminal.as_deref().unwrap_or(""), by = %actor.name, "terminal certificate blocked");
        Ok(BlockAnswer {
            key: key.to_owned(),
            entry: Some(entry),
            blocked: true,
            changed: true,
        })
    }

    /// Lifts a block: the certificate may connect again.
    pub async fn unblock_terminal(
        &self,
        actor: &Actor,
        key: &str,
        now_ms: i64,
    ) -> Result<BlockAnswer, ServiceError> {
        let _one = self.lists.lock().await;
        let Some(entry) = self.terminal_blocks.get(key) else {
            return Ok(BlockAnswer {
                key: key.to_owned(),
                entry: None,
                blocked: false,
                changed: false,
            });
        };
        let detail = serde_json::json!({"key": key, "terminal": entry.terminal});
        let ops = vec![
            Op::Delete(Cf::TerminalBlocks, key.as_bytes().to_vec()),
            self.audit
                .op(&actor.entry("unblock_terminal", None, Some(detail), now_ms)),
        ];
        let pending = self.journal.submit(Commit::new(None, ops))?;
        pending.durable().await?;
        if !self.journal.applies_memory() {
            self.terminal_blocks.set(key, None);
        }
        tracing::warn!(key, by = %actor.name, "terminal certificate block lifted");
        Ok(BlockAnswer {
            key: key.to_owned(),
            entry: None,
            blocked: false,
            changed: true,
        })
    }

    /// Records a trust action that changes no table (a TLS reload, which
    /// reads files) in the audit trail, durably.
    pub async fn audit_trust(
        &self,
        actor: &Actor,
        action: &str,
        detail: serde_json::Value,
        now_ms: i64,
    ) -> Result<(), ServiceError> {
        let op = self
            .audit
            .op(&actor.entry(action, None, Some(detail), now_ms));
        let pending = self.journal.submit(Commit::new(None, vec![op]))?;
        pending.durable().await?;
        Ok(())
    }
}
