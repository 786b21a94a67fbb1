//! resa-sys's build script finds libresa; when it came from RESA_LIB_DIR this
//! crate's tests, examples and binaries get that directory as their run path
//! too (a build script's `rustc-link-arg` does not reach dependent crates).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_RESA_LIB_DIR");
    if let Ok(dir) = std::env::var("DEP_RESA_LIB_DIR") {
        if !dir.is_empty() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir);
        }
    }
}
