//! What training asks of the other ranks: averaged gradients, summed figures, rank 0's tensors, an
//! agreement on the config. A single process is a world of one, where every call is a no-op.

use super::group::{Backend, Group};
use super::launch::{DistributedConfig, Launch};
use crate::error::{Error, Result};
use std::time::Duration;
use tch::{Device, Tensor};

/// This process and the others of its job.
pub struct Peers {
    group: Option<Group>,
    /// Where small tensors for the collectives live (NCCL reduces CUDA tensors only).
    device: Device,
    /// A training step's limit, and the limit where ranks legitimately run apart.
    step_limit: Duration,
    wait_limit: Duration,
}

impl Peers {
    pub fn single() -> Peers {
        Peers {
            group: None,
            device: Device::Cpu,
            step_limit: Duration::from_secs(60),
            wait_limit: Duration::from_secs(1800),
        }
    }

    /// Joins the job the config or the environment describes (a single process when there is
    /// none); returns it and this rank's device (`cuda:LOCAL_RANK` of the visible GPUs when
    /// `device` is CUDA and `pinned` is false).
    pub fn join(cfg: &DistributedConfig, device: Device, pinned: bool) -> Result<(Peers, Device)> {
        let env = |k: &str| std::env::var(k).ok();
        let Some(launch) = Launch::detect(cfg, &env)? else {
            return Ok((Peers::single(), device));
        };
        let device = match device {
            Device::Cuda(_) if !pinned => {
                Device::Cuda(launch.local_rank as usize % tch::Cuda::device_count().max(1) as usize)
            }
            d => d,
        };
        let backend = match (cfg.backend.as_str(), device) {
            ("gloo", _) => Backend::Gloo,
            ("nccl", Device::Cuda(_)) => Backend::Nccl,
            ("nccl", _) => {
                return Err(Error::invalid(
                    "training config: distributed: backend \"nccl\" needs a CUDA device (this \
                     rank trains on the CPU): use \"gloo\"",
                ));
            }
            (_, Device::Cuda(_)) if super::has_nccl() => Backend::Nccl,
            _ => Backend::Gloo,
        };
        let index = match device {
            Device::Cuda(i) => i as i32,
            _ => -1,
        };
        let wait_limit = Duration::from_secs_f64(cfg.wait_s);
        let group = Group::join(&launch, backend, index, wait_limit)?;
        super::group::set_step_limit(Duration::from_secs_f64(cfg.timeout_s));
        let small = if backend == Backend::Nccl {
            device
        } else {
            Device::Cpu
        };
        Ok((
            Peers {
                group: Some(group),
                device: small,
                step_limit: Duration::from_secs_f64(cfg.timeout_s),
                wait_limit,
            },
            device,
        ))
    }

    pub fn rank(&self) -> u32 {
        self.group.as_ref().map_or(0, |g| g.rank)
    }

    pub fn world(&self) -> u32 {
        self.group.as_ref().map_or(1, |g| g.world)
    }

    /// Rank 0: the one that writes files and speaks for the job.
    pub fn lead(&self) -> bool {
        self.rank() == 0
    }

    /// "(rank r of W)" for a distributed job, "" for one process: for messages.
    pub fn tag(&self) -> String {
        match &self.group {
            Some(g) => format!(" (rank {} of {})", g.rank, g.world),
            None => String::new(),
        }
    }

    pub fn backend(&self) -> Option<Backend> {
        self.group.as_ref().map(|g| g.backend)
    }

    /// Averages the defined gradients of `params` across the ranks (25 MiB buckets).
    pub fn average_gradients(&self, params: &[Tensor]) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        let grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        g.all_reduce("averaging the gradients", &grads, true, self.step_limit)
    }

    /// The element-wise sum of `values` over the ranks; `waiting`: ranks may arrive far apart.
    pub fn sum(&self, what: &str, values: &[f64], waiting: bool) -> Result<Vec<f64>> {
        let Some(g) = &self.group else {
            return Ok(values.to_vec());
        };
        let t = Tensor::from_slice(values).to_device(self.device);
        g.all_reduce(what, std::slice::from_ref(&t), false, self.limit(waiting))?;
        Vec::<f64>::try_from(t.to_device(Device::Cpu))
            .map_err(|e| Error::internal(format!("{what}: {e}")))
    }

    /// The element-wise sum over the ranks of `t` (detached), within a training step's limit.
    pub fn sum_tensor(&self, what: &str, t: &Tensor) -> Result<Tensor> {
        let out = t.detach().copy();
        if let Some(g) = &self.group {
            g.all_reduce(what, std::slice::from_ref(&out), false, self.step_limit)?;
        }
        Ok(out)
    }

    /// Overwrites `ts` (any device) with rank 0's values.
    pub fn broadcast(&self, what: &str, ts: &[Tensor]) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        tch::no_grad(|| g.broadcast(what, ts, self.wait_limit))
    }

    /// Fails on every rank, naming the ranks that differ, unless `digest` (of `what`) is rank 0's.
    pub fn agree(&self, what: &str, digest: &[u8; 32]) -> Result<()> {
        if self.group.is_none() {
            return Ok(());
        }
        let words: Vec<i64> = digest
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let theirs = Tensor::from_slice(&words).to_device(self.device);
        self.broadcast(
            &format!("comparing the {what}"),
            std::slice::from_ref(&theirs),
        )?;
        let same = Vec::<i64>::try_from(theirs.to_device(Device::Cpu)).ok() == Some(words);
        let differ = self.flagged(&format!("comparing the {what}"), !same)?;
        if differ.is_empty() {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "distributed training{}: rank(s) {differ:?} started with another {what} than rank \
             0's; every rank must be given the same",
            self.tag(),
        )))
    }

    /// The ranks whose `flag` is set (every rank learns them all).
    pub fn flagged(&self, what: &str, flag: bool) -> Result<Vec<u32>> {
        let Some(g) = &self.group else {
            return Ok(if flag { vec![0] } else { Vec::new() });
        };
        let mut flags = vec![0.0; g.world as usize];
        flags[g.rank as usize] = if flag { 1.0 } else { 0.0 };
        let flags = self.sum(what, &flags, false)?;
        Ok((0..g.world).filter(|&r| flags[r as usize] > 0.0).collect())
    }

    /// Rank 0's `text` on every rank (the others' argument is ignored).
    pub fn broadcast_text(&self, what: &str, text: &str) -> Result<String> {
        if self.group.is_none() {
            return Ok(text.to_string());
        }
        let len = Tensor::from_slice(&[text.len() as i64]).to_device(self.device);
        self.broadcast(what, std::slice::from_ref(&len))?;
        let n = len.int64_value(&[0]).max(0) as usize;
        let mut bytes = text.as_bytes().to_vec();
        bytes.resize(n, 0);
        if n == 0 {
            return Ok(String::new());
        }
        let t = Tensor::from_slice(&bytes).to_device(self.device);
        self.broadcast(what, std::slice::from_ref(&t))?;
        let bytes = Vec::<u8>::try_from(t.to_device(Device::Cpu))
            .map_err(|e| Error::internal(format!("{what}: {e}")))?;
        String::from_utf8(bytes).map_err(|e| Error::internal(format!("{what}: {e}")))
    }

    /// Waits for every rank (rank 0 writing a checkpoint, the end of the run).
    pub fn barrier(&self, what: &str) -> Result<()> {
        match &self.group {
            Some(g) => g.barrier(what, self.wait_limit),
            None => Ok(()),
        }
    }

    fn limit(&self, waiting: bool) -> Duration {
        if waiting {
            self.wait_limit
        } else {
            self.step_limit
        }
    }
}
