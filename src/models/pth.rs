//! Reading PyTorch `.pth` state dicts (the zip archive `torch.save` writes) without trusting
//! them: candle's pickle reader allocates what a file claims (a string's length prefix, a
//! tensor's shape) before reading it, clones memoised objects without bound and indexes
//! tuples without checking their length. So before candle reads a file, this module checks it:
//!
//! - the pickle (`data.pkl`) is walked opcode by opcode, as the pickle machine would run it,
//!   tracking how large and how deeply nested each object would be: every length prefix must
//!   fit in the bytes that follow, and no object (nor the clones of memoised objects, all
//!   together) may outgrow a small multiple of the pickle, nor nest deeper than
//!   [`MAX_DEPTH`];
//! - every tensor's storage must be an uncompressed archive entry (as `torch.save` writes
//!   them) no larger than the file, holding the bytes the tensor's shape and offset need.
//!
//! Candle is then called under `catch_unwind`, so that a malformed pickle that still makes
//! it index out of bounds gives an error, not a crash.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// The deepest nesting of objects a state dict's pickle may have (a real one has under 10).
pub const MAX_DEPTH: u32 = 64;

/// Runs a call into candle's pickle reader, turning a panic into an error.
fn guarded<T>(shown: &str, f: impl FnOnce() -> candle_core::Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| anyhow!("{e}")),
        Err(_) => bail!("{shown}: the pickle (data.pkl) is malformed"),
    }
}

/// The named tensors of the state dict in `path` (under `key` when given): `Ok(vec![])` when
/// the pickle holds no tensors there. `shown` names the file in errors.
pub fn read_pth(path: &Path, key: Option<&str>, shown: &str) -> Result<Vec<(String, Tensor)>> {
    let file_len = std::fs::metadata(path)
        .with_context(|| format!("{shown}: cannot read the file"))?
        .len();
    let open = || -> Result<zip::ZipArchive<BufReader<File>>> {
        let f = File::open(path).with_context(|| format!("{shown}: cannot open the file"))?;
        zip::ZipArchive::new(BufReader::new(f)).map_err(|e| {
            anyhow!(
                "{shown}: not a zip archive as torch.save writes it (PyTorch >= 1.6): {e}; \
                 re-save the state dict with torch.save, or convert it to .safetensors"
            )
        })
    };
    let mut zip = open()?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow!("{shown}: unreadable archive directory: {e}"))?;
    if !names.iter().any(|n| n.ends_with("data.pkl")) {
        bail!("{shown}: the archive has no data.pkl (is it a PyTorch checkpoint?)");
    }
    for name in names.iter().filter(|n| n.ends_with("data.pkl")) {
        let entry = zip
            .by_name(name)
            .map_err(|e| anyhow!("{shown}: cannot read {name}: {e}"))?;
        let mut pickle = Vec::new();
        // A pickle is far smaller than its file; the bound stops a decompression bomb.
        entry
            .take(file_len.saturating_mul(4) + 4096)
            .read_to_end(&mut pickle)
            .map_err(|e| anyhow!("{shown}: cannot read {name}: {e}"))?;
        check_pickle(&pickle).with_context(|| format!("{shown}: {name} is malformed"))?;
    }
    let pth = guarded(shown, || candle_core::pickle::PthTensors::new(path, key))?;
    for (name, info) in pth.tensor_infos() {
        let dims = info.layout.dims();
        let bytes = dims
            .iter()
            .try_fold(info.dtype.size_in_bytes(), |a, &d| a.checked_mul(d))
            .and_then(|b| b.checked_add(info.layout.start_offset()));
        let entry = zip.by_name(&info.path).map_err(|e| {
            anyhow!(
                "{shown}: tensor `{name}` is stored in {}, which the archive lacks ({e})",
                info.path
            )
        })?;
        if entry.compression() != zip::CompressionMethod::Stored {
            bail!(
                "{shown}: the storage of tensor `{name}` is compressed; torch.save stores \
                 tensors uncompressed: re-save the state dict with torch.save"
            );
        }
        let have = entry.size();
        if have > file_len || bytes.is_none_or(|b| b as u64 > have) {
            bail!(
                "{shown}: tensor `{name}` of shape {dims:?} needs {} bytes but its storage {} \
                 holds {have} (the file has {file_len}): the file is truncated or corrupt",
                bytes.map_or("more than 2^64".to_string(), |b| b.to_string()),
                info.path
            );
        }
    }
    let mut out = Vec::with_capacity(pth.tensor_infos().len());
    let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
    names.sort();
    for name in names {
        if let Some(t) = guarded(shown, || pth.get(name))
            .with_context(|| format!("{shown}: cannot read tensor `{name}`"))?
        {
            out.push((name.clone(), t));
        }
    }
    Ok(out)
}

/// An object on the simulated pickle stack: its size (nodes plus string bytes) and depth.
#[derive(Clone, Copy)]
enum Item {
    Mark,
    Obj { size: u64, depth: u32 },
}

