//! MKL's packed-matrix SGEMM for frozen f32 weights on CPU.
//!
//! A decode step multiplies a few rows (one per sequence) by every weight matrix of the model. libtorch's `mm`
//! hands that to MKL's `sgemm`, which copies the weight matrix into its kernel's panel layout on every call: with
//! 8 rows that copy costs about as much as the multiply itself. MKL can instead pack a matrix once
//! (`cblas_sgemm_pack`) and multiply many times by the packed copy (`cblas_sgemm_compute`); PyTorch exposes the same
//! pair as `torch.ops.mkl._mkl_linear`, what Inductor's freezing pass uses for CPU linears. On SmolLM2-135M's 210
//! dense matrices of a decode step this is 1.14–1.34× faster than `mm` from 2 to 64 rows, and no faster for one
//! row or 128 (`cargo run --release -p iro-worker --example gemm_probe`), so only that range is packed; the tied
//! 49152 × 576 output head gains most (`--example decode_profile`: 8.0 instead of 18.8 ms at 8 rows).
//!
//! MKL's packed layout depends on the row count the matrix was packed for, so a pack serves one row count; a
//! layer repacks when a new count has come twice in a row (a decode loop's batch is stable; a prefill or a lone
//! scoring call in between is served by the plain path rather than thrashing the pack).
//!
//! The CBLAS symbols are looked up at run time in the libtorch this process has loaded (the x86-64 wheels link MKL
//! statically and export them); a libtorch without MKL, or `IRO_PACKED_GEMM=0`, keeps the plain path.

use std::ffi::{CStr, c_void};
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

/// The smallest and largest row counts that are packed (see the module comment for the measurements).
pub const MIN_ROWS: i64 = 2;
pub const MAX_ROWS: i64 = 64;

// CBLAS enum values (mkl_cblas.h).
const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;
const PACKED: i32 = 151;
const B_MATRIX: i32 = 162;

/// MKL's LP64 interface, which the un-suffixed CBLAS symbols implement, takes 32-bit integers.
type MklInt = i32;

type PackGetSize = unsafe extern "C" fn(identifier: i32, m: MklInt, n: MklInt, k: MklInt) -> usize;
type Pack = unsafe extern "C" fn(
    layout: i32,
    identifier: i32,
    trans: i32,
    m: MklInt,
    n: MklInt,
    k: MklInt,
    alpha: f32,
    src: *const f32,
    ld: MklInt,
    dest: *mut f32,
);
type Compute = unsafe extern "C" fn(
    layout: i32,
    transa: i32,
    transb: i32,
    m: MklInt,
    n: MklInt,
    k: MklInt,
    a: *const f32,
    lda: MklInt,
    b: *const f32,
    ldb: MklInt,
    beta: f32,
    c: *mut f32,
    ldc: MklInt,
);

struct Mkl {
    pack_get_size: PackGetSize,
    pack: Pack,
    compute: Compute,
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns packing on or off for the whole process (benchmarks compare both paths in one process).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

fn mkl() -> Option<&'static Mkl> {
    static MKL: OnceLock<Option<Mkl>> = OnceLock::new();
    MKL.get_or_init(|| {
        if std::env::var("IRO_PACKED_GEMM").is_ok_and(|v| v == "0") {
            return None;
        }
        let symbol = |name: &CStr| {
            // SAFETY: dlsym with RTLD_DEFAULT only searches the objects already loaded; libtorch_cpu is one of
            // them (the binary links it), and a missing symbol yields null.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        let (get_size, pack, compute) =
            (symbol(c"cblas_sgemm_pack_get_size")?, symbol(c"cblas_sgemm_pack")?, symbol(c"cblas_sgemm_compute")?);
        // SAFETY: these are MKL's documented CBLAS functions; the types above are their C prototypes.
        unsafe {
            Some(Mkl {
                pack_get_size: std::mem::transmute::<*mut c_void, PackGetSize>(get_size),
                pack: std::mem::transmute::<*mut c_void, Pack>(pack),
                compute: std::mem::transmute::<*mut c_void, Compute>(compute),
            })
        }
    })
    .as_ref()
}

/// One weight matrix's packed copies: at most one row count at a time, and the count that asked last.
pub struct PackedWeight {
    /// The frozen weight: [in, out] when `transposed`, else HF's [out, in].
    weight: Tensor,
    transposed: bool,
    state: Mutex<PackState>,
}

#[derive(Default)]
struct PackState {
    /// (rows it was packed for, MKL's opaque packed buffer in a 64-byte aligned tensor; see `pack`).
    packed: Option<(i64, Tensor)>,
    /// The row count of the previous call that the pack did not serve.
    last_miss: Option<i64>,
}

impl PackedWeight {
    /// For a frozen f32 CPU matrix when MKL is here; `None` (use the plain path) otherwise.
    pub fn new(weight: &Tensor, transposed: bool) -> Option<Self> {
        let eligible = weight.kind() == Kind::Float
            && weight.device() == Device::Cpu
            && weight.dim() == 2
            && weight.is_contiguous()
            && !weight.requires_grad()
            && weight.size().iter().all(|&d| d > 0 && d <= MklInt::MAX as i64);
        (eligible && mkl().is_some()).then(|| Self {
            weight: weight.shallow_clone(),
            transposed,
            state: Mutex::new(PackState::default()),
        })
    }

