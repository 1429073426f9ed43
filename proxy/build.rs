//! Checks for the system libraries the netlink backend links (libnftnl ≥ 1.2.4, libmnl ≥
//! 1.0.4) with pkg-config, and stops the build with a message saying what to install instead
//! of a panic deep in a `-sys` crate's build script.
//!
//! The `nftnl-sys` and `mnl-sys` build scripts probe too (and panic when the library is
//! missing); this crate reaches them only through `nftnl` and `mnl`, so this script does not
//! wait for theirs and its error is printed as well.

const INSTALL: &str = "install them with `apt-get install libnftnl-dev libmnl-dev pkg-config` \
     (Debian/Ubuntu) or `dnf install libnftnl-devel libmnl-devel pkgconf` (Fedora)";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo::rerun-if-env-changed=PKG_CONFIG_LIBDIR");
    let mut missing = Vec::new();
    for (lib, version) in [("libnftnl", "1.2.4"), ("libmnl", "1.0.4")] {
        let probe = pkg_config::Config::new()
            .atleast_version(version)
            .cargo_metadata(false)
            .probe(lib);
        if let Err(e) = probe {
            let why = e.to_string();
            let first = why.lines().next().unwrap_or("not found").to_string();
            missing.push(format!("{lib} >= {version} ({first})"));
        }
    }
    if !missing.is_empty() {
        println!(
            "cargo::error=lb-proxy links the system libraries libnftnl and libmnl, and pkg-config \
             does not find {}: {INSTALL}",
            missing.join(" nor ")
        );
    }
}
