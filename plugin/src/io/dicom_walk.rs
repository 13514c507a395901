//! A DICOM file's structure, checked before anything is built from it.
//!
//! dicom-rs builds its in-memory object recursively and allocates each value at the length its
//! header claims, so a file nested 10,000 sequences deep overflows the stack and one claiming a
//! 4 GiB element allocates 4 GiB. This walk goes over the same tokens first (dicom-rs's own lazy
//! reader: its grammar, nothing built, values skipped), iteratively, and refuses
//! - sequences nested deeper than [`MAX_DEPTH`];
//! - any length that runs past the end of the file (or, for a deflated data set, past
//!   [`MAX_INFLATED_BYTES`]);
//!
//! and finds where the data set ends: trailing zero padding after the last top-level element
//! (old scanners pad files so) is not part of it, as pydicom and GDCM read such files. Non-zero
//! bytes there are parsed as elements, and garbage fails as it would without the padding rule.

use super::files::open_regular;
use crate::error::quote;
use dicom_core::Tag;
use dicom_core::header::{Header, Length};
use dicom_dictionary_std::tags;
use dicom_encoding::text::SpecificCharacterSet;
use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_object::{DefaultDicomObject, FileMetaTable, OpenFileOptions};
use dicom_parser::DynStatefulDecoder;
use dicom_parser::dataset::LazyDataToken;
use dicom_parser::dataset::lazy_read::LazyDataSetReader;
use dicom_parser::stateful::decode::{CharacterSetOverride, StatefulDecode};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use std::cell::Cell;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

/// The deepest nesting of sequences read. Images nest three levels (Enhanced objects' functional
/// groups); structured reports a few more.
pub const MAX_DEPTH: usize = 64;

/// The most bytes a deflated data set may inflate to (its length cannot be checked against the file).
pub const MAX_INFLATED_BYTES: u64 = 4 << 30;

/// The file meta group is a few hundred bytes; more is not a DICOM file.
const MAX_META_BYTES: u64 = 1 << 16;

/// What the walk found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    /// Where the data set ends: the file's length, or where trailing zero padding begins.
    pub end: u64,
    /// The top-level Pixel Data element, if there is one.
    pub pixel_data: Option<PixelData>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PixelData {
    /// Native pixel data of this many bytes.
    Native(u64),
    /// Encapsulated pixel data of this many fragments (after the offset table).
    Encapsulated(u64),
}

/// Opens `path` as dicom-rs would, after the walk: reading stops at the data set's end (and, with
/// `read_until`, before that tag).
pub fn open(path: &Path, read_until: Option<Tag>) -> Result<(DefaultDicomObject, Layout), String> {
    let layout = walk(path)?;
    let (file, _) = open_regular(path).map_err(|e| e.message)?;
    let options = match read_until {
        Some(tag) => OpenFileOptions::new().read_until(tag),
        None => OpenFileOptions::new(),
    };
    let obj = options
        .from_reader(BufReader::new(file).take(layout.end))
        .map_err(|e| e.to_string())?;
    Ok((obj, layout))
}

/// Walks the file meta group and the data set of `path`.
pub fn walk(path: &Path) -> Result<Layout, String> {
    let (mut file, len) = open_regular(path).map_err(|e| e.message)?;
    let (ts_uid, start) = meta(&mut file, len)?;
    let ts = TransferSyntaxRegistry
        .get(&ts_uid)
        .ok_or_else(|| format!("unknown transfer syntax {}", quote(&ts_uid)))?;
    file.seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    let peek = file.try_clone().map_err(|e| e.to_string())?;
    match ts.codec() {
        Codec::Dataset(Some(adapter)) => {
            let inflated = adapter.adapt_reader(Box::new(BufReader::new(file)));
            let mut data_set = Walk::new(inflated, ts, 0, MAX_INFLATED_BYTES)?;
            data_set.run(None)?;
            Ok(Layout {
                end: len,
                pixel_data: data_set.pixel_data,
            })
        }
        Codec::Dataset(None) => Err(format!("transfer syntax {} is not read", ts.name())),
        _ => {
            let mut data_set = Walk::new(BufReader::new(file), ts, start, len)?;
            let end = data_set.run(Some(&peek))?;
            Ok(Layout {
                end,
                pixel_data: data_set.pixel_data,
            })
        }
    }
}

