//! Standard terms for the organs a model may label: SNOMED CT codes as 3D Slicer's "General
//! Anatomy" terminology lists them (category Anatomical Structure, a type, and for paired organs a
//! laterality modifier) with its recommended colours. A label name matches an organ when their
//! words agree up to case, separators and order ("kidney_right" is "Right kidney"), or it is one
//! of the organ's usual short names (the BTCV/Synapse dataset's "rkid", "IVC", …).

/// A SNOMED CT code: value and meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Code {
    pub value: &'static str,
    pub meaning: &'static str,
}

/// An organ's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Organ {
    pub kind: Code,
    pub modifier: Option<Code>,
    /// Slicer's recommended display colour.
    pub rgb: [u8; 3],
}

/// The category of every organ here.
pub const ANATOMICAL_STRUCTURE: Code = code("123037004", "Anatomical Structure");
/// Slicer's name for its terminology context (the first field of a terminology entry).
pub const SLICER_CONTEXT: &str = "Segmentation category and type - 3D Slicer General Anatomy list";
/// Slicer's anatomic region context (the fifth field; lwi names no region).
pub const SLICER_REGION_CONTEXT: &str = "Anatomic codes - DICOM master list";

const fn code(value: &'static str, meaning: &'static str) -> Code {
    Code { value, meaning }
}

const RIGHT: Option<Code> = Some(code("24028007", "Right"));
const LEFT: Option<Code> = Some(code("7771000", "Left"));

/// An organ's names (the first as Slicer's list spells it), type, modifier and colour.
type Entry = (&'static [&'static str], Code, Option<Code>, [u8; 3]);

/// Inferior vena cava and portal vein are not in Slicer's list: their SNOMED CT codes, with Slicer's
/// vessel colours.
const ORGANS: &[Entry] = &[
    (
        &["spleen"],
        code("78961009", "Spleen"),
        None,
        [157, 108, 162],
    ),
    (
        &["right kidney", "rkid", "kidney R"],
        code("64033007", "Kidney"),
        RIGHT,
        [185, 102, 83],
    ),
    (
        &["left kidney", "lkid", "kidney L"],
        code("64033007", "Kidney"),
        LEFT,
        [185, 102, 83],
    ),
    (
        &["gallbladder", "gall"],
        code("28231008", "Gallbladder"),
        None,
        [139, 150, 98],
    ),
    (
        &["esophagus", "eso"],
        code("32849002", "Esophagus"),
        None,
        [211, 171, 143],
    ),
    (&["liver"], code("10200004", "Liver"), None, [221, 130, 101]),
    (
        &["stomach", "sto"],
        code("69695003", "Stomach"),
        None,
        [216, 132, 105],
    ),
    (&["aorta"], code("15825003", "Aorta"), None, [224, 97, 76]),
    (
        &["inferior vena cava", "IVC"],
        code("64131007", "Inferior vena cava"),
        None,
        [0, 151, 206],
    ),
    (
        &["portal vein and splenic vein", "portal vein", "veins"],
        code("32764006", "Portal vein"),
        None,
        [0, 122, 171],
    ),
    (
        &["pancreas"],
        code("15776009", "Pancreas"),
        None,
        [249, 180, 111],
    ),
    (
        &["right adrenal gland", "rad", "adrenal gland R"],
        code("23451007", "Adrenal gland"),
        RIGHT,
        [249, 186, 150],
    ),
    (
        &["left adrenal gland", "lad", "adrenal gland L"],
        code("23451007", "Adrenal gland"),
        LEFT,
        [249, 186, 150],
    ),
    (
        &["duodenum"],
        code("38848004", "Duodenum"),
        None,
        [255, 253, 229],
    ),
    (
        &["urinary bladder", "bladder"],
        code("89837001", "Bladder"),
        None,
        [222, 154, 132],
    ),
];

/// The organ `name` labels, if it is one known here.
pub fn organ(name: &str) -> Option<Organ> {
    ORGANS
        .iter()
        .find(|(names, ..)| names.iter().any(|n| same_words(n, name)))
        .map(|&(_, kind, modifier, rgb)| Organ {
            kind,
            modifier,
            rgb,
        })
}

/// Names equal up to case, separators and word order ("kidney_right" is "Right kidney").
pub fn same_words(a: &str, b: &str) -> bool {
    let words = |s: &str| {
        let mut w: Vec<String> = s
            .split(|c: char| c == '_' || c == '-' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        w.sort();
        w
    };
    words(a) == words(b)
}

/// A colour for a label no organ here matches: a fixed palette by label value.
pub fn fallback_rgb(value: u32) -> [u8; 3] {
    const PALETTE: [[u8; 3]; 8] = [
        [128, 174, 128],
        [241, 214, 145],
        [177, 122, 101],
        [111, 184, 210],
        [216, 101, 79],
        [221, 130, 101],
        [144, 238, 144],
        [192, 104, 88],
    ];
    PALETTE[value as usize % PALETTE.len()]
}

/// Slicer's serialised terminology entry for `organ` (`vtkSlicerTerminologiesModuleLogic::
/// SerializeTerminologyEntry`): context~category~type~modifier~region context~region~region modifier,
/// each code as scheme^value^meaning.
pub fn slicer_terminology_entry(organ: &Organ) -> String {
    let triple = |c: Option<Code>| match c {
        Some(c) => format!("SCT^{}^{}", c.value, c.meaning),
        None => "^^".to_string(),
    };
    format!(
        "{SLICER_CONTEXT}~{}~{}~{}~{SLICER_REGION_CONTEXT}~^^~^^",
        triple(Some(ANATOMICAL_STRUCTURE)),
        triple(Some(organ.kind)),
        triple(organ.modifier),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_datasets_spell_them_find_their_organ() {
        assert_eq!(organ("kidney_right").unwrap().modifier, RIGHT);
        assert_eq!(organ("lkid").unwrap().modifier, LEFT);
        assert_eq!(organ("IVC").unwrap().kind.value, "64131007");
        assert!(organ("kidney").is_none());
        assert!(same_words("kidney_right", "Right kidney"));
        assert!(!same_words("kidney_right", "kidney left"));
    }

    #[test]
    fn the_terminology_entry_is_slicers_serialisation() {
        assert_eq!(
            slicer_terminology_entry(&organ("liver").unwrap()),
            "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
        );
    }
}
