//! Device and dtype selection: `auto` picks CUDA when libtorch sees it, bf16 on GPU and f32 on CPU.

use tch::{Device, Kind};

use crate::error::{Error, Result};

/// Parses `auto | cpu | cuda | cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => require_cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => require_cuda(i),
            _ => Err(Error::Device(format!("`{other}` is not one of auto, cpu, cuda, cuda:N"))),
        },
    }
}

fn require_cuda(index: usize) -> Result<Device> {
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        return Err(Error::Device(format!("cuda:{index} requested but libtorch sees {count} CUDA device(s)")));
    }
    Ok(Device::Cuda(index))
}

/// Parses `auto | f32 | bf16 | f16`; `auto` is bf16 on CUDA, f32 on CPU.
pub fn parse_dtype(spec: &str, device: Device) -> Result<Kind> {
    match spec {
        "auto" if device.is_cuda() => Ok(Kind::BFloat16),
        "auto" | "f32" => Ok(Kind::Float),
        "bf16" => Ok(Kind::BFloat16),
        "f16" => Ok(Kind::Half),
        other => Err(Error::Device(format!("dtype `{other}` is not one of auto, f32, bf16, f16"))),
    }
}

/// A one-line description of what libtorch sees, for logs and `iro info`.
pub fn describe() -> String {
    format!(
        "libtorch threads={} cuda_available={} cuda_devices={} cudnn={}",
        tch::get_num_threads(),
        tch::Cuda::is_available(),
        tch::Cuda::device_count(),
        tch::Cuda::cudnn_is_available()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(parse_device("tpu").unwrap_err().to_string().contains("tpu"));
        assert!(parse_device("cuda:x").is_err());
    }

    #[test]
    fn auto_dtype_is_f32_on_cpu() {
        assert_eq!(parse_dtype("auto", Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(parse_dtype("bf16", Device::Cpu).unwrap(), Kind::BFloat16);
        assert!(parse_dtype("f8", Device::Cpu).is_err());
    }

    #[test]
    fn cuda_beyond_the_visible_count_is_a_clear_error() {
        let n = tch::Cuda::device_count();
        let err = parse_device(&format!("cuda:{n}")).unwrap_err().to_string();
        assert!(err.contains("CUDA device"), "{err}");
    }
}
