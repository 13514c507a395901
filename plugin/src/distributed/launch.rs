//! Who this process is in a data-parallel job: read from the launcher's environment (torchrun's
//! `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT`, or an `srun` step's
//! `SLURM_PROCID`/`SLURM_STEP_NUM_TASKS`/`SLURM_LOCALID` with the address derived from the node
//! list), or from the training config's `"distributed"` section when a host launches the ranks
//! itself.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The training config's `"distributed"` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// false: one process whatever the environment says.
    pub enabled: bool,
    /// "auto" (NCCL when training on CUDA and built with it, else Gloo), "gloo" or "nccl".
    pub backend: String,
    /// A host that starts the ranks itself: this rank and the world size (both or neither; they
    /// take precedence over the environment), and where rank 0's store listens.
    pub rank: Option<u32>,
    pub world_size: Option<u32>,
    pub local_rank: Option<u32>,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    /// Seconds a rank waits in a training step's collective for the others (a rank that died or
    /// hangs ends the job after this long).
    pub timeout_s: f64,
    /// Seconds a rank waits where ranks legitimately run apart: joining, preprocessing,
    /// validation, rank 0 writing a checkpoint.
    pub wait_s: f64,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            enabled: true,
            backend: "auto".into(),
            rank: None,
            world_size: None,
            local_rank: None,
            master_addr: None,
            master_port: None,
            timeout_s: 60.0,
            wait_s: 1800.0,
        }
    }
}

impl DistributedConfig {
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("training config: distributed: {m}")));
        if !matches!(self.backend.as_str(), "auto" | "gloo" | "nccl") {
            return bad(format!(
                "backend must be \"auto\", \"gloo\" or \"nccl\", got {:?}",
                self.backend
            ));
        }
        for (name, v) in [("timeout_s", self.timeout_s), ("wait_s", self.wait_s)] {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                return bad(format!("{name} must be in (0, 86400] seconds, got {v}"));
            }
        }
        match (self.rank, self.world_size) {
            (Some(r), Some(w)) if r >= w => bad(format!("rank {r} is not below world_size {w}")),
            (Some(_), None) | (None, Some(_)) => {
                bad("rank and world_size come together".to_string())
            }
            _ => Ok(()),
        }
    }
}

/// Which launcher described the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Config,
    Torchrun,
    Slurm,
}

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    pub rank: u32,
    pub world: u32,
    pub local_rank: u32,
    pub addr: String,
    pub port: u16,
    /// Rank 0 hosts the store unless torchrun's agent already does.
    pub store_server: bool,
}

impl Launch {
    /// The job described by `cfg`, else by the environment `env` (a variable's value by name);
    /// None for a single process (no launcher, a launcher's world of one, or `enabled` false).
    pub fn detect(
        cfg: &DistributedConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Launch>> {
        if !cfg.enabled {
            return Ok(None);
        }
        let number = |name: &str| -> Result<Option<u32>> {
            env(name)
                .map(|v| {
                    v.trim().parse::<u32>().map_err(|_| {
                        Error::invalid(format!("distributed: {name}={v:?} is not a number"))
                    })
                })
                .transpose()
        };
        let (launcher, rank, world, local) = if let (Some(r), Some(w)) = (cfg.rank, cfg.world_size)
        {
            (Launcher::Config, r, w, cfg.local_rank.unwrap_or(r))
        } else if let (Some(w), Some(r)) = (number("WORLD_SIZE")?, number("RANK")?) {
            (Launcher::Torchrun, r, w, number("LOCAL_RANK")?.unwrap_or(r))
        } else if let (Some(w), Some(r)) =
            (number("SLURM_STEP_NUM_TASKS")?, number("SLURM_PROCID")?)
        {
            (Launcher::Slurm, r, w, number("SLURM_LOCALID")?.unwrap_or(0))
        } else {
            return Ok(None);
        };
        // a launcher's world of one is one process; a host may still ask for a group of one
        if world == 0 || (world == 1 && launcher != Launcher::Config) {
            return Ok(None);
        }
        if rank >= world {
            return Err(Error::invalid(format!(
                "distributed: rank {rank} is not below the world size {world}"
            )));
        }
        let addr = match cfg.master_addr.clone().or_else(|| env("MASTER_ADDR")) {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            _ => slurm_master(env)?.ok_or_else(|| {
                Error::invalid(
                    "distributed: MASTER_ADDR is not set (the address of rank 0's host; \
                     torchrun sets it, under srun it comes from SLURM_JOB_NODELIST)",
                )
            })?,
        };
        let port = match (cfg.master_port, env("MASTER_PORT")) {
            (Some(p), _) => p,
            (None, Some(p)) => {
                p.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "distributed: MASTER_PORT={p:?} is not a port number"
                        ))
                    })?
            }
            // Lightning's rule: 15000 + the job id's last four digits.
            (None, None) => match env("SLURM_JOB_ID").and_then(|j| j.trim().parse::<u64>().ok()) {
                Some(job) => 15000 + (job % 10000) as u16,
                None => {
                    return Err(Error::invalid(
                        "distributed: MASTER_PORT is not set (the port of rank 0's store)",
                    ));
                }
            },
        };
        let agent_store = env("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
        Ok(Some(Launch {
            launcher,
            rank,
            world,
            local_rank: local,
            addr,
            port,
            store_server: rank == 0 && !(launcher == Launcher::Torchrun && agent_store),
        }))
    }
}

