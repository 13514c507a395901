//! Data-parallel training over libtorch's c10d (Gloo on 127.0.0.1): 2 ranks with `batch_size` b
//! end where 1 process with 2b does, for UNETR and UNETR++, both stages; the control without
//! gradient averaging does not. A rank that dies, hangs or cancels stops the other with a message;
//! the last checkpoint resumes to the uninterrupted run's weights; ranks that disagree are refused.
//!
//! Each rank is this test executable run again (the `rank` test, told its part in `LWI_DIST_CHILD`).

use lwi::bundle::{Model, Stage};
use lwi::train::{Local, TrainConfig, train, train_with};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

const CHILD: &str = "LWI_DIST_CHILD";

/// One rank's part.
#[derive(Serialize, Deserialize, Default, Clone)]
struct Part {
    init: bool,
    config: Value,
    /// Gradients left unaveraged (the control).
    no_sync: bool,
    /// This rank kills itself (SIGKILL), stops itself (SIGSTOP) or cancels at its Nth train event.
    die_at: Option<u64>,
    stop_at: Option<u64>,
    cancel_at: Option<u64>,
    /// Started as this rank instead of its place in the launch.
    rank: Option<usize>,
}

/// The child side: a no-op unless started by [`launch`].
#[test]
fn rank() {
    let Ok(part) = std::env::var(CHILD) else {
        return;
    };
    let part: Part = serde_json::from_str(&part).unwrap();
    let cfg = TrainConfig::from_json(&part.config.to_string()).unwrap();
    let stage = if part.init {
        Stage::Init
    } else {
        Stage::Segmentation
    };
    let mut steps = 0u64;
    let mut progress = |e: &lwi::events::Event| {
        if e.stage == "train" {
            steps += 1;
            let me = unsafe { libc::getpid() };
            if part.die_at == Some(steps) {
                unsafe { libc::kill(me, libc::SIGKILL) };
            }
            if part.stop_at == Some(steps) {
                unsafe { libc::kill(me, libc::SIGSTOP) };
            }
            return part.cancel_at != Some(steps);
        }
        true
    };
    let result = if part.no_sync {
        train_with(stage, &cfg, Device::Cpu, &mut progress, Some(&mut Local))
    } else {
        train(stage, &cfg, Device::Cpu, &mut progress)
    };
    if let Err(e) = result {
        eprintln!("LWI_ERROR {:?}: {}", e.kind, e.message);
        std::process::exit(3);
    }
}

/// The ranks' exits: (status code, stderr, seconds after the launch).
struct Exit {
    code: Option<i32>,
    stderr: String,
    after: f64,
}

/// Runs `parts.len()` ranks of one job (`world` ranks expected), rank r in `dirs[r]`; a rank
/// that stopped itself is killed once the others have exited.
fn launch(parts: &[Part], world: usize, dirs: &[&Path], limit: Duration) -> Vec<Exit> {
    launch_on(free_port(), parts, world, dirs, limit)
}

