//! Data-parallel training on libtorch's own c10d: who this process is in the job ([`launch`]:
//! torchrun, an srun step, or the training config), the process group over Gloo or NCCL
//! ([`group`], csrc/dist.cpp), and what training asks of the other ranks ([`peers`]).

pub mod group;
pub mod launch;
pub mod peers;

pub use group::{Backend, has_nccl};
pub use launch::{DistributedConfig, Launch, Launcher, first_host};
pub use peers::Peers;
