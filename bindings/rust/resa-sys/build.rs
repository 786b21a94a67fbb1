//! Finds libresa.  In order:
//! 1. `RESA_LIB_DIR`: a directory holding libresa.so (a build tree such as
//!    `build/lib`).  It is also written into the binaries' run path, here and
//!    (through `DEP_RESA_LIB_DIR`) in crates that depend on resa-sys.
//! 2. `pkg-config --libs resa` (the `pkg-config` binary; no crate).
//! 3. The linker's default library path (`-lresa`).
use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=RESA_LIB_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-changed=build.rs");

    if let Some(dir) = env::var_os("RESA_LIB_DIR") {
        let dir = dir.to_string_lossy().into_owned();
        if !dir.is_empty() {
            println!("cargo:rustc-link-search=native={}", dir);
            println!("cargo:rustc-link-lib=dylib=resa");
            // Run path for this crate's own tests; dependents read
            // DEP_RESA_LIB_DIR (the `links` metadata) and add it themselves.
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir);
            println!("cargo:lib_dir={}", dir);
            return;
        }
    }

    if let Some(libs) = pkg_config_libs() {
        let mut linked = false;
        for flag in libs.split_whitespace() {
            if let Some(dir) = flag.strip_prefix("-L") {
                println!("cargo:rustc-link-search=native={}", dir);
            } else if let Some(lib) = flag.strip_prefix("-l") {
                println!("cargo:rustc-link-lib=dylib={}", lib);
                linked |= lib == "resa";
            }
        }
        if linked {
            return;
        }
    }

    println!("cargo:rustc-link-lib=dylib=resa");
}

/// `pkg-config --libs resa`, or None when the binary or the package is absent.
fn pkg_config_libs() -> Option<String> {
    let exe = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
    let out = Command::new(exe).args(["--libs", "resa"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout).ok()
}
