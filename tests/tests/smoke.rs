mod common;

#[test]
fn loads_through_verifier() {
    if !common::privileged() {
        return;
    }
    let l = common::Loaded::new();
    let (rc, out) = l.run_xdp(&[0u8; 60]);
    assert_eq!(rc, 2);
    assert_eq!(out.len(), 60);
}
