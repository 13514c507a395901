//! The engine: where work runs (device) and with how many CPU threads; what this build of lwi runs
//! on (versions, CUDA, devices).

use crate::error::{Error, ErrorKind, Result};
use crate::model::precision::CpuBf16;
use serde::{Deserialize, Serialize};
use tch::Device;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineOptions {
    /// "auto" (the first GPU if there is one, else the CPU), "cpu" or "cuda:N".
    pub device: String,
    /// CPU threads for libtorch's intra-op pool; absent keeps libtorch's default (all cores).
    /// The pool is per process, so the last engine created sets it.
    pub threads: Option<i32>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: "auto".into(),
            threads: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Engine {
    pub device: Device,
    pub threads: i32,
}

impl Engine {
    pub fn new(options: &EngineOptions) -> Result<Engine> {
        let device = parse_device(&options.device)?;
        if let Some(n) = options.threads {
            if !(1..=1024).contains(&n) {
                return Err(Error::invalid(format!("threads must be 1..1024, got {n}")));
            }
            tch::set_num_threads(n);
        }
        if device.is_cuda() {
            // Inference and training run the same window shape over and over: let cuDNN time its
            // algorithms once per shape and keep the fastest (as MONAI's scripts do).
            tch::Cuda::cudnn_set_benchmark(true);
        }
        Ok(Engine {
            device,
            threads: tch::get_num_threads(),
        })
    }

    /// Parses engine options JSON (`{}` or empty text for the defaults).
    pub fn from_json(json: &str) -> Result<Engine> {
        Engine::new(&crate::options::parse::<EngineOptions>(
            json,
            "engine options",
        )?)
    }
}

/// "auto" | "cpu" | "cuda" | "cuda:N"; a GPU that is not there is `DEVICE_UNAVAILABLE`.
pub fn parse_device(name: &str) -> Result<Device> {
    let gpus = if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    };
    let unavailable = |what: &str| {
        Error::new(
            ErrorKind::DeviceUnavailable,
            format!("device '{what}' is not available: this machine has {gpus} CUDA device(s)"),
        )
    };
    match name {
        "auto" => Ok(if gpus > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if gpus > 0 {
                Ok(Device::Cuda(0))
            } else {
                Err(unavailable(name))
            }
        }
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) if (i as i64) < gpus => Ok(Device::Cuda(i)),
            Some(Ok(_)) => Err(unavailable(other)),
            _ => Err(Error::invalid(format!(
                "device '{other}': expected auto, cpu or cuda:N"
            ))),
        },
    }
}

/// What this build of lwi runs on: versions, CUDA, devices.
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
    /// The processor's bfloat16 instructions: with either, `precision` bf16 (and auto) runs the
    /// CPU forward under autocast; without, bf16 on the CPU is refused.
    pub cpu: CpuBf16,
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
        cpu: crate::model::precision::cpu_bf16(),
        threads: tch::get_num_threads(),
    }
}

/// "cpu" or "cuda:N".
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_missing_gpus_are_named() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(matches!(
            parse_device("auto").unwrap(),
            Device::Cpu | Device::Cuda(0)
        ));
        assert_eq!(
            parse_device("gpu").unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        let err = parse_device("cuda:7").unwrap_err();
        assert_eq!(err.kind, ErrorKind::DeviceUnavailable);
        assert!(err.message.contains("cuda:7"));
        assert_eq!(
            Engine::from_json(r#"{"threads": 0}"#).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        assert!(
            Engine::from_json(r#"{"devise": "cpu"}"#)
                .unwrap_err()
                .message
                .contains("devise")
        );
    }
}
