//! What this build of lwi runs on: versions, CUDA, devices.

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct RuntimeInfo {
    pub lwi_version: &'static str,
    pub libtorch_version: &'static str,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    pub devices: Vec<String>,
    /// Per CUDA device: its compute capability (major · 10 + minor, e.g. 90) and whether bf16 runs
    /// as bf16 there (else as fp16 autocast).
    pub gpus: Vec<GpuInfo>,
    pub threads: i32,
}

#[derive(Debug, Serialize)]
pub struct GpuInfo {
    pub device: String,
    pub compute_capability: Option<i32>,
    pub bf16: bool,
}

pub fn runtime_info() -> RuntimeInfo {
    let cuda = tch::Cuda::is_available();
    let mut devices = vec!["cpu".to_string()];
    let mut gpus = Vec::new();
    if cuda {
        for i in 0..tch::Cuda::device_count() as usize {
            let device = tch::Device::Cuda(i);
            devices.push(format!("cuda:{i}"));
            gpus.push(GpuInfo {
                device: format!("cuda:{i}"),
                compute_capability: crate::model::precision::cuda_compute_capability(device),
                bf16: crate::model::precision::bf16_supported(device),
            });
        }
    }
    RuntimeInfo {
        lwi_version: env!("CARGO_PKG_VERSION"),
        libtorch_version: env!("LWI_LIBTORCH_VERSION"),
        cuda_available: cuda,
        cudnn_available: cuda && tch::Cuda::cudnn_is_available(),
        devices,
        gpus,
        threads: tch::get_num_threads(),
    }
}
