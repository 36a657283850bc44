//! Generates the server side of containerd's `containerd.services.snapshots.v1.Snapshots`
//! gRPC service with tonic-build's manual builder, over the message types `containerd-client`
//! already generates (it builds clients only). No protoc is needed for this crate itself.

use tonic_build::manual::{Builder, MethodBuilder, Service};

const TYPES: &str = "::containerd_client::services::v1::snapshots";

fn method(name: &str, route: &str, input: &str, output: &str) -> MethodBuilder {
    let path = |t: &str| {
        if t == "Empty" {
            // `google.protobuf.Empty` is `()` for prost; a path is needed here.
            "crate::grpc::Empty".to_string()
        } else {
            format!("{TYPES}::{t}")
        }
    };
    tonic_build::manual::Method::builder()
        .name(name)
        .route_name(route)
        .input_type(path(input))
        .output_type(path(output))
        .codec_path("::tonic_prost::ProstCodec")
}

fn main() {
    let unary = |n: &str, r: &str, i: &str, o: &str| method(n, r, i, o).build();
    let service = Service::builder()
        .name("Snapshots")
        .package("containerd.services.snapshots.v1")
        .method(unary(
            "prepare",
            "Prepare",
            "PrepareSnapshotRequest",
            "PrepareSnapshotResponse",
        ))
        .method(unary(
            "view",
            "View",
            "ViewSnapshotRequest",
            "ViewSnapshotResponse",
        ))
        .method(unary("mounts", "Mounts", "MountsRequest", "MountsResponse"))
        .method(unary("commit", "Commit", "CommitSnapshotRequest", "Empty"))
        .method(unary("remove", "Remove", "RemoveSnapshotRequest", "Empty"))
        .method(unary(
            "stat",
            "Stat",
            "StatSnapshotRequest",
            "StatSnapshotResponse",
        ))
        .method(unary(
            "update",
            "Update",
            "UpdateSnapshotRequest",
            "UpdateSnapshotResponse",
        ))
        .method(
            method(
                "list",
                "List",
                "ListSnapshotsRequest",
                "ListSnapshotsResponse",
            )
            .server_streaming()
            .build(),
        )
        .method(unary("usage", "Usage", "UsageRequest", "UsageResponse"))
        .method(unary("cleanup", "Cleanup", "CleanupRequest", "Empty"))
        .build();
    Builder::new()
        .build_client(false)
        .build_server(true)
        .build_transport(false)
        .compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