    /// `x·W (+ bias)` for `x` [M, K], or `None` when this call is better served by the plain path: packing is off,
    /// M is outside [`MIN_ROWS`, `MAX_ROWS`], `x` needs gradients, or the pack is for another M (see the module
    /// comment for when it repacks). An `x` of the wrong shape or kind also gets `None`, so the plain path raises
    /// libtorch's error naming the shapes (MKL would read out of bounds instead).
    pub fn matmul(&self, x: &Tensor, bias: Option<&Tensor>) -> Option<Tensor> {
        let mkl = mkl()?;
        let (k, n) = self.dims();
        let shape = x.size();
        let m = shape.first().copied().unwrap_or(0);
        if !ENABLED.load(Ordering::Relaxed)
            || shape.len() != 2
            || shape[1] != k
            || !(MIN_ROWS..=MAX_ROWS).contains(&m)
            || x.kind() != Kind::Float
            || x.device() != Device::Cpu
            || x.requires_grad()
            || bias.is_some_and(|b| b.size() != [n] || b.kind() != Kind::Float || b.device() != Device::Cpu)
        {
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.packed.as_ref().is_none_or(|(rows, _)| *rows != m) {
            if state.last_miss != Some(m) {
                state.last_miss = Some(m);
                return None;
            }
            let old = state.packed.take().map(|(_, buffer)| buffer);
            state.packed = Some((m, self.pack(mkl, m, old)));
            state.last_miss = None;
        }
        let (_, packed) = state.packed.as_ref().expect("packed above");
        let x = x.contiguous();
        let out = match bias {
            Some(b) => b.expand([m, n], false).contiguous(),
            None => Tensor::empty([m, n], (Kind::Float, Device::Cpu)),
        };
        // SAFETY: x is a contiguous f32 [m, k] CPU tensor, `packed` was packed by MKL for exactly (m, n, k), and
        // `out` is a fresh contiguous f32 [m, n] tensor that nothing else references; all three outlive the call.
        unsafe {
            (mkl.compute)(
                ROW_MAJOR,
                NO_TRANS,
                PACKED,
                m as MklInt,
                n as MklInt,
                k as MklInt,
                x.data_ptr() as *const f32,
                k as MklInt,
                packed.data_ptr() as *const f32,
                self.leading_dim() as MklInt,
                if bias.is_some() { 1.0 } else { 0.0 },
                out.data_ptr() as *mut f32,
                n as MklInt,
            );
        }
        Some(out)
    }

    /// (K, N): the input and output widths.
    fn dims(&self) -> (i64, i64) {
        let s = self.weight.size();
        if self.transposed { (s[0], s[1]) } else { (s[1], s[0]) }
    }

    fn leading_dim(&self) -> i64 {
        self.weight.size()[1]
    }

    /// Packs for `m` rows into `old` (the previous pack) when it is large enough (MKL asks for the same size
    /// whatever `m`), else into a new buffer. Reuse matters on VMs, where first-touch page faults are dear:
    /// packing SmolLM2 into fresh memory took 0.2–1.4 s on the 2-core VM, into the previous pack's memory about
    /// 0.1 s (`cargo run --release -p iro-worker --example pack_probe`).
    fn pack(&self, mkl: &Mkl, m: i64, old: Option<Tensor>) -> Tensor {
        let (k, n) = self.dims();
        // SAFETY: plain arithmetic on the dimensions; MKL reads nothing but them.
        let bytes = unsafe { (mkl.pack_get_size)(B_MATRIX, m as MklInt, n as MklInt, k as MklInt) };
        let floats = (bytes as i64 + 3) / 4;
        let buffer = match old {
            Some(b) if b.numel() as i64 >= floats => b,
            _ => Tensor::empty([floats], (Kind::Float, Device::Cpu)),
        };
        let trans = if self.transposed { NO_TRANS } else { TRANS };
        // SAFETY: `weight` is a contiguous f32 matrix whose row length is `leading_dim`, holding op(B) = [k, n]
        // (itself, or transposed via `trans`); `buffer` has at least the size MKL asked for and is aligned by
        // libtorch's CPU allocator (64 bytes).
        unsafe {
            (mkl.pack)(
                ROW_MAJOR,
                B_MATRIX,
                trans,
                m as MklInt,
                n as MklInt,
                k as MklInt,
                1.0,
                self.weight.data_ptr() as *const f32,
                self.leading_dim() as MklInt,
                buffer.data_ptr() as *mut f32,
            );
        }
        buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12)
    }

