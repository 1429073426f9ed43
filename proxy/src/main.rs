//! `lb-proxy`: the node daemon. Minimal entry point; the dataplane lands in later work.

fn main() {
    println!("lb-proxy {}", env!("CARGO_PKG_VERSION"));
}
