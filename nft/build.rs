//! Checks for the system libraries the netlink backend links (libnftnl ≥ 1.2.4, libmnl ≥
//! 1.0.4) with pkg-config, and stops the build with a message saying what to install instead
//! of a panic deep in a `-sys` crate's build script.
//!
//! The workspace's `.cargo/config.toml` replaces the build scripts of `nftnl-sys` and
//! `mnl-sys` (which panic when their library is missing) by plain link lines, so this probe
//! is the one that runs; it also passes on the libraries' link paths from pkg-config.

const INSTALL: &str = "install them with `apt-get install libnftnl-dev libmnl-dev pkg-config` \
     (Debian/Ubuntu) or `dnf install libnftnl-devel libmnl-devel pkgconf` (Fedora)";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo::rerun-if-env-changed=PKG_CONFIG_LIBDIR");
    let missing: Vec<String> = [("libnftnl", "1.2.4"), ("libmnl", "1.0.4")]
        .into_iter()
        .filter(|(lib, version)| {
            pkg_config::Config::new()
                .atleast_version(version)
                .probe(lib)
                .is_err()
        })
        .map(|(lib, version)| format!("{lib} >= {version}"))
        .collect();
    if !missing.is_empty() {
        println!(
            "cargo::error=lb-nft (and so lb-proxy) links the system libraries libnftnl and libmnl, and pkg-config \
             does not find {}: {INSTALL}",
            missing.join(" nor ")
        );
    }
}