    #[test]
    fn packed_products_match_mm_in_both_orientations_with_and_without_bias() {
        if mkl().is_none() {
            // The x86-64 Linux wheels that `scripts/setup.sh` installs carry MKL: there, not finding it is a bug
            // (a failed lookup would silently keep every product on the plain path).
            let switched_off = std::env::var("IRO_PACKED_GEMM").is_ok_and(|v| v == "0");
            assert!(
                switched_off || !cfg!(all(target_arch = "x86_64", target_os = "linux")),
                "MKL's cblas_sgemm_pack/compute were not found in the loaded libtorch"
            );
            // Elsewhere the plain path is the only one, and `PackedWeight::new` must say so.
            assert!(PackedWeight::new(&Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)), true).is_none());
            return;
        }
        let _g = tch::no_grad_guard();
        tch::manual_seed(3);
        let (k, n) = (96i64, 200i64);
        let hf = Tensor::randn([n, k], (Kind::Float, Device::Cpu)); // [out, in]
        let t = hf.tr().contiguous();
        let bias = Tensor::randn([n], (Kind::Float, Device::Cpu));
        for (weight, transposed) in [(&t, true), (&hf, false)] {
            let p = PackedWeight::new(weight, transposed).expect("MKL is here");
            for m in [MIN_ROWS, 8, MAX_ROWS] {
                let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu));
                for b in [None, Some(&bias)] {
                    let want = x.linear(&hf, b);
                    // The first call with a new row count is the plain path's; the second packs.
                    let _ = p.matmul(&x, b);
                    let got = p.matmul(&x, b).expect("packed on the second call with the same rows");
                    assert_eq!(got.size(), [m, n]);
                    let err = max_rel(&got, &want);
                    assert!(err < 1e-5, "m {m}, transposed {transposed}, bias {}: rel. error {err}", b.is_some());
                }
            }
        }
    }

    #[test]
    fn a_pack_serves_one_row_count_and_moves_when_a_new_one_comes_twice() {
        if mkl().is_none() {
            return; // see the test above
        }
        let _g = tch::no_grad_guard();
        let w = Tensor::randn([32, 48], (Kind::Float, Device::Cpu));
        let p = PackedWeight::new(&w, true).expect("MKL is here");
        let x = |m: i64| Tensor::randn([m, 32], (Kind::Float, Device::Cpu));
        let served = |m: i64| p.matmul(&x(m), None).is_some();
        assert!(!served(1), "a single row is not packed");
        assert!(!served(MAX_ROWS + 1), "beyond MAX_ROWS is not packed");
        assert!(!served(8), "the first call with 8 rows is not packed yet");
        assert!(served(8) && served(8), "8 rows, twice in a row, are packed and stay so");
        assert!(!served(100), "a large call in between goes the plain way");
        assert!(served(8), "… and leaves the pack alone");
        assert!(!served(4) && served(4), "a new row count twice in a row repacks");
        assert!(!served(8), "… so 8 rows are no longer served");
        assert!(!served(8 + 1) && !served(8), "alternating counts never thrash the pack");
        assert!(served(8) && p.matmul(&Tensor::ones([8, 31], (Kind::Float, Device::Cpu)), None).is_none(), "bad width");
        assert!(p.matmul(&Tensor::ones([8, 2, 32], (Kind::Float, Device::Cpu)), None).is_none(), "not a matrix");
        let short_bias = Tensor::ones([47], (Kind::Float, Device::Cpu));
        assert!(p.matmul(&x(8), Some(&short_bias)).is_none(), "a bias of the wrong length goes the plain way");
        let frozen = Tensor::randn([8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!(PackedWeight::new(&frozen, true).is_none(), "a trainable matrix is never packed");
        assert!(PackedWeight::new(&w.to_kind(Kind::BFloat16), true).is_none(), "only f32 is packed");
    }
}
