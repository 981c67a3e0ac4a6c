//! f32 ↔ bf16 with round-to-nearest-even (what torch and the hardware conversions do).

#[inline]
pub fn from_f32(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline]
pub fn to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// Round-trip through bf16 (what a value becomes inside the GEMM).
#[inline]
pub fn round(x: f32) -> f32 {
    to_f32(from_f32(x))
}

pub fn convert_slice(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = from_f32(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even_like_half() {
        for &x in &[
            0.0f32,
            -0.0,
            1.0,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            2.71,
            -2.5e-30,
            3.3e38,
            1e-40,
        ] {
            assert_eq!(from_f32(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
        assert!(to_f32(from_f32(f32::NAN)).is_nan());
        assert_eq!(to_f32(from_f32(f32::INFINITY)), f32::INFINITY);
    }
}
