//! A sorted `Vec` as a small set: what the agent keeps per object (a Service's slices, the
//! files defining an object) is one or two items, where a `BTreeSet` allocates a node of
//! eleven (over 500 bytes for a pair of strings).

/// Inserts `x` in order; false if it was there.
pub fn insert<T: Ord>(v: &mut Vec<T>, x: T) -> bool {
    match v.binary_search(&x) {
        Ok(_) => false,
        Err(at) => {
            // Most sets hold one item for good: room for exactly that one, where the first
            // push would make room for four.
            if v.is_empty() {
                v.reserve_exact(1);
            }
            v.insert(at, x);
            true
        }
    }
}

/// Removes `x`; false if it was not there.
pub fn remove<T: Ord + ?Sized, U: std::borrow::Borrow<T> + Ord>(v: &mut Vec<U>, x: &T) -> bool {
    match v.binary_search_by(|e| e.borrow().cmp(x)) {
        Ok(at) => {
            v.remove(at);
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stays_sorted_and_distinct() {
        let mut v = Vec::new();
        assert!(super::insert(&mut v, "b") && super::insert(&mut v, "a") && !super::insert(&mut v, "b"));
        assert_eq!(v, ["a", "b"]);
        assert!(super::remove(&mut v, &"a") && !super::remove(&mut v, &"a"));
        assert_eq!(v, ["b"]);
    }
}