/// Reads and checks the preamble and file meta group; returns the transfer syntax UID and the
/// offset of the data set.
fn meta(file: &mut File, len: u64) -> Result<(String, u64), String> {
    let mut head = [0u8; 132];
    let n = read_up_to(file, &mut head)?;
    let magic_at = if n == 132 && &head[128..] == b"DICM" {
        128
    } else if n >= 4 && &head[..4] == b"DICM" {
        0
    } else {
        return Err("not a DICOM file (no DICM prefix)".into());
    };
    // (0002,0000) UL, length 4: the group's length.
    let mut group_length = [0u8; 12];
    file.seek(SeekFrom::Start(magic_at + 4))
        .and_then(|_| file.read_exact(&mut group_length))
        .map_err(|_| "file meta group is truncated".to_string())?;
    if group_length[..8] != [2, 0, 0, 0, b'U', b'L', 4, 0] {
        return Err("file meta group does not start with its group length".into());
    }
    let group = u32::from_le_bytes([
        group_length[8],
        group_length[9],
        group_length[10],
        group_length[11],
    ]) as u64;
    let start = magic_at + 16 + group;
    if group > MAX_META_BYTES || start > len {
        return Err(format!(
            "file meta group claims {group} bytes; the file has {len}"
        ));
    }
    let mut bytes = Vec::with_capacity(16 + group as usize);
    bytes.extend_from_slice(b"DICM");
    bytes.extend_from_slice(&group_length);
    bytes.resize(16 + group as usize, 0);
    file.read_exact(&mut bytes[16..])
        .map_err(|_| "file meta group is truncated".to_string())?;
    // Its elements' lengths, checked before dicom-rs allocates them.
    let explicit_le = TransferSyntaxRegistry
        .get(dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.uid())
        .ok_or("explicit VR little endian is not registered")?;
    Walk::new(&bytes[16..], explicit_le, 0, group)?.run(None)?;
    let table = FileMetaTable::from_reader(&bytes[..]).map_err(|e| e.to_string())?;
    Ok((table.transfer_syntax().to_string(), start))
}

/// Reads as many bytes as there are, up to the buffer's size.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> Result<usize, String> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(n)
}

/// A reader that counts the bytes read through it, so the walk knows where it is between tokens.
struct Counted<R> {
    inner: R,
    read: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// One pass over a data set's tokens.
struct Walk<R: Read> {
    tokens: LazyDataSetReader<DynStatefulDecoder<Counted<R>>>,
    read: Rc<Cell<u64>>,
    start: u64,
    /// No length may reach past this offset.
    limit: u64,
    pixel_data: Option<PixelData>,
}

impl<R: Read> Walk<R> {
    fn new(
        source: R,
        ts: &dicom_encoding::TransferSyntax,
        start: u64,
        limit: u64,
    ) -> Result<Self, String> {
        let read = Rc::new(Cell::new(0));
        let counted = Counted {
            inner: source,
            read: read.clone(),
        };
        let decoder = DynStatefulDecoder::new_with_override(
            counted,
            ts,
            SpecificCharacterSet::default(),
            CharacterSetOverride::default(),
            start,
        )
        .map_err(|e| e.to_string())?;
        Ok(Walk {
            tokens: LazyDataSetReader::new(decoder),
            read,
            start,
            limit,
            pixel_data: None,
        })
    }

    fn at(&self) -> u64 {
        self.start + self.read.get()
    }

