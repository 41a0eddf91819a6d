//! A small set kept as a sorted, boxed slice: what a datapath service's frontends and
//! backends are (a handful each). A B-tree set of four backends allocates a 280-byte node;
//! this allocates the four, and a full sync of 100 000 Services builds hundreds of
//! thousands of them.

use std::ops::Deref;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SortedSet<T>(Box<[T]>);

impl<T> Default for SortedSet<T> {
    fn default() -> Self {
        SortedSet(Box::default())
    }
}

impl<T: Ord> SortedSet<T> {
    /// Whether `x` is in the set (a binary search).
    pub fn contains(&self, x: &T) -> bool {
        self.0.binary_search(x).is_ok()
    }

    /// Adds `x`; false if it was there.
    pub fn insert(&mut self, x: T) -> bool {
        let Err(at) = self.0.binary_search(&x) else { return false };
        let mut v = std::mem::take(&mut self.0).into_vec();
        v.insert(at, x);
        self.0 = v.into_boxed_slice();
        true
    }

    /// Keeps the elements `keep` says so of, in order.
    pub fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        let mut v = std::mem::take(&mut self.0).into_vec();
        v.retain(keep);
        self.0 = v.into_boxed_slice();
    }
}

impl<T> Deref for SortedSet<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: Ord> FromIterator<T> for SortedSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut v: Vec<T> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        SortedSet(v.into_boxed_slice())
    }
}

impl<T: Ord, const N: usize> From<[T; N]> for SortedSet<T> {
    fn from(items: [T; N]) -> Self {
        items.into_iter().collect()
    }
}

impl<'a, T> IntoIterator for &'a SortedSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<T> IntoIterator for SortedSet<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sorted_set_is_sorted_without_duplicates() {
        let mut s: SortedSet<u32> = [5, 1, 3, 1].into();
        assert_eq!(&*s, &[1, 3, 5]);
        assert!(s.contains(&3) && !s.contains(&2));
        assert!(s.insert(2) && !s.insert(3));
        assert_eq!(&*s, &[1, 2, 3, 5]);
        s.retain(|x| x % 2 == 1);
        assert_eq!(s.into_iter().collect::<Vec<_>>(), [1, 3, 5]);
    }
}
