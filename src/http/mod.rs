//! The HTTP layer: the terminal and admin listeners ([`ingress`]: TLS,
//! HTTP/1.1 and HTTP/2, timeouts, bounded bodies), admission limits
//! ([`admission`]), the table of every route ([`routes`]), the admin
//! routes ([`admin`]), and the one place where errors get a status
//! ([`error`]). It turns requests into calls on the services and answers
//! back; it decides nothing itself.

pub mod admin;
pub mod admission;
pub mod error;
pub mod ingress;
pub mod routes;

use std::sync::Arc;

use crate::service::gateway::Gateway;

/// What the listeners share: the services, the admission limits, and the
/// pre-registered counters of the busiest route.
pub struct Front {
    pub gw: Arc<Gateway>,
    pub admission: Arc<admission::Admission>,
    pub counters: ingress::RouteCounters,
}

impl Front {
    pub fn new(gw: Arc<Gateway>, admission: Arc<admission::Admission>) -> Front {
        Front {
            gw,
            admission,
            counters: ingress::RouteCounters::new(),
        }
    }
}
