//! TensorBoard event files, so `tensorboard --logdir runs/` shows every run's curves. The format
//! is TFRecord framing (length, masked CRC-32C of the length, data, masked CRC-32C of the data)
//! around `tensorflow.Event` protos, which are small enough to encode by hand here.

use std::path::Path;

use crate::error::{FlError, Result};
use crate::metrics::RoundRecord;

/// One file per run, rewritten whole each round: the encoding is deterministic, so each
/// rewrite only appends to what a reader already saw.
pub const FILE: &str = "events.out.tfevents.0.fedllm";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// `Event { wall_time, step, file_version | summary { value { tag, simple_value } ... } }`.
fn event(
    wall_time: f64,
    step: u64,
    file_version: Option<&str>,
    scalars: &[(&str, f32)],
) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10);
    varint(step, &mut e);
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut e);
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut v);
            v.push(0x15);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(1, &v, &mut summary);
        }
        bytes_field(5, &summary, &mut e);
    }
    e
}

/// One TFRecord.
pub fn record(data: &[u8], out: &mut Vec<u8>) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked(crc32c(&len)).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked(crc32c(data)).to_le_bytes());
}

/// The scalars of one round, tagged as TensorBoard groups them.
fn scalars(r: &RoundRecord) -> Vec<(&'static str, f32)> {
    let mut s = Vec::new();
    for (tag, v) in [
        ("loss/train", r.train_loss),
        ("loss/server_test", r.server_test_loss),
        ("loss/client_val", r.client_val_loss),
        ("loss/client_test", r.client_test_loss),
        ("eval/server_accuracy", r.server_accuracy),
        ("loss/plugin_test", r.plugin_test_loss),
    ] {
        if let Some(v) = v {
            s.push((tag, v as f32));
        }
    }
    s.push(("comm/mb_down", r.bytes_down as f32 / 1e6));
    s.push(("comm/mb_up", r.bytes_up as f32 / 1e6));
    s.push(("time/round_seconds", r.seconds as f32));
    s
}

/// Writes every round's scalars (step = round) into `dir`'s event file.
pub fn write(dir: &Path, records: &[RoundRecord]) -> Result<()> {
    let mut out = Vec::new();
    record(&event(0.0, 0, Some("brain.Event:2"), &[]), &mut out);
    let mut t = 0.0;
    for r in records {
        t += r.seconds;
        record(&event(t, r.round as u64, None, &scalars(r)), &mut out);
    }
    let p = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let io = |path: &Path, e: std::io::Error| FlError::File {
        path: path.into(),
        msg: e.to_string(),
    };
    std::fs::write(&tmp, out).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &p).map_err(|e| io(&p, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC-32C check value from the Castagnoli paper / RFC 3720: "123456789" → 0xE3069283.
    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// One scalar event, byte for byte from the proto and TFRecord specs: Event{wall_time 1.5,
    /// step 3, summary{value{tag "a", simple_value 2.0}}}.
    #[test]
    fn scalar_event_bytes_by_hand() {
        let e = event(1.5, 3, None, &[("a", 2.0)]);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes()); // field 1, fixed64
        want.extend_from_slice(&[0x10, 0x03]); // field 2, varint 3
                                               // field 5 (len 10) = Summary{ field 1 (len 8) = Value{ tag "a", field 2 fixed32 2.0 } }
        want.extend_from_slice(&[0x2a, 10, 0x0a, 8, 0x0a, 1, b'a', 0x15]);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(e, want);
        let mut r = Vec::new();
        record(&e, &mut r);
        assert_eq!(&r[..8], &(e.len() as u64).to_le_bytes());
        // masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8, spelled as TensorFlow's crc32c.h
        // spells it (not as the code under test does).
        #[allow(clippy::manual_rotate)]
        let m = |c: u32| ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8);
        assert_eq!(&r[8..12], &m(crc32c(&r[..8])).to_le_bytes());
        assert_eq!(&r[12..12 + e.len()], &e[..]);
        assert_eq!(&r[12 + e.len()..], &m(crc32c(&e)).to_le_bytes());
    }
}
