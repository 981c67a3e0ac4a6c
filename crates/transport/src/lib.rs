pub mod pb {
    tonic::include_proto!("fedllm.v1");
}
pub mod wire;