fn launch_on(
    port: u16,
    parts: &[Part],
    world: usize,
    dirs: &[&Path],
    limit: Duration,
) -> Vec<Exit> {
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let mut children: Vec<Child> = parts
        .iter()
        .enumerate()
        .map(|(r, part)| {
            Command::new(&exe)
                .args(["rank", "--exact", "--nocapture", "--test-threads=1"])
                .current_dir(dirs[r])
                .env(CHILD, serde_json::to_string(part).unwrap())
                .env("RANK", part.rank.unwrap_or(r).to_string())
                .env("LOCAL_RANK", part.rank.unwrap_or(r).to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("GLOO_SOCKET_IFNAME", "lo")
                .env("OMP_NUM_THREADS", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut exits: Vec<Option<Exit>> = (0..children.len()).map(|_| None).collect();
    while exits.iter().any(Option::is_none) {
        for (r, c) in children.iter_mut().enumerate() {
            if exits[r].is_none()
                && let Some(status) = c.try_wait().unwrap()
            {
                let mut stderr = String::new();
                std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut stderr).unwrap();
                exits[r] = Some(Exit {
                    code: status.code(),
                    stderr,
                    after: start.elapsed().as_secs_f64(),
                });
            }
        }
        let others_done =
            (0..parts.len()).all(|r| exits[r].is_some() || parts[r].stop_at.is_some());
        if others_done {
            for (r, c) in children.iter_mut().enumerate() {
                if exits[r].is_none() {
                    let _ = c.kill();
                }
            }
        }
        if start.elapsed() > limit {
            for c in &mut children {
                let _ = c.kill();
            }
            let done: Vec<_> = exits
                .iter()
                .map(|e| e.as_ref().map(|e| e.stderr.clone()))
                .collect();
            panic!("the ranks ran past {limit:?}; those that ended: {done:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    exits.into_iter().map(Option::unwrap).collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn succeeded(exits: &[Exit]) {
    for (r, e) in exits.iter().enumerate() {
        assert_eq!(e.code, Some(0), "rank {r} failed:\n{}", e.stderr);
    }
}

/// 12 phantoms: 9 training cases (an odd number: the last step is padded), 3 validation.
fn phantoms(dir: &Path) -> PathBuf {
    let opts = lwi::phantom::PhantomOptions {
        cases: 12,
        size: [48, 48, 32],
        spacing: Some([6.0, 6.0, 8.0]),
        ..Default::default()
    };
    lwi::phantom::write_dataset(&dir.join("data"), &opts).unwrap()
}

/// SGD: AdamW divides each gradient by its own running magnitude, which turns rounding-level
/// differences (a batch of 2 sums in another order than two of 1) into lr-sized ones wherever a
/// gradient is near zero; SGD keeps them at rounding level, so weights can be compared.
fn unetr(dataset: &Path) -> Value {
    json!({
        "optimizer": "sgd", "momentum": 0.9,
        "dataset": dataset, "out": "model.safetensors", "epochs": 2, "seed": 5, "threads": 1,
        "arch": {"img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
        "spacing": [8.0, 8.0, 8.0], "num_samples": 2, "lr": 1e-2, "warmup_epochs": 0, "val_every": 1,
        "distributed": {"timeout_s": 30, "wait_s": 120},
    })
}

fn unetr_pp(dataset: &Path) -> Value {
    json!({
        "dataset": dataset, "out": "model.safetensors", "epochs": 2, "seed": 5, "threads": 1,
        "arch": {"arch": "unetr_pp", "img_size": [32, 32, 32], "feature_size": 2, "hidden_size": 32,
                 "num_heads": 2, "dims": [4, 8, 16, 32], "depths": [1, 1, 1, 1], "proj_size": [16, 16, 16, 8]},
        "iterations_per_epoch": 2, "val_every": 1, "dropout": false, "pretext": {"slabs": 2},
        "distributed": {"timeout_s": 30, "wait_s": 120},
    })
}

fn with(mut v: Value, changes: Value) -> Value {
    for (k, x) in changes.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// One process in `dir` (the reference run).
fn alone(init: bool, config: &Value, dir: &Path) -> Model {
    let mut config = config.clone();
    config["out"] = json!(dir.join("model.safetensors"));
    config["cache_dir"] = json!(dir.join("lwi-cache"));
    let cfg = TrainConfig::from_json(&config.to_string()).unwrap();
    let stage = if init {
        Stage::Init
    } else {
        Stage::Segmentation
    };
    train(stage, &cfg, Device::Cpu, &mut lwi::events::Silent).unwrap()
}

fn model(path: &Path) -> Model {
    Model::load(path, Device::Cpu).unwrap()
}

fn weights(m: &Model) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = m.vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn max_diff(a: &Model, b: &Model) -> f64 {
    weights(a)
        .iter()
        .zip(weights(b))
        .map(|((n, x), (m, y))| {
            assert_eq!(n, &m);
            (x - y).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

fn metrics(m: &Model) -> Vec<Option<f64>> {
    let h = &m.meta.provenance.history;
    h.fine_tune
        .iter()
        .chain(&h.init)
        .map(|r| r.metric)
        .collect()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// 2 ranks × batch 1 against 1 process × batch 2; returns max |Δw| and the 2-rank model.
fn two_ranks_against_one(init: bool, config: &Value, tmp: &Path, name: &str) -> (f64, Model) {
    let (one, r0, r1) = (
        tmp.join(format!("{name}-one")),
        tmp.join(format!("{name}-r0")),
        tmp.join(format!("{name}-r1")),
    );
    for d in [&one, &r0, &r1] {
        std::fs::create_dir_all(d).unwrap();
    }
    let reference = alone(init, &with(config.clone(), json!({"batch_size": 2})), &one);
    let part = Part {
        init,
        config: with(config.clone(), json!({"batch_size": 1})),
        ..Default::default()
    };
    let exits = launch(
        &[part.clone(), part],
        2,
        &[&r0, &r1],
        Duration::from_secs(600),
    );
    succeeded(&exits);
    let two = model(&r0.join("model.safetensors"));
    let (a, b) = (metrics(&two), metrics(&reference));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        let close = match (x, y) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-5,
            _ => x == y,
        };
        assert!(
            close,
            "{name}: validation metrics {a:?}, one process's {b:?}"
        );
    }
    (max_diff(&two, &reference), two)
}

#[test]
fn two_ranks_train_what_one_process_trains_with_twice_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = phantoms(tmp.path());
    let base = unetr(&dataset);
    let (d, two) = two_ranks_against_one(false, &base, tmp.path(), "unetr");
    eprintln!("UNETR fine-tune, 2 ranks vs 1 process: max |Δw| = {d:.3e}");
    assert!(d <= 1e-5, "UNETR fine-tune: max |Δw| = {d:e}");
    assert!(
        metrics(&two).iter().all(Option::is_some),
        "validated every epoch"
    );
    // rank 0 alone wrote files; rank 1 wrote nothing (the unetr recipe keeps no cache)
    let r0 = files(&tmp.path().join("unetr-r0"));
    assert_eq!(
        r0,
        [
            "model.best.safetensors",
            "model.safetensors",
            "model.safetensors.ckpt"
        ]
    );
    assert!(files(&tmp.path().join("unetr-r1")).is_empty());

    // the control: without averaging, the ranks' weights drift apart from the reference
    let free = tmp.path().join("free");
    let free1 = tmp.path().join("free1");
    std::fs::create_dir_all(&free).unwrap();
    std::fs::create_dir_all(&free1).unwrap();
    let part = Part {
        config: with(base.clone(), json!({"batch_size": 1})),
        no_sync: true,
        ..Default::default()
    };
    succeeded(&launch(
        &[part.clone(), part],
        2,
        &[&free, &free1],
        Duration::from_secs(600),
    ));
    let unsynced = model(&free.join("model.safetensors"));
    let reference = model(&tmp.path().join("unetr-one/model.safetensors"));
    let control = max_diff(&unsynced, &reference);
    eprintln!("without gradient averaging: max |Δw| = {control:.3e}");
    assert!(
        control > 1e-4,
        "the control equals the reference: {control:e}"
    );

    let pp = unetr_pp(&dataset);
    let (d, _) = two_ranks_against_one(true, &pp, tmp.path(), "pp-init");
    eprintln!("UNETR++ init-train: max |Δw| = {d:.3e}");
    assert!(d <= 1e-5, "UNETR++ init-train: max |Δw| = {d:e}");
    let (d, _) = two_ranks_against_one(false, &pp, tmp.path(), "pp-fine");
    eprintln!("UNETR++ fine-tune (batch Dice over both ranks): max |Δw| = {d:.3e}");
    assert!(d <= 1e-5, "UNETR++ fine-tune: max |Δw| = {d:e}");
}

fn dirs(tmp: &Path, name: &str) -> [PathBuf; 2] {
    [0, 1].map(|r| {
        let d = tmp.join(format!("{name}-{r}"));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn both(part: Part) -> [Part; 2] {
    [part.clone(), part]
}

#[test]
fn a_rank_that_dies_stops_the_other_and_the_last_checkpoint_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = phantoms(tmp.path());
    let config = with(
        unetr(&dataset),
        json!({"epochs": 3, "batch_size": 1, "val_every": 2}),
    );
    let part = Part {
        config: config.clone(),
        ..Default::default()
    };
    let [a0, a1] = dirs(tmp.path(), "whole");
    succeeded(&launch(
        &both(part.clone()),
        2,
        &[&a0, &a1],
        Duration::from_secs(600),
    ));

    // rank 1 is killed at its 8th step, in epoch 2 of 3 (5 steps an epoch): after one checkpoint
    let [b0, b1] = dirs(tmp.path(), "killed");
    let dying = Part {
        die_at: Some(8),
        ..part.clone()
    };
    let exits = launch(
        &[part.clone(), dying],
        2,
        &[&b0, &b1],
        Duration::from_secs(600),
    );
    assert_eq!(exits[1].code, None, "rank 1 was killed");
    assert_eq!(exits[0].code, Some(3), "rank 0: {}", exits[0].stderr);
    let message = &exits[0].stderr;
    assert!(
        message.contains("LWI_ERROR Io") && message.contains("rank 0 of 2"),
        "{message}"
    );
    let waited = exits[0].after - exits[1].after;
    eprintln!(
        "rank 0 stopped {waited:.2} s after rank 1 died: {}",
        message.trim()
    );
    assert!(waited < 30.0, "rank 0 stopped {waited} s after rank 1 died");
    assert_eq!(
        files(&b0),
        ["model.safetensors.ckpt"],
        "the checkpoint of epoch 1 alone"
    );

    // resumed with two ranks (only rank 0 has the checkpoint), it ends where the whole run did
    let resume = Part {
        config: with(config, json!({"resume": true})),
        ..Default::default()
    };
    succeeded(&launch(
        &both(resume),
        2,
        &[&b0, &b1],
        Duration::from_secs(600),
    ));
    let (whole, resumed) = (
        model(&a0.join("model.safetensors")),
        model(&b0.join("model.safetensors")),
    );
    let d = max_diff(&whole, &resumed);
    assert_eq!(
        d, 0.0,
        "the resumed run ends {d:e} from the uninterrupted one"
    );
    assert_eq!(metrics(&whole), metrics(&resumed));
}

#[test]
fn a_rank_that_hangs_or_cancels_stops_the_other_within_the_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = phantoms(tmp.path());
    let config = with(
        unetr(&dataset),
        json!({"epochs": 1, "batch_size": 1, "val_every": 1000, "distributed": {"timeout_s": 10, "wait_s": 60}}),
    );
    let part = Part {
        config,
        ..Default::default()
    };
    // a rank alive but stuck (SIGSTOP): the other gives up after timeout_s
    let [h0, h1] = dirs(tmp.path(), "hang");
    let stuck = Part {
        stop_at: Some(2),
        ..part.clone()
    };
    let start = Instant::now();
    let exits = launch(
        &[part.clone(), stuck],
        2,
        &[&h0, &h1],
        Duration::from_secs(300),
    );
    let message = &exits[0].stderr;
    eprintln!(
        "stuck rank: rank 0 stopped after {:.1} s: {}",
        exits[0].after,
        message.trim()
    );
    assert_eq!(exits[0].code, Some(3), "{message}");
    assert!(
        message.contains("rank 0 of 2") && message.to_lowercase().contains("timed out"),
        "{message}"
    );
    assert!(start.elapsed() < Duration::from_secs(120));
    assert!(files(&h0).is_empty(), "nothing written: {:?}", files(&h0));

    // a cancel on rank 1 cancels both
    let [c0, c1] = dirs(tmp.path(), "cancel");
    let cancelling = Part {
        cancel_at: Some(2),
        ..part.clone()
    };
    let exits = launch(
        &[part, cancelling],
        2,
        &[&c0, &c1],
        Duration::from_secs(300),
    );
    for (r, e) in exits.iter().enumerate() {
        assert_eq!(e.code, Some(3), "rank {r}: {}", e.stderr);
        assert!(
            e.stderr.contains("LWI_ERROR Cancelled") && e.stderr.contains("rank(s) [1]"),
            "rank {r}: {}",
            e.stderr
        );
    }
}

#[test]
fn ranks_that_disagree_or_do_not_arrive_are_refused_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = phantoms(tmp.path());
    let config = with(
        unetr(&dataset),
        json!({"epochs": 1, "batch_size": 1, "val_every": 1000, "distributed": {"timeout_s": 10, "wait_s": 10}}),
    );
    let part = Part {
        config: config.clone(),
        ..Default::default()
    };
    let [d0, d1] = dirs(tmp.path(), "differ");
    let other = Part {
        config: with(config, json!({"lr": 0.5})),
        ..Default::default()
    };
    for e in launch(
        &[part.clone(), other],
        2,
        &[&d0, &d1],
        Duration::from_secs(120),
    ) {
        assert_eq!(e.code, Some(3), "{}", e.stderr);
        assert!(
            e.stderr
                .contains("rank(s) [1] started with another training config"),
            "{}",
            e.stderr
        );
    }

    // a world of 3 of which 2 arrive: both give up after wait_s, naming the join
    let [w0, w1] = dirs(tmp.path(), "missing");
    for e in launch(
        &both(part.clone()),
        3,
        &[&w0, &w1],
        Duration::from_secs(120),
    ) {
        assert_eq!(e.code, Some(3), "{}", e.stderr);
        assert!(
            e.stderr.contains("joining the job at 127.0.0.1:"),
            "{}",
            e.stderr
        );
        assert!(e.after < 60.0, "gave up after {} s", e.after);
        assert!(
            !e.stderr.contains("Exception raised from"),
            "c10d's stack traces: {}",
            e.stderr
        );
    }

    // rank 1 alone: nobody hosts the store; it gives up after wait_s with lwi's message only, not
    // the store client's logged retries and their C++ stack traces
    let [lone, _] = dirs(tmp.path(), "lone");
    let alone = Part {
        rank: Some(1),
        ..part.clone()
    };
    let e = &launch(&[alone], 2, &[&lone], Duration::from_secs(120))[0];
    assert_eq!(e.code, Some(3), "{}", e.stderr);
    assert!(
        e.stderr.contains("joining the job at 127.0.0.1:"),
        "{}",
        e.stderr
    );
    assert!(
        !e.stderr.contains("Exception raised from"),
        "c10d's stack traces: {}",
        e.stderr
    );

    // the port taken by something else: rank 0 cannot host the store
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let [p0, p1] = dirs(tmp.path(), "port");
    let exits = launch_on(port, &both(part), 2, &[&p0, &p1], Duration::from_secs(120));
    let message = &exits[0].stderr;
    assert_eq!(exits[0].code, Some(3), "{message}");
    assert!(
        message.contains(&format!("127.0.0.1:{port}")) && message.contains("EADDRINUSE"),
        "{message}"
    );
    assert_eq!(exits[1].code, Some(3), "{}", exits[1].stderr);
    for e in &exits {
        assert!(
            !e.stderr.contains("Exception raised from"),
            "c10d's stack traces: {}",
            e.stderr
        );
    }
}
