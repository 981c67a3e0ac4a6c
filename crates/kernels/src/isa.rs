//! Run-time CPU detection and the `FEDLLM_KERNELS` override.

use std::sync::OnceLock;

/// Code paths of the GEMM over bf16/quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Scalar loops: any CPU.
    Portable,
    /// f32 FMA on 256-bit registers (AVX2, FMA, F16C; no AVX-512): the AVX-512 f32 path's
    /// products in the same order, so the same bits, at half the width.
    Avx2,
    /// `vdpbf16ps` on 512-bit registers (bf16 operands, f32 sums). Never the default: measured
    /// at 86 GFLOP/s per core here against 187 for f32 FMA, so it only runs when asked for.
    Avx512Bf16,
    /// f32 FMA on 512-bit registers, weights widened to f32 one panel at a time.
    Avx512,
    /// AMX tiles (`tdpbf16ps`), once the kernel has granted this process XTILEDATA.
    Amx,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// Whether products run in f32 with FMA (exact f32 products, never rounded through bf16):
    /// the AVX-512 path and its AVX2 twin.
    pub fn f32_fma(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512)
    }

    pub fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512bf16" | "avx512-bf16" => Some(Isa::Avx512Bf16),
            "avx512" | "avx512f" => Some(Isa::Avx512),
            "amx" => Some(Isa::Amx),
            _ => None,
        }
    }
}

/// The fastest path this CPU and OS support.
pub fn detected() -> Isa {
    static D: OnceLock<Isa> = OnceLock::new();
    *D.get_or_init(detect)
}

/// Whether this machine can run `isa`.
pub fn supports(isa: Isa) -> bool {
    match isa {
        Isa::Portable => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => crate::avx2::available(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => is_x86_feature_detected!("avx512f"),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        }
        Isa::Amx => detected() == Isa::Amx,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    if !is_x86_feature_detected!("avx512f") {
        return if supports(Isa::Avx2) {
            Isa::Avx2
        } else {
            Isa::Portable
        };
    }
    if !is_x86_feature_detected!("avx512bf16") {
        return Isa::Avx512;
    }
    // CPUID.(7,0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE. A hypervisor may hide them, and then
    // the tile instructions fault (SIGILL): never run them without both bits and the OS grant.
    let l = std::arch::x86_64::__cpuid_count(7, 0);
    let amx = (l.edx >> 22) & 1 == 1 && (l.edx >> 24) & 1 == 1;
    if amx && request_xtiledata() {
        Isa::Amx
    } else {
        Isa::Avx512
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Portable
}

/// Linux gives a process the AMX tile state only on request: arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA). Returns whether it was granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_xtiledata() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let r: i64;
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => r,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    r == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_xtiledata() -> bool {
    false
}

/// `FEDLLM_KERNELS`, parsed; Err names the bad value.
pub fn env_cap() -> Result<Option<Isa>, String> {
    match std::env::var("FEDLLM_KERNELS") {
        Ok(v) if !v.trim().is_empty() => Isa::parse(&v).map(Some).ok_or_else(|| {
            format!("FEDLLM_KERNELS={v:?} is not one of amx, avx512, avx512bf16, avx2, portable")
        }),
        _ => Ok(None),
    }
}

/// What runs: `FEDLLM_KERNELS` when this machine supports it (else the fastest path below it),
/// otherwise the fastest detected. An unknown value is reported once on stderr and ignored;
/// the binary checks it up front with [`env_cap`] and refuses to start.
pub fn selected() -> Isa {
    static S: OnceLock<Isa> = OnceLock::new();
    *S.get_or_init(|| {
        let d = detected();
        match env_cap() {
            Ok(Some(want)) => usable(want),
            Ok(None) => d,
            Err(e) => {
                eprintln!("warning: {e}; using {}", d.name());
                d
            }
        }
    })
}

/// `want` if supported, else the best supported path ranked below it.
pub fn usable(want: Isa) -> Isa {
    [
        Isa::Amx,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Avx2,
        Isa::Portable,
    ]
    .into_iter()
    .find(|&i| i <= want && supports(i))
    .unwrap_or(Isa::Portable)
}

/// Every path this machine can run (what the tests iterate over). The paths it cannot run are
/// said once per process on stderr, so a run never looks as if it had exercised them.
pub fn available() -> Vec<Isa> {
    let all = [
        Isa::Portable,
        Isa::Avx2,
        Isa::Avx512Bf16,
        Isa::Avx512,
        Isa::Amx,
    ];
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        let missing: Vec<&str> = all
            .iter()
            .filter(|&&i| !supports(i))
            .map(|i| i.name())
            .collect();
        if !missing.is_empty() {
            // Straight to fd 2: the test harness captures `eprintln!` of passing tests, and this
            // must be seen in every test run.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "note: kernel paths this machine cannot run, not exercised: {}",
                missing.join(", ")
            );
        }
    });
    all.into_iter().filter(|&i| supports(i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_fallbacks_stay_supported() {
        for isa in [
            Isa::Portable,
            Isa::Avx2,
            Isa::Avx512Bf16,
            Isa::Avx512,
            Isa::Amx,
        ] {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
            let u = usable(isa);
            assert!(u <= isa && supports(u), "{isa:?} -> {u:?}");
        }
        assert_eq!(Isa::parse("AMX "), Some(Isa::Amx));
        assert_eq!(Isa::parse("sse2"), None);
        assert!(available().contains(&Isa::Portable));
        assert!(supports(selected()));
    }
}
