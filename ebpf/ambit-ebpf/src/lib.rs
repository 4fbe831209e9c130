//! Host-side placeholder: the programs live in `src/main.rs` and only build for the bpf target
//! (agent/build.rs does that with aya-build). This empty library lets the agent name the crate as
//! a build dependency, so cargo rebuilds the agent when the programs change.
#![no_std]
