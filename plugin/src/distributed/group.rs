//! The process group: a safe handle over csrc/dist.cpp ([`crate::shim::dist`]: libtorch's
//! TCPStore + ProcessGroupGloo or ProcessGroupNCCL). One per process at a time; dropping it ends it.

use super::launch::Launch;
use crate::error::{Error, ErrorKind, Result};
use crate::shim::dist as shim;
use std::ffi::CString;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering::Relaxed};
use std::time::Duration;
use tch::Tensor;

/// A training step's collective limit, for the collectives inside the model (set on joining),
/// and this process's rank and world size while it is in a job (for messages).
static STEP_LIMIT_MS: AtomicI64 = AtomicI64::new(60_000);
static JOB: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(1)];

/// Training batch norm over the batches of every rank of this process's job (PyTorch's
/// `SyncBatchNorm`, as MONAI's recipe converts batch norm to under DDP): None when the process
/// is in no job of more than one rank (plain batch norm applies), else the normalised `x`.
pub fn sync_batch_norm(
    x: &Tensor,
    params: [&Tensor; 4],
    momentum: f64,
    eps: f64,
) -> Option<Result<Tensor>> {
    if !shim::active() {
        return None;
    }
    let timeout = STEP_LIMIT_MS.load(Relaxed);
    let (rank, world) = (JOB[0].load(Relaxed), JOB[1].load(Relaxed));
    let mut out = None;
    let r = call("synchronising batch norm", rank, world, |err| {
        out = shim::sync_batch_norm(x, params, momentum, eps, timeout, err);
        i32::from(out.is_none())
    });
    Some(r.and_then(|()| out.ok_or_else(|| Error::internal("batch norm: no result"))))
}

/// Sets the limit of the collectives inside the model.
pub fn set_step_limit(limit: Duration) {
    STEP_LIMIT_MS.store(millis(limit), Relaxed);
}

/// Whether NCCL is usable here: built in (libtorch with CUDA and its headers at build time) and
/// the libtorch loaded now has CUDA (a CPU-only libtorch leaves NCCL's references unbound).
pub fn has_nccl() -> bool {
    shim::nccl_usable()
}

/// DDP's default bucket: gradients travel in all-reduces of at most 25 MiB.
pub const BUCKET_BYTES: i64 = 25 << 20;

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// A joined process group.
pub struct Group {
    pub rank: u32,
    pub world: u32,
    pub backend: Backend,
}

fn call(what: &str, rank: u32, world: u32, f: impl FnOnce(&mut [u8]) -> i32) -> Result<()> {
    let mut buf = vec![0u8; 2048];
    if f(&mut buf) == 0 {
        return Ok(());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let msg = String::from_utf8_lossy(&buf[..end]);
    let lower = msg.to_lowercase();
    let hint = if lower.contains("timed out") || lower.contains("timeout") {
        " (another rank did not answer within the limit: \"distributed\": timeout_s, wait_s)"
    } else if ["closed by peer", "connection reset", "broken pipe"]
        .iter()
        .any(|s| lower.contains(s))
    {
        " (another rank has ended: its own output says why)"
    } else {
        ""
    };
    Err(Error::new(
        ErrorKind::Io,
        format!(
            "distributed training, rank {rank} of {world}: {what} failed: {}{hint}",
            msg.trim()
        ),
    ))
}

fn millis(d: Duration) -> i64 {
    d.as_millis().clamp(1, i64::MAX as u128) as i64
}

impl Group {
    /// Joins the job `launch` describes; waits up to `timeout` for every rank to arrive.
    pub fn join(
        launch: &Launch,
        backend: Backend,
        device_index: i32,
        timeout: Duration,
    ) -> Result<Group> {
        let (rank, world) = (launch.rank, launch.world);
        if backend == Backend::Nccl && !has_nccl() {
            return Err(Error::unsupported(
                "distributed training: NCCL is not available (this build's libtorch lacked CUDA or \
                 the CUDA headers, or the libtorch loaded now has no CUDA): use \"backend\": \"gloo\"",
            ));
        }
        let nul = |s: &str| {
            CString::new(s).map_err(|_| Error::invalid(format!("distributed: {s:?} holds a NUL")))
        };
        let (name, addr) = (nul(backend.name())?, nul(&launch.addr)?);
        let what = format!(
            "joining the job at {}:{} over {}{}",
            launch.addr,
            launch.port,
            backend.name(),
            if launch.store_server {
                " (hosting its store)"
            } else {
                ""
            }
        );
        let member = shim::Member {
            port: i32::from(launch.port),
            rank: rank as i32,
            world: world as i32,
            store_server: launch.store_server,
            device_index,
        };
        let ms = millis(timeout);
        // The store client can wait past its timeout on a port where something that is not a
        // store accepted the connection: joining runs on its own thread, watched here.
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = call(&what, rank, world, |err| {
                shim::init(&name, &addr, member, ms, err)
            });
            let _ = done.send(r);
        });
        match outcome.recv_timeout(timeout + Duration::from_secs(5)) {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "distributed training, rank {rank} of {world}: joining the job at {}:{} did \
                         not finish within {} s (are all ranks started, and is it rank 0's store \
                         that listens there?)",
                        launch.addr,
                        launch.port,
                        timeout.as_secs()
                    ),
                ));
            }
        }
        JOB[0].store(rank, Relaxed);
        JOB[1].store(world, Relaxed);
        let group = Group {
            rank,
            world,
            backend,
        };
        if backend == Backend::Nccl {
            // joined on the watcher thread: this thread's current device is set here
            call("selecting the GPU", rank, world, |err| {
                shim::use_device(device_index, err)
            })?;
        }
        Ok(group)
    }

    /// Sums `ts` in place across the ranks (then divides by the world size when `average`).
    pub fn all_reduce(
        &self,
        what: &str,
        ts: &[Tensor],
        average: bool,
        timeout: Duration,
    ) -> Result<()> {
        call(what, self.rank, self.world, |err| {
            shim::all_reduce(ts, BUCKET_BYTES, average, millis(timeout), err)
        })
    }

    /// Overwrites `ts` with rank 0's.
    pub fn broadcast(&self, what: &str, ts: &[Tensor], timeout: Duration) -> Result<()> {
        call(what, self.rank, self.world, |err| {
            shim::broadcast(ts, 0, BUCKET_BYTES, millis(timeout), err)
        })
    }

    pub fn barrier(&self, what: &str, timeout: Duration) -> Result<()> {
        call(what, self.rank, self.world, |err| {
            shim::barrier(millis(timeout), err)
        })
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        shim::destroy()
    }
}
