//! The server's bookkeeping through real gRPC calls on loopback: a retried upload is
//! acknowledged once and aggregated once; an upload after the round closed is refused.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use fedllm_fl::config::DistributedCfg;
use fedllm_fl::message::{ToClient, ToServer};
use fedllm_fl::params::ParamSet;
use fedllm_fl::strategy::FitConfig;
use fedllm_fl::Remote;
use fedllm_transport::pb::federation_client::FederationClient;
use fedllm_transport::pb::{
    frame::Body, Frame, JoinRequest, PullRequest, ResultHeader, ResultKind, TaskKind,
};
use fedllm_transport::server::{serve, ServeOptions};
use fedllm_transport::wire::{tensor_frames, WireOpts};

type Client = FederationClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

/// A raw gRPC client speaking as client 0.
async fn connect(url: String) -> Client {
    let ch = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    fn as_client_0(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut()
            .insert("x-fedllm-client", "0".parse().unwrap());
        Ok(r)
    }
    FederationClient::with_interceptor(ch, as_client_0 as fn(_) -> _)
}

#[test]
fn retried_upload_counts_once_and_late_upload_is_refused() {
    let params: ParamSet = BTreeMap::from([(
        "w".to_string(),
        Tensor::from_vec(vec![1f32, 2., 3., 4.], (2, 2), &Device::Cpu).unwrap(),
    )]);
    let d = DistributedCfg {
        listen: "127.0.0.1:0".into(),
        round_timeout_s: 20.0,
        ..Default::default()
    };
    let log: fedllm_transport::server::Log = Arc::new(|l: &str| eprintln!("server: {l}"));
    let mut remote = serve(
        &d,
        ServeOptions {
            run: "r1".into(),
            client_num: 2,
            expect: params.clone(),
            log,
        },
    )
    .unwrap();
    let url = format!("http://{}", remote.addr);
    let p2 = params.clone();
    // The client side, by hand: join, pull the task, push the same result three times.
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut c = connect(url).await;
            c.join(JoinRequest {
                client: 0,
                run: String::new(),
            })
            .await
            .unwrap();
            let mut s = c
                .pull(PullRequest {
                    run: "r1".into(),
                    client: 0,
                    wait_ms: 10_000,
                })
                .await
                .unwrap()
                .into_inner();
            let head = match s.message().await.unwrap().unwrap().body {
                Some(Body::Task(h)) => h,
                b => panic!("{b:?}"),
            };
            assert_eq!(head.kind, TaskKind::Fit as i32);
            while s.message().await.unwrap().is_some() {}
            let upload = |round: u32| {
                let mut frames = vec![Frame {
                    body: Some(Body::Result(ResultHeader {
                        run: "r1".into(),
                        client: 0,
                        round,
                        kind: ResultKind::FitRes as i32,
                        num_samples: 3,
                        metrics: ["train_loss", "train_tokens", "steps", "nan_skipped"]
                            .iter()
                            .map(|k| (k.to_string(), 1.0))
                            .collect(),
                        tensors: 1,
                        ..Default::default()
                    })),
                }];
                frames.extend(tensor_frames("w", &p2["w"], &WireOpts::raw()).unwrap());
                tokio_stream::iter(frames)
            };
            let mut replies = Vec::new();
            for _ in 0..3 {
                replies.push(c.push(upload(head.round)).await.unwrap().into_inner());
            }
            replies
        })
    });
    remote.wait_for_clients(1).unwrap();
    let got = remote
        .exchange(
            1,
            vec![
                (
                    0,
                    ToClient::Fit {
                        round: 1,
                        params: params.clone(),
                        config: FitConfig::default(),
                        seed: 1,
                    },
                ),
                (
                    1,
                    ToClient::Fit {
                        round: 1,
                        params: params.clone(),
                        config: FitConfig::default(),
                        seed: 2,
                    },
                ),
            ],
            1,
        )
        .unwrap();
    let replies = client.join().unwrap();
    assert_eq!(got.len(), 1, "one result, although uploaded three times");
    assert!(matches!(&got[0], ToServer::FitRes { round: 1, result } if result.client == 0));
    // The round closed after the first upload (min_received = 1): the retries arrive after it.
    // Each retry is acknowledged as a duplicate, never queued again.
    assert!(replies[0].accepted, "{replies:?}");
    assert!(
        replies[1..]
            .iter()
            .all(|r| r.accepted && r.reason.contains("duplicate")),
        "{replies:?}"
    );
    // The next round: nothing was left over from the retries.
    let late = remote.exchange(2, vec![], 0).unwrap();
    assert!(late.is_empty());
    // Round 1's result again, now that round 2 has been opened: refused as late.
    let url = format!("http://{}", remote.addr);
    let reply = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = connect(url).await;
        let frames = vec![Frame {
            body: Some(Body::Result(ResultHeader {
                run: "r1".into(),
                client: 0,
                round: 1,
                kind: ResultKind::Failed as i32,
                reason: "late".into(),
                ..Default::default()
            })),
        }];
        c.push(tokio_stream::iter(frames))
            .await
            .unwrap()
            .into_inner()
    });
    assert!(
        !reply.accepted && reply.reason.contains("late or stray"),
        "{reply:?}"
    );
}
