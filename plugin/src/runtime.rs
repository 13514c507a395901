//! What this build of lwi runs on: versions, CUDA, devices.

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct RuntimeInfo {
    pub lwi_version: &'static str,
    pub libtorch_version: &'static str,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    pub devices: Vec<String>,
    pub threads: i32,
}

pub fn runtime_info() -> RuntimeInfo {
    let cuda = tch::Cuda::is_available();
    let mut devices = vec!["cpu".to_string()];
    if cuda {
        devices.extend((0..tch::Cuda::device_count()).map(|i| format!("cuda:{i}")));
    }
    RuntimeInfo {
        lwi_version: env!("CARGO_PKG_VERSION"),
        libtorch_version: env!("LWI_LIBTORCH_VERSION"),
        cuda_available: cuda,
        cudnn_available: cuda && tch::Cuda::cudnn_is_available(),
        devices,
        threads: tch::get_num_threads(),
    }
}
