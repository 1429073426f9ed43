//! Sources: where the objects come from. Each source converts its objects at the edge
//! ([`crate::convert`]) and sends the same [`crate::reconcile::Input`]s — store events with
//! kube-runtime's re-list shape (`Init`, `InitApply`…, `InitDone`), and the ServiceCIDRs — to
//! the one reconciler ([`crate::reconcile`]). Neither knows about the dataplane.
//!
//! * [`api`]: the API server's watchers (`daemon`).
//! * [`files`]: manifest files, polled, each keeping its last good state (`run`, `render`,
//!   `explain`); every change is sent as a re-list of everything, so the store works out
//!   exactly what changed.

pub mod api;
pub mod files;
