//! The gRPC contract between the iro coordinator and its workers: generated from `proto/iro.proto`.

#![allow(clippy::all)] // generated code

pub mod v1 {
    tonic::include_proto!("iro.v1");
}

pub use v1::*;