/// The first host of an srun step's node list, if there is one.
fn slurm_master(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>> {
    for name in [
        "SLURM_STEP_NODELIST",
        "SLURM_JOB_NODELIST",
        "SLURM_NODELIST",
    ] {
        if let Some(list) = env(name) {
            return first_host(&list).map(Some).ok_or_else(|| {
                Error::invalid(format!(
                    "distributed: {name}={list:?} is not a Slurm node list"
                ))
            });
        }
    }
    Ok(None)
}

/// The first host of a Slurm node list (`gpu[03-05,07],cpu1` → `gpu03`; every bracket group
/// contributes its first value, zero padding as written); None when malformed.
pub fn first_host(list: &str) -> Option<String> {
    let first = top_level_items(list)?.into_iter().next()?;
    let mut host = String::new();
    let mut rest = first;
    while let Some(open) = rest.find('[') {
        host.push_str(&rest[..open]);
        let close = open + rest[open..].find(']')?;
        let ranges = &rest[open + 1..close];
        for range in ranges.split(',') {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if !digits(lo) || !digits(hi) || lo.parse::<u64>().ok()? > hi.parse::<u64>().ok()? {
                return None;
            }
        }
        host.push_str(ranges.split([',', '-']).next()?);
        rest = &rest[close + 1..];
    }
    host.push_str(rest);
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    (!host.is_empty() && host.chars().all(valid)).then_some(host)
}

/// The comma-separated hosts of a node list, commas inside brackets kept; None if the brackets do
/// not balance.
fn top_level_items(list: &str) -> Option<Vec<&str>> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return None;
        }
    }
    items.push(list[start..].trim());
    (depth == 0 && items.iter().all(|s| !s.is_empty())).then_some(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::detect(&DistributedConfig::default(), &|k| map.get(k).cloned())
    }

    #[test]
    fn node_lists_give_their_first_host() {
        assert_eq!(first_host("gpu[03-05,07]").as_deref(), Some("gpu03"));
        assert_eq!(first_host("gpu[03-05,07],cpu1").as_deref(), Some("gpu03"));
        assert_eq!(first_host("node7").as_deref(), Some("node7"));
        assert_eq!(first_host("a1,b2").as_deref(), Some("a1"));
        assert_eq!(
            first_host("rack[2-3]-n[010-012]").as_deref(),
            Some("rack2-n010")
        );
        assert_eq!(
            first_host("host.example.org").as_deref(),
            Some("host.example.org")
        );
        for bad in [
            "", "gpu[03-", "gpu03]", "gpu[a-b]", "gpu[5-3]", "gpu[]", ",x", "gpu[[1]]", "a b",
        ] {
            assert_eq!(first_host(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn torchrun_slurm_and_nothing() {
        assert_eq!(launch(&[]).unwrap(), None);
        assert_eq!(launch(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let t = [
            ("WORLD_SIZE", "4"),
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let own = launch(&t).unwrap().unwrap();
        assert_eq!(
            (own.launcher, own.rank, own.world, own.store_server),
            (Launcher::Torchrun, 0, 4, true)
        );
        // under torchrun's agent the store already exists: rank 0 is a client
        let agent = [&t[..], &[("TORCHELASTIC_USE_AGENT_STORE", "True")]].concat();
        assert!(!launch(&agent).unwrap().unwrap().store_server);
        let slurm = [
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[03-05,07]"),
            ("SLURM_JOB_ID", "123456"),
        ];
        let s = launch(&slurm).unwrap().unwrap();
        assert_eq!(
            (
                s.launcher,
                s.rank,
                s.world,
                s.local_rank,
                s.addr.as_str(),
                s.port,
                s.store_server
            ),
            (Launcher::Slurm, 5, 8, 1, "gpu03", 18456, false)
        );
        // a batch script (no srun step) is one process
        assert_eq!(
            launch(&[("SLURM_NTASKS", "8"), ("SLURM_PROCID", "0")]).unwrap(),
            None
        );
    }

    #[test]
    fn bad_environments_are_named() {
        let e = |vars: &[(&str, &str)]| launch(vars).unwrap_err().message;
        assert!(
            e(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")]).contains("MASTER_ADDR")
        );
        assert!(
            e(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h")]).contains("MASTER_PORT")
        );
        assert!(e(&[("WORLD_SIZE", "two"), ("RANK", "0")]).contains("WORLD_SIZE=\"two\""));
        assert!(
            e(&[
                ("WORLD_SIZE", "2"),
                ("RANK", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1")
            ])
            .contains("rank 2")
        );
        let m = e(&[
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_JOB_NODELIST", "gpu[1-"),
        ]);
        assert!(
            m.contains("SLURM_JOB_NODELIST") && m.contains("gpu[1-"),
            "{m}"
        );
        assert!(
            e(&[
                ("WORLD_SIZE", "2"),
                ("RANK", "0"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "99999")
            ])
            .contains("99999")
        );
    }
}
