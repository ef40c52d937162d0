//! Compiles the paged-attention CUDA kernels to PTX when the `cuda` feature is on.
//! Needs `nvcc` (from `CUDA_HOME/bin`, `NVCC` or `PATH`) and `CUDA_COMPUTE_CAP` (e.g. 90 for
//! H100) when no GPU is visible; see scripts/setup-cuda-toolkit.sh.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/paged.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_HOME") {
        Ok(home) => format!("{home}/bin/nvcc"),
        Err(_) => "nvcc".to_string(),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".to_string());
    let ptx = out.join("paged.ptx");
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "--use_fast_math", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg("kernels/paged.cu")
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {nvcc} (install the CUDA toolkit or set NVCC/CUDA_HOME): {e}")
        });
    assert!(
        status.success(),
        "{nvcc} failed to compile kernels/paged.cu"
    );
}
