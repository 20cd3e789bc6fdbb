//! Links the `taskd` binary with link/pool_text.ld: the functions a worker or a task process
//! runs go together at the start of the text (`.text.pool`), the rest as the linker lays it out.
//!
//! Why: a process maps, besides each page of the binary it touches, the whole page cache folio
//! around it. An installed binary (written by `cp`, `install`, a package manager) is held in
//! folios of up to 128 kB; the ~150 kB of code a pool process runs, spread over 6 MB of text,
//! touched about 20 of them, 1.2 MB more RSS in every worker and task process than the same
//! binary as the linker left it (README, Performance: RSS). The list is made by
//! `benches/pool_text.py`; a function not in it still links, only elsewhere.
//!
//! Linux only (ELF; GNU ld and LLD, Rust's default linker on x86-64 Linux, both read INSERT).
//! gold cannot parse it and mold ignores such scripts: when the flags name either
//! (`-fuse-ld=gold`, `-fuse-ld=mold`, or a linker of that name), or `TASKD_NO_POOL_TEXT=1`,
//! taskd links without it.

fn main() {
    println!("cargo:rerun-if-changed=link/pool_text.ld");
    println!("cargo:rerun-if-env-changed=TASKD_NO_POOL_TEXT");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default()
        + &std::env::var("RUSTC_LINKER").unwrap_or_default();
    let other_linker = flags.contains("gold") || flags.contains("mold");
    if !linux || other_linker || std::env::var_os("TASKD_NO_POOL_TEXT").is_some_and(|v| v != "0") {
        return;
    }
    let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") else { return };
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/link/pool_text.ld");
}