    /// Walks every token; with `file`, stops where only zero bytes remain after a top-level
    /// element and returns that offset (else the end of the data).
    fn run(&mut self, file: Option<&File>) -> Result<u64, String> {
        let mut open = Nesting::default();
        let mut value_pending = false;
        let mut items_in_pixels = 0u64;
        // A non-zero byte found after a boundary: boundaries before it need no new search.
        let mut nonzero_at: Option<u64> = None;
        loop {
            if let Some(f) = file
                && open.is_top_level()
                && !value_pending
            {
                let at = self.at();
                if nonzero_at.is_none_or(|q| at > q) {
                    match first_nonzero(f, at, self.limit)? {
                        None if at < self.limit => return Ok(at),
                        None => {}
                        Some(offset) => nonzero_at = Some(offset),
                    }
                }
            }
            let at = self.at();
            let limit = self.limit;
            let Some(token) = self.tokens.advance() else {
                break;
            };
            let token = token.map_err(|e| e.to_string())?;
            let top_level_pixels = open.is_top_level_pixels();
            match token {
                LazyDataToken::SequenceStart { tag, len } => {
                    open.enter(Open::Sequence { pixels: false }, at)?;
                    check_len(&format!("sequence {tag}"), len, at, limit)?;
                }
                LazyDataToken::PixelSequenceStart => {
                    open.enter(Open::Sequence { pixels: true }, at)?;
                    if open.is_top_level_pixels() {
                        self.pixel_data = Some(PixelData::Encapsulated(0));
                    }
                }
                LazyDataToken::SequenceEnd => open.leave(Open::Sequence { pixels: false }, at)?,
                LazyDataToken::ItemStart { len } => {
                    open.enter(Open::Item, at)?;
                    check_len("item", len, at, limit)?;
                    if top_level_pixels {
                        items_in_pixels += 1;
                        let fragments = items_in_pixels.saturating_sub(1);
                        self.pixel_data = Some(PixelData::Encapsulated(fragments));
                    }
                }
                LazyDataToken::ItemEnd => open.leave(Open::Item, at)?,
                LazyDataToken::ElementHeader(_) => value_pending = true,
                LazyDataToken::LazyValue { header, decoder } => {
                    value_pending = false;
                    let from = decoder.position();
                    check_len(
                        &format!("element {}", header.tag()),
                        header.len,
                        from,
                        limit,
                    )?;
                    if open.is_top_level() && header.tag() == tags::PIXEL_DATA {
                        self.pixel_data = Some(PixelData::Native(header.len.0 as u64));
                    }
                    decoder
                        .skip_bytes(header.len.0)
                        .map_err(|e| e.to_string())?;
                }
                LazyDataToken::LazyItemValue { len, decoder } => {
                    check_len(
                        "pixel data fragment",
                        Length(len),
                        decoder.position(),
                        limit,
                    )?;
                    decoder.skip_bytes(len).map_err(|e| e.to_string())?;
                }
                _ => {}
            }
        }
        Ok(self.limit)
    }
}

/// What is open where the walk stands: sequences and their items, as dicom-rs's reader keeps them.
/// A delimiter that closes something other than what is open is refused here, before the reader
/// goes on from a state it does not expect (an item delimiter at the top level followed by an item
/// makes it panic).
#[derive(Default)]
struct Nesting {
    stack: Vec<Open>,
    sequences: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    /// `pixels`: an encapsulated Pixel Data sequence.
    Sequence {
        pixels: bool,
    },
    Item,
}

impl Nesting {
    fn is_top_level(&self) -> bool {
        self.stack.is_empty()
    }

    fn is_top_level_pixels(&self) -> bool {
        self.stack == [Open::Sequence { pixels: true }]
    }

    fn enter(&mut self, what: Open, at: u64) -> Result<(), String> {
        if let Open::Sequence { .. } = what {
            self.sequences += 1;
            check_depth(self.sequences, at)?;
        }
        self.stack.push(what);
        Ok(())
    }

    fn leave(&mut self, what: Open, at: u64) -> Result<(), String> {
        match (self.stack.pop(), what) {
            (Some(Open::Item), Open::Item) => Ok(()),
            (Some(Open::Sequence { .. }), Open::Sequence { .. }) => {
                self.sequences -= 1;
                Ok(())
            }
            (_, Open::Item) => Err(format!("item delimiter outside an item (at byte {at})")),
            (_, Open::Sequence { .. }) => Err(format!(
                "sequence delimiter outside a sequence (at byte {at})"
            )),
        }
    }
}

fn check_depth(depth: usize, at: u64) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "sequences nested more than {MAX_DEPTH} deep (at byte {at})"
        ));
    }
    Ok(())
}

/// A defined length must end before `limit`.
fn check_len(what: &str, len: Length, at: u64, limit: u64) -> Result<(), String> {
    match len.get() {
        Some(n) if at.saturating_add(n as u64) > limit => Err(format!(
            "{what} at byte {at} claims {n} bytes, past the end of the data ({limit} bytes)"
        )),
        _ => Ok(()),
    }
}