/// Walks the opcodes candle's pickle reader knows, checking every length against the bytes
/// left and the objects' sizes and nesting (see the module doc). Opcodes candle does not
/// know are an error there too.
pub fn check_pickle(p: &[u8]) -> Result<()> {
    let max_size = 8 * p.len() as u64 + 65_536;
    let mut clones: u64 = 0;
    let mut stack: Vec<Item> = Vec::new();
    let mut memo: HashMap<u32, Item> = HashMap::new();
    let mut i = 0usize;
    let take = |i: &mut usize, n: usize| -> Result<&[u8]> {
        let end = i
            .checked_add(n)
            .filter(|&e| e <= p.len())
            .with_context(|| format!("byte {i}: an argument of {n} bytes runs past the end"))?;
        let s = &p[*i..end];
        *i = end;
        Ok(s)
    };
    let pop = |stack: &mut Vec<Item>| -> Result<(u64, u32)> {
        match stack.pop() {
            Some(Item::Obj { size, depth }) => Ok((size, depth)),
            _ => bail!("an opcode needs an object on the stack"),
        }
    };
    // Pops `n` objects (all up to the mark when `None`) and pushes the object made of them.
    let combine = |stack: &mut Vec<Item>, n: Option<usize>| -> Result<Item> {
        let (mut size, mut depth) = (1u64, 0u32);
        match n {
            Some(n) => {
                for _ in 0..n {
                    let (s, d) = pop(stack)?;
                    size = size.saturating_add(s);
                    depth = depth.max(d);
                }
            }
            None => loop {
                match stack.pop() {
                    Some(Item::Mark) => break,
                    Some(Item::Obj { size: s, depth: d }) => {
                        size = size.saturating_add(s);
                        depth = depth.max(d);
                    }
                    None => bail!("no mark for a tuple, dict or list"),
                }
            },
        }
        let item = Item::Obj {
            size,
            depth: depth + 1,
        };
        if size > max_size || depth + 1 > MAX_DEPTH {
            bail!("an object too large or nested too deeply ({size} nodes, depth {depth})");
        }
        Ok(item)
    };
    let leaf = Item::Obj { size: 1, depth: 1 };
    loop {
        let Some(&op) = p.get(i) else {
            bail!("the pickle ends without its STOP opcode");
        };
        let at = i;
        i += 1;
        let item = match op {
            b'.' => return Ok(()),
            0x80 => {
                take(&mut i, 1)?;
                continue;
            }
            b'c' => {
                for _ in 0..2 {
                    let rest = &p[i..];
                    let n = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .with_context(|| format!("byte {at}: GLOBAL without its newline"))?;
                    i += n + 1;
                }
                leaf
            }
            b'X' => {
                let n = u32::from_le_bytes(take(&mut i, 4)?.try_into()?) as usize;
                take(&mut i, n).with_context(|| format!("byte {at}: a string of {n} bytes"))?;
                Item::Obj {
                    size: 1 + n as u64,
                    depth: 1,
                }
            }
            b'K' | b'M' | b'J' | b'G' => {
                let n = match op {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                take(&mut i, n)?;
                leaf
            }
            0x8a => {
                let n = take(&mut i, 1)?[0] as usize;
                if n > 8 {
                    bail!("byte {at}: a LONG1 of {n} bytes (at most 8 are read)");
                }
                take(&mut i, n)?;
                leaf
            }
            b'N' | 0x88 | 0x89 | b')' | b']' | b'}' | b'd' => leaf,
            b'(' => Item::Mark,
            b't' => combine(&mut stack, None)?,
            0x85 => combine(&mut stack, Some(1))?,
            0x86 => combine(&mut stack, Some(2))?,
            0x87 => combine(&mut stack, Some(3))?,
            b'Q' => combine(&mut stack, Some(1))?,
            b'R' | b'b' | 0x81 => combine(&mut stack, Some(2))?,
            b'a' => combine(&mut stack, Some(2))?,
            b's' => combine(&mut stack, Some(3))?,
            b'e' | b'u' => {
                let Item::Obj { size, depth } = combine(&mut stack, None)? else {
                    bail!("internal error: not an object");
                };
                let (s, d) = pop(&mut stack)?;
                stack.push(Item::Obj { size: s, depth: d });
                stack.push(Item::Obj {
                    size: size - 1,
                    depth: depth - 1,
                });
                combine(&mut stack, Some(2))?
            }
            b'h' | b'j' | b'q' | b'r' => {
                let id = if op == b'h' || op == b'q' {
                    u32::from(take(&mut i, 1)?[0])
                } else {
                    u32::from_le_bytes(take(&mut i, 4)?.try_into()?)
                };
                let obj = if op == b'h' || op == b'j' {
                    *memo
                        .get(&id)
                        .with_context(|| format!("byte {at}: memo {id} was never stored"))?
                } else {
                    *stack
                        .last()
                        .with_context(|| format!("byte {at}: PUT on an empty stack"))?
                };
                if let Item::Obj { size, .. } = obj {
                    clones = clones.saturating_add(size);
                }
                if clones > max_size {
                    bail!("byte {at}: memoised objects are copied too often (a pickle bomb?)");
                }
                if op == b'q' || op == b'r' {
                    memo.insert(id, obj);
                    continue;
                }
                obj
            }
            other => bail!("byte {at}: opcode 0x{other:02x} is not one candle reads"),
        };
        stack.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefixes_sizes_and_depths_are_checked() {
        // A string claiming 16 MB in a 10-byte pickle.
        assert!(check_pickle(b"\x80\x02X\x00\x00\x00\x01ab.").is_err());
        assert!(check_pickle(b"\x80\x02X\x02\x00\x00\x00ab.").is_ok());
        // Deep nesting: 100 TUPLE1s.
        let mut deep = b"N".to_vec();
        deep.extend([0x85; 100]);
        deep.push(b'.');
        assert!(check_pickle(&deep).is_err());
        // Doubling by memo: put, get twice, TUPLE2, put, ...
        let mut bomb = b"N".to_vec();
        for _ in 0..40 {
            bomb.extend(b"q\x00h\x00\x86");
        }
        bomb.push(b'.');
        assert!(check_pickle(&bomb).is_err());
        assert!(check_pickle(b"\x8a\x09123456789.").is_err());
        assert!(check_pickle(b"N").is_err());
    }
}
