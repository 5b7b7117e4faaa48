//! Terminal trust on the admin API (role `security`, or `operator`): the
//! block list of terminal certificates, one terminal's certificate as the
//! gateway last saw it (to find what to block), and the terminal
//! listener's certificates and CRLs: what is loaded, and a reload.

use http::Response;
use serde_json::Value;

use onecard_core::wire::{self, ErrorCode};

use super::{completed, ok_json, Admin};
use crate::http::error::ApiError;
use crate::http::ingress::{valid_terminal_id, Body, Req};
use crate::http::routes::RouteId;
use crate::service::cardlife::Actor;
use crate::service::trust::REASON_CHARS_MAX;
use crate::store::terminal_blocks;

impl Admin {
    pub(super) async fn trust(
        &self,
        id: RouteId,
        param: &str,
        req: Req,
        actor: Actor,
        now_ms: i64,
    ) -> Result<Response<Body>, ApiError> {
        let gw = self.gateway.clone();
        match id {
            RouteId::TerminalBlocks => {
                let list: Vec<Value> = gw
                    .terminal_blocks
                    .list()
                    .into_iter()
                    .map(|(key, e)| {
                        let mut v = serde_json::to_value(e).expect("plain records serialize");
                        v["key"] = Value::String(key);
                        v
                    })
                    .collect();
                Ok(ok_json(&serde_json::json!({
                    "count": list.len(),
                    "blocks": list,
                })))
            }
            RouteId::TerminalBlockPut => {
                let key = terminal_blocks::parse_key(param).map_err(ApiError::invalid)?;
                let m = self.body(req).await?;
                wire::reject_unknown(&m, &["reason", "terminal"])?;
                let reason = wire::req_str(&m, "reason")?.trim().to_owned();
                if reason.is_empty()
                    || reason.chars().count() > REASON_CHARS_MAX
                    || reason.chars().any(char::is_control)
                {
                    return Err(ApiError::invalid(format!(
                        "`reason` must be 1 to {REASON_CHARS_MAX} characters on one line"
                    )));
                }
                let terminal = wire::opt_str(&m, "terminal")?.map(str::to_owned);
                if terminal.as_deref().is_some_and(|t| !valid_terminal_id(t)) {
                    return Err(ApiError::invalid(
                        "`terminal` must be a terminal id: 1 to 64 of A-Za-z0-9._:-",
                    ));
                }
                let answer = completed(async move {
                    gw.block_terminal(&actor, &key, terminal, reason, now_ms)
                        .await
                })
                .await?;
                Ok(ok_json(&answer))
            }
            RouteId::TerminalBlockDelete => {
                let key = terminal_blocks::parse_key(param).map_err(ApiError::invalid)?;
                let answer =
                    completed(async move { gw.unblock_terminal(&actor, &key, now_ms).await })
                        .await?;
                Ok(ok_json(&answer))
            }
            RouteId::TerminalGet => {
                if !valid_terminal_id(param) {
                    return Err(ApiError::invalid(
                        "the terminal id in the path must be 1 to 64 of A-Za-z0-9._:-",
                    ));
                }
                let Some(view) = gw.terminals.get(param, now_ms) else {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!("terminal {param} has not connected with a certificate since this gateway started"),
                    ));
                };
                // Whether its certificate is blocked, in the same answer.
                let blocked: Vec<String> = [
                    view.cert_serial.as_ref().map(|s| format!("serial:{s}")),
                    view.cert_sha256.as_ref().map(|s| format!("sha256:{s}")),
                ]
                .into_iter()
                .flatten()
                .filter(|k| gw.terminal_blocks.get(k).is_some())
                .collect();
                let mut v = serde_json::to_value(view).expect("plain records serialize");
                v["blocked_by"] = serde_json::json!(blocked);
                Ok(ok_json(&v))
            }
            RouteId::TlsGet => Ok(ok_json(&self.tls.info())),
            RouteId::TlsReload => {
                let tls = self.tls.clone();
                let actor_for_audit = actor.clone();
                // Reading and parsing the files is blocking work.
                let result = tokio::task::spawn_blocking(move || tls.reload())
                    .await
                    .map_err(|_| {
                        ApiError::new(ErrorCode::Unavailable, "the reload was interrupted; retry")
                    })?;
                let detail = match &result {
                    Ok(_) => serde_json::json!({"result": "ok"}),
                    Err(e) => serde_json::json!({"result": "failed", "error": e.to_string()}),
                };
                let audit = completed(async move {
                    gw.audit_trust(&actor_for_audit, "tls_reload", detail, now_ms)
                        .await
                })
                .await;
                match result {
                    Ok(info) => {
                        tracing::info!(by = %actor.name, crls = info.crls.len(), "terminal TLS reloaded");
                        audit?;
                        Ok(ok_json(&serde_json::json!({"reloaded": true, "tls": info})))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "terminal TLS reload failed; the certificates loaded before stay in use");
                        Err(ApiError::new(
                            ErrorCode::Conflict,
                            format!(
                                "reload failed, the certificates loaded before stay in use: {e}"
                            ),
                        ))
                    }
                }
            }
            _ => unreachable!("trust routes only"),
        }
    }
}
