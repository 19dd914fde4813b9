//! flow's singular values (faer) against numpy's LAPACK on fixtures written once by
//! tests/fixtures/make_svd_fixtures.py, and rank@90 on a matrix with a known spectrum.

use std::path::Path;

use flow_stages::svd::spectrum::{rank_at, singular_values};
use safetensors::SafeTensors;

fn f32s(st: &SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>) {
    let v = st.tensor(name).unwrap();
    let data = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (data, v.shape().to_vec())
}

#[test]
fn singular_values_match_numpy_lapack() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/svd/matrices.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let mut checked = 0;
    for name in st.names() {
        if name.starts_with("sv.") {
            continue;
        }
        let (m, shape) = f32s(&st, name);
        let (want, _) = f32s(&st, &format!("sv.{name}"));
        for threads in [1, 2] {
            let got = singular_values(&m, shape[0], shape[1], threads);
            assert_eq!(got.len(), want.len());
            let max = want[0];
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // 1e-5 relative; values far below sigma_max can only be known to f32's
                // backward error, eps * sigma_max (Weyl), in any f32 SVD, LAPACK's included.
                let tol = (1e-5 * w).max(8.0 * f32::EPSILON * max);
                assert!((g - w).abs() <= tol, "{name} sigma_{i}: {g} vs numpy {w}");
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 5);
    let (known, shape) = f32s(&st, "known");
    let sv = singular_values(&known, shape[0], shape[1], 2);
    let want: usize = meta["rank90"].parse().unwrap();
    let want_plain: usize = meta["rank90_plain"].parse().unwrap();
    assert_eq!(rank_at(&sv, 0.9, true), want);
    assert_eq!(rank_at(&sv, 0.9, false), want_plain);
    assert_eq!((want, want_plain), (6, 11));
}
