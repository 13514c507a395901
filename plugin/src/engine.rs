//! The engine: where work runs (device) and with how many CPU threads.

use crate::error::{Error, ErrorKind, Result};
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
