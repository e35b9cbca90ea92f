//! Generates Rust code for the protocol files with protoc (installed by
//! `scripts/setup.sh` from Debian's `protobuf-compiler`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/apache/rocketmq/v2/definition.proto",
        "proto/apache/rocketmq/v2/service.proto",
        "proto/apache/rocketmq/v2/admin.proto",
        "proto/raftmq/raft.proto",
        "proto/raftmq/store.proto",
        "proto/raftmq/admin.proto",
        "proto/raftmq/namesrv.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().bytes(".raftmq").compile_protos(&protos, &["proto"])?;
    Ok(())
}
