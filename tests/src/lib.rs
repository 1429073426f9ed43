//! End-to-end test helpers (network namespaces, traffic generators).
