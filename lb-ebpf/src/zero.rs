//! Zeroed values without `memset`. LLVM's BPF backend expands a `memcpy` into loads and
//! stores, but leaves a `memset` a call to compiler-builtins' byte-at-a-time loop: zeroing
//! the 58 bytes of `Headers` that way ran some 250 instructions on every packet. Small
//! arrays are written as literals (`[0, 0, 0]`, not `[0; 3]`), which stay plain stores.

use core::mem::{MaybeUninit, align_of, size_of};

/// `v` with every byte zero, written in place as aligned 8- or 4-byte volatile stores,
/// which LLVM cannot merge back into a `memset` (nor turn into one through a copy).
///
/// # Safety
/// All-zero bytes must be a valid `T` (integers, bools, arrays and structs of them).
#[inline(always)]
pub unsafe fn zeroed<T>(v: &mut MaybeUninit<T>) -> &mut T {
    if const { align_of::<T>() >= 8 && size_of::<T>().is_multiple_of(8) } {
        fill::<T, u64>(v);
    } else {
        const {
            assert!(align_of::<T>() >= 4 && size_of::<T>().is_multiple_of(4), "zeroed: 4-byte words at least")
        };
        fill::<T, u32>(v);
    }
    // SAFETY: every byte was written; the caller vouches that zeros are a valid `T`.
    unsafe { v.assume_init_mut() }
}

#[inline(always)]
fn fill<T, W: Default>(v: &mut MaybeUninit<T>) {
    let words = v.as_mut_ptr().cast::<W>();
    let mut i = 0;
    while i < size_of::<T>() / size_of::<W>() {
        // SAFETY: within `v`, aligned: `T` is at least as aligned as `W` and `i` counts words.
        unsafe { words.add(i).write_volatile(W::default()) };
        i += 1;
    }
}
