//! Protocol-buffer wire encoding, by hand: the TensorBoard (tensorboard.rs) and W&B (wandb.rs)
//! records are a handful of small messages, and hand-encoding them keeps `protoc` and a
//! generated-code crate out of the build (spec/tracking.md §1–2).

/// A base-128 varint.
pub fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field `field` as a length-delimited value (bytes, string or an embedded message).
pub fn bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Field `field` as a varint (int32, int64, uint64, bool, enum).
pub fn uint(field: u32, v: u64, out: &mut Vec<u8>) {
    varint(u64::from(field << 3), out);
    varint(v, out);
}

/// Field `field` as a 64-bit double.
pub fn double(field: u32, v: f64, out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 1), out);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Field `field` as a 32-bit float.
pub fn float(field: u32, v: f32, out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 5), out);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Field `field` as packed doubles.
pub fn packed_doubles(field: u32, values: &[f64], out: &mut Vec<u8>) {
    let body: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    bytes(field, &body, out);
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_encode_as_protobuf_does() {
        // From protobuf's encoding guide: field 1 = 150 is 08 96 01; field 2 = "testing" is
        // 12 07 74 65 73 74 69 6e 67.
        let mut out = vec![];
        uint(1, 150, &mut out);
        bytes(2, b"testing", &mut out);
        assert_eq!(
            out,
            [0x08, 0x96, 0x01, 0x12, 0x07, b't', b'e', b's', b't', b'i', b'n', b'g']
        );
        let mut d = vec![];
        double(1, 1.0, &mut d);
        assert_eq!(d[0], 0x09);
        let mut f = vec![];
        float(2, 1.0, &mut f);
        assert_eq!(f[0], 0x15);
    }
}