/// The offset of the first non-zero byte of `file` in `[from, end)`, or `None` when all are zero.
/// Reads a few bytes first (an element's tag is almost never zero), then larger chunks.
fn first_nonzero(file: &File, from: u64, end: u64) -> Result<Option<u64>, String> {
    let mut buf = vec![0u8; 1 << 16];
    let mut chunk = 16;
    let mut at = from;
    while at < end {
        let want = chunk.min((end - at) as usize);
        chunk = (chunk * 16).min(buf.len());
        let n = file
            .read_at(&mut buf[..want], at)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

    /// A small explicit VR little endian file: a name, then 8 bytes of native Pixel Data, then `tail`.
    fn file(dir: &Path, extra: &[u8], tail: &[u8]) -> std::path::PathBuf {
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            tags::PATIENT_NAME,
            VR::PN,
            PrimitiveValue::from("Doe"),
        ));
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(vec![7u8; 8]),
        ));
        let meta = FileMetaTableBuilder::new()
            .transfer_syntax("1.2.840.10008.1.2.1")
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.2")
            .media_storage_sop_instance_uid("1.2.3");
        let mut bytes = Vec::new();
        obj.with_meta(meta).unwrap().write_all(&mut bytes).unwrap();
        // `extra` goes before Pixel Data (at the end: 12 bytes of header, 8 of value).
        let at = bytes.len() - 20;
        bytes.splice(at..at, extra.iter().copied());
        bytes.extend_from_slice(tail);
        let path = dir.join("f.dcm");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn nested(n: usize) -> Vec<u8> {
        let open = [
            &[
                0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0, 0xff, 0xff, 0xff, 0xff,
            ][..],
            &[0xfe, 0xff, 0x00, 0xe0, 0xff, 0xff, 0xff, 0xff],
        ]
        .concat();
        let close = [
            [0xfe, 0xff, 0x0d, 0xe0, 0, 0, 0, 0],
            [0xfe, 0xff, 0xdd, 0xe0, 0, 0, 0, 0],
        ]
        .concat();
        [open.repeat(n), close.repeat(n)].concat()
    }

    #[test]
    fn trailing_zeros_end_the_data_set_and_other_bytes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let plain = file(dir.path(), &[], &[]);
        let len = std::fs::metadata(&plain).unwrap().len();
        let layout = walk(&plain).unwrap();
        assert_eq!(
            layout,
            Layout {
                end: len,
                pixel_data: Some(PixelData::Native(8))
            }
        );
        for zeros in [5, 12, 13, 2_500_001] {
            let padded = file(dir.path(), &[], &vec![0; zeros]);
            assert_eq!(walk(&padded).unwrap().end, len, "{zeros} zero bytes");
            let (obj, _) = open(&padded, None).unwrap();
            assert_eq!(
                obj.element(tags::PIXEL_DATA)
                    .unwrap()
                    .to_bytes()
                    .unwrap()
                    .len(),
                8
            );
        }
        // A zero run followed by something else is parsed (and here fails) as elements.
        let garbage = file(dir.path(), &[], &[[0u8; 24].as_slice(), &[9; 5]].concat());
        assert!(walk(&garbage).is_err());
    }

    #[test]
    fn delimiters_that_close_nothing_open_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let item_delimiter = [0xfe, 0xff, 0x0d, 0xe0, 0, 0, 0, 0];
        let item = [0xfe, 0xff, 0x00, 0xe0, 0xff, 0xff, 0xff, 0xff];
        // At the top level an item delimiter then an item: dicom-rs's reader panics on the item.
        let stray = file(dir.path(), &[item_delimiter, item].concat(), &[]);
        let e = walk(&stray).unwrap_err();
        assert!(e.contains("item delimiter outside an item"), "{e}");
        // In a sequence, a second item delimiter closes the sequence itself.
        let twice = [&nested(1)[..20], &item_delimiter, &item_delimiter, &item].concat();
        let e = walk(&file(dir.path(), &twice, &[])).unwrap_err();
        assert!(e.contains("item delimiter outside an item"), "{e}");
        assert!(walk(&file(dir.path(), &nested(3), &[])).is_ok());
    }

    #[test]
    fn nesting_and_lengths_are_bounded_before_anything_is_built() {
        let dir = tempfile::tempdir().unwrap();
        assert!(walk(&file(dir.path(), &nested(MAX_DEPTH), &[])).is_ok());
        let deep = file(dir.path(), &nested(10_000), &[]);
        let e = walk(&deep).unwrap_err();
        assert!(e.contains("nested more than 64 deep"), "{e}");
        assert!(open(&deep, None).is_err());
        // (0009,1010) OB claiming 4 GiB in a file of a few hundred bytes.
        let claim = [
            &[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0][..],
            &0xFFFF_FFF0u32.to_le_bytes(),
        ]
        .concat();
        let e = walk(&file(dir.path(), &claim, &[])).unwrap_err();
        assert!(
            e.contains("element (0009,1010) at byte") && e.contains("claims 4294967280 bytes"),
            "{e}"
        );
    }
}
