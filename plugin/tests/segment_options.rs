//! Every segment option means something on a UNETR++ model (nnU-Net's pipeline) or is refused by
//! name: the overlap changes the windows, a window batch gives the same labels in fewer forward
//! passes, the largest component is kept, mirroring has one switch (`mirror`, alias `tta_axes`),
//! and what the pipeline cannot honour is INVALID_ARGUMENT naming the option and the pipeline.
//! The model is `tests/data/unetr_pp-v2.safetensors` (a tiny fine-tuned UNETR++, 12 classes).

mod common;

use lwi::events::{Event, Progress};
use lwi::model_file::Model;
use lwi::pipeline::{SegmentOptions, segment};
use lwi::{DType, ErrorKind, Volume};
use tch::{Device, Kind, Tensor};

/// The events of a call: how many windows each "infer" event says were done, of how many.
#[derive(Default)]
struct Windows(Vec<(u64, u64)>);

impl Progress for Windows {
    fn report(&mut self, e: &Event) -> bool {
        if e.stage == "infer" && e.total > 0 {
            self.0.push((e.done, e.total));
        }
        true
    }
}

fn model() -> Model {
    let path = common::root().join("tests/data/unetr_pp-v2.safetensors");
    Model::load(&path, Device::Cpu).unwrap()
}

/// An 80 × 40 × 24 volume at the model's 8 mm: more than one patch (32, 32, 16 along x, y, z)
/// along every axis, non-zero everywhere (nnU-Net crops to the non-zero box).
fn volume() -> Volume {
    let mut affine = [[0.0; 4]; 4];
    (0..3).for_each(|d| affine[d][d] = 8.0);
    affine[3][3] = 1.0;
    tch::manual_seed(7);
    let data = (Tensor::rand([80, 40, 24], (Kind::Float, Device::Cpu)) * 250.0) + 1.0;
    Volume::new(data, affine, DType::F32).unwrap()
}

fn run(model: &Model, volume: &Volume, json: &str) -> (Tensor, Vec<(u64, u64)>) {
    let opts = SegmentOptions::from_json(json).unwrap();
    let mut windows = Windows::default();
    let labels = segment(model, volume, &opts, &mut windows).unwrap();
    (labels.data, windows.0)
}

fn equal(a: &Tensor, b: &Tensor) -> bool {
    a.to_kind(Kind::Int64).equal(&b.to_kind(Kind::Int64))
}

#[test]
fn the_overlap_sets_nnunets_step() {
    let (model, volume) = (model(), volume());
    // step 0.5: x 80 → 4 windows, y 40 → 2, z 24 → 2; step 1 (overlap 0): x → 3
    let (_, half) = run(&model, &volume, r#"{"mirror": false}"#);
    assert_eq!(half.last(), Some(&(16, 16)));
    let (_, none) = run(&model, &volume, r#"{"mirror": false, "overlap": 0.0}"#);
    assert_eq!(none.last(), Some(&(12, 12)));
}

#[test]
fn a_window_batch_gives_the_same_labels_in_fewer_passes() {
    let (model, volume) = (model(), volume());
    let (one, by_one) = run(&model, &volume, r#"{"mirror": false}"#);
    let (three, by_three) = run(&model, &volume, r#"{"mirror": false, "sw_batch": 3}"#);
    assert_eq!(by_one.len(), 16);
    assert_eq!(by_three.len(), 6, "{by_three:?}");
    assert_eq!(by_three.last(), Some(&(16, 16)));
    assert!(equal(&one, &three), "a window batch changed the labels");
}

#[test]
fn the_largest_component_of_each_label_is_kept() {
    let (model, volume) = (model(), volume());
    let (all, _) = run(&model, &volume, r#"{"mirror": false}"#);
    let (largest, _) = run(
        &model,
        &volume,
        r#"{"mirror": false, "largest_component": true}"#,
    );
    let expected = lwi::pipeline::postprocess::largest_components(&all, volume.dims()).unwrap();
    assert!(
        !equal(&all, &expected),
        "the labels had one component each: no test"
    );
    assert!(equal(&largest, &expected));
}

#[test]
fn mirroring_has_one_switch_with_the_old_key_as_its_alias() {
    let (model, volume) = (model(), volume());
    let (off, off_windows) = run(&model, &volume, r#"{"mirror": false}"#);
    let (no_axes, _) = run(&model, &volume, r#"{"tta_axes": []}"#);
    assert!(equal(&off, &no_axes));
    // nnU-Net's default: the 8 mirrorings, as the three axes or `true` name them
    let (default, windows) = run(&model, &volume, "");
    let (all, _) = run(&model, &volume, r#"{"mirror": [0, 1, 2]}"#);
    let (on, _) = run(&model, &volume, r#"{"mirror": true}"#);
    assert!(equal(&default, &all) && equal(&default, &on));
    assert_eq!(windows.len(), off_windows.len());
}

#[test]
fn options_the_nnunet_pipeline_cannot_honour_are_refused_by_name() {
    let (model, volume) = (model(), volume());
    for (json, option) in [
        (r#"{"resample": "nearest"}"#, "resample"),
        (r#"{"slab": 8}"#, "slab"),
    ] {
        let opts = SegmentOptions::from_json(json).unwrap();
        let err = segment(&model, &volume, &opts, &mut lwi::events::Silent).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument, "{json}: {err:?}");
        assert!(
            err.message.contains(option) && err.message.contains("nn_unet"),
            "{json}: {}",
            err.message
        );
    }
    // what it does anyway is accepted when asked for by name
    let _ = run(
        &model,
        &volume,
        r#"{"resample": "scores", "blend": "constant", "mirror": false}"#,
    );
}
