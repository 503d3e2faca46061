//! Drives simulated providers against a minimal fake coordinator on 127.0.0.1 that
//! accepts the WebSocket, reads provider frames and sends coordinator frames.

// clippy's `allow-unwrap-in-tests` covers test functions but not the helpers they
// share here, where a panic is the intended failure too.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail the test by panicking"
)]

use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use switchyard_loadtest::sim::DONE_LINE;
use switchyard_loadtest::{
    Behavior, Fleet, SimProvider, SimProviderConfig, count_prompt_tokens, simulated_completion_text,
};
use switchyard_shared::protocol::{
    AttestationChallenge, Cancel, CoordinatorMessage, InferenceRequest,
};
use switchyard_shared::seal::{KeyPair, PeerKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);
const MODEL: &str = "model-a";
const OTHER_MODEL: &str = "model-b";

struct FakeCoordinator {
    listener: TcpListener,
    url: String,
}

impl FakeCoordinator {
    async fn bind() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws/provider", listener.local_addr().unwrap());
        Self { listener, url }
    }

    async fn accept(&self) -> Connection {
        let (stream, _) = timeout(WAIT, self.listener.accept())
            .await
            .expect("provider did not connect in time")
            .unwrap();
        let socket = tokio_tungstenite::accept_async(stream).await.unwrap();
        Connection { socket }
    }

    /// Accepts a connection and reads its `register` and first heartbeat.
    async fn accept_registered(&self) -> (Connection, Value) {
        let mut connection = self.accept().await;
        let register = connection.recv().await;
        assert_eq!(register["type"], "register");
        let heartbeat = connection.recv().await;
        assert_eq!(heartbeat["type"], "heartbeat");
        (connection, register)
    }
}

struct Connection {
    socket: WebSocketStream<TcpStream>,
}

impl Connection {
    /// Returns the next frame, or `None` when the stream ends.
    async fn next_frame(&mut self) -> Option<Result<Message, String>> {
        timeout(WAIT, self.socket.next())
            .await
            .expect("no frame from provider in time")
            .map(|frame| frame.map_err(|error| error.to_string()))
    }

    /// Returns the next text frame as JSON.
    async fn recv(&mut self) -> Value {
        loop {
            match self.next_frame().await {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Returns the next text frame that is not a heartbeat.
    async fn recv_skipping_heartbeats(&mut self) -> Value {
        loop {
            let message = self.recv().await;
            if message["type"] != "heartbeat" {
                return message;
            }
        }
    }

    /// Asserts that nothing but heartbeats arrives for `period`.
    async fn expect_only_heartbeats_for(&mut self, period: Duration) {
        let deadline = Instant::now() + period;
        while let Ok(frame) = tokio::time::timeout_at(deadline, self.socket.next()).await {
            let Some(Ok(Message::Text(text))) = frame else {
                panic!("expected only heartbeats, got {frame:?}");
            };
            let message: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(message["type"], "heartbeat", "unexpected message {message}");
        }
    }

    async fn send(&mut self, message: &CoordinatorMessage) {
        self.socket
            .send(Message::text(message.to_json()))
            .await
            .unwrap();
    }

    /// Seals `body` to the provider with a fresh per-request key pair, sends it and
    /// returns that key pair.
    async fn send_request(
        &mut self,
        provider_key: &str,
        request_id: &str,
        body: &Value,
    ) -> KeyPair {
        let session = KeyPair::generate();
        let provider = PeerKey::from_base64(provider_key).unwrap();
        let encrypted_body = session.seal(&provider, body.to_string().as_bytes());
        let request = CoordinatorMessage::InferenceRequest(InferenceRequest {
            request_id: request_id.to_owned(),
            encrypted_body,
        });
        self.send(&request).await;
        session
    }

    /// Reads `inference_accepted` and then every chunk of `request_id` up to its
    /// `inference_complete` or `inference_error`.
    async fn collect_response(&mut self, request_id: &str) -> Response {
        let accepted = self.recv_skipping_heartbeats().await;
        assert_eq!(
            accepted,
            json!({ "type": "inference_accepted", "request_id": request_id })
        );

        let mut chunks = Vec::new();
        loop {
            let message = self.recv_skipping_heartbeats().await;
            assert_eq!(message["request_id"], request_id, "message {message}");
            if message["type"] == "inference_response_chunk" {
                chunks.push(message);
            } else {
                return Response {
                    chunks,
                    end: message,
                };
            }
        }
    }
}

struct Response {
    chunks: Vec<Value>,
    /// The `inference_complete` or `inference_error` message.
    end: Value,
}

impl Response {
    /// Opens every chunk with the request's key pair and returns the plaintexts.
    fn open(&self, session: &KeyPair, provider_key: &str) -> Vec<String> {
        self.chunks
            .iter()
            .map(|chunk| open_chunk(session, provider_key, chunk))
            .collect()
    }
}

fn open_chunk(session: &KeyPair, provider_key: &str, chunk: &Value) -> String {
    assert!(
        chunk.get("data").is_none(),
        "sealed chunk also carries `data`: {chunk}"
    );
    let sealed = &chunk["encrypted_data"];
    assert_eq!(sealed["ephemeral_public_key"], provider_key);
    let provider = PeerKey::from_base64(provider_key).unwrap();
    let plaintext = session
        .open(&provider, sealed["ciphertext"].as_str().unwrap())
        .unwrap();
    String::from_utf8(plaintext).unwrap()
}

fn sse_json(line: &str) -> Value {
    let json = line
        .strip_prefix("data: ")
        .expect("chunk is an SSE data line");
    serde_json::from_str(json).unwrap()
}

fn expected_hash(request_id: &str, completion_tokens: u64, body: &str) -> String {
    let digest = Sha256::digest(format!("{request_id}:{completion_tokens}:{body}").as_bytes());
    hex::encode(digest)
}

fn config(url: &str) -> SimProviderConfig {
    let mut config = SimProviderConfig::new(url, vec![MODEL.to_owned(), OTHER_MODEL.to_owned()]);
    config.name = "test-provider".to_owned();
    config.heartbeat_interval = Duration::from_secs(60);
    config.completion_tokens = 5;
    config.reconnect = false;
    config
}

fn chat_body(stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [
            { "role": "system", "content": "be brief" },
            { "role": "user", "content": "say something short" },
        ],
        "stream": stream,
        "max_tokens": 100,
    })
}

async fn wait_for<F: FnMut(&switchyard_loadtest::SimStats) -> bool>(
    provider: &SimProvider,
    condition: F,
) {
    timeout(WAIT, provider.wait_until(condition))
        .await
        .expect("provider counters did not reach the expected state in time");
}

#[tokio::test]
async fn register_frame_shape() {
    let coordinator = FakeCoordinator::bind().await;
    let mut config = config(&coordinator.url);
    config.auth_token = Some("test-token".to_owned());
    let provider = SimProvider::spawn(config);

    let mut connection = coordinator.accept().await;
    let register = connection.recv().await;

    assert_eq!(register["type"], "register");
    assert_eq!(register["backend"], "inprocess-mlx");
    assert_eq!(register["version"], "0.4.7");
    assert_eq!(register["encrypted_response_chunks"], true);
    assert_eq!(register["auth_token"], "test-token");

    let public_key = register["public_key"].as_str().unwrap();
    assert_eq!(public_key.len(), 44);
    assert_eq!(public_key, provider.public_key());
    PeerKey::from_base64(public_key).expect("public key is base64 of 32 bytes");

    let model_ids: Vec<&str> = register["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|model| model["id"].as_str().unwrap())
        .collect();
    assert_eq!(model_ids, [MODEL, OTHER_MODEL]);

    let capabilities = register["privacy_capabilities"].as_object().unwrap();
    assert_eq!(capabilities.len(), 9);
    for (name, value) in capabilities {
        let expected = name != "hypervisor_active";
        assert_eq!(value, expected, "privacy capability {name}");
    }

    assert_eq!(register["hardware"]["chip_family"], "M4");
    assert_eq!(register["hardware"]["memory_gb"], 128);
    assert!(register.get("attestation").is_none());

    wait_for(&provider, |stats| {
        stats.registrations == 1 && stats.connected
    })
    .await;
}

#[tokio::test]
async fn first_heartbeat_reports_idle_slots() {
    let coordinator = FakeCoordinator::bind().await;
    let _provider = SimProvider::spawn(config(&coordinator.url));

    let mut connection = coordinator.accept().await;
    connection.recv().await;
    let heartbeat = connection.recv().await;

    assert_eq!(heartbeat["type"], "heartbeat");
    assert_eq!(heartbeat["status"], "idle");
    assert_eq!(heartbeat["active_model"], MODEL);
    assert_eq!(heartbeat["warm_models"], json!([MODEL, OTHER_MODEL]));
    assert_eq!(
        heartbeat["stats"],
        json!({ "requests_served": 0, "tokens_generated": 0 })
    );
    assert_eq!(heartbeat["system_metrics"]["thermal_state"], "nominal");

    let slots = heartbeat["backend_capacity"]["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 2);
    for (slot, model) in slots.iter().zip([MODEL, OTHER_MODEL]) {
        assert_eq!(slot["model"], model);
        assert_eq!(slot["state"], "running");
        assert_eq!(slot["num_running"], 0);
    }
    assert_eq!(heartbeat["backend_capacity"]["total_memory_gb"], 128.0);
}

#[tokio::test]
async fn heartbeats_repeat_at_interval() {
    let coordinator = FakeCoordinator::bind().await;
    let mut config = config(&coordinator.url);
    config.heartbeat_interval = Duration::from_millis(50);
    let provider = SimProvider::spawn(config);

    let (mut connection, _) = coordinator.accept_registered().await;
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(connection.recv().await["type"], "heartbeat");
    }

    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "heartbeats came too fast"
    );
    assert!(provider.stats().heartbeats_sent >= 4);
}

#[tokio::test]
async fn challenge_answer_echoes_nonce() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, register) = coordinator.accept_registered().await;

    let nonce = "bm9uY2Utbm9uY2Utbm9uY2Utbm9uY2Utbm9uY2UtMTI=";
    let challenge = CoordinatorMessage::AttestationChallenge(AttestationChallenge {
        nonce: nonce.to_owned(),
        timestamp: "2026-05-01T10:00:00Z".to_owned(),
    });
    connection.send(&challenge).await;
    let response = connection.recv_skipping_heartbeats().await;

    assert_eq!(response["type"], "attestation_response");
    assert_eq!(response["nonce"], nonce);
    assert_eq!(response["signature"], "");
    assert_eq!(response["public_key"], register["public_key"]);
    assert_eq!(response["sip_enabled"], true);
    assert_eq!(response["rdma_disabled"], true);
    assert_eq!(response["secure_boot_enabled"], true);
    assert_eq!(response["hypervisor_active"], false);
    assert_eq!(provider.stats().challenges_answered, 1);
}

#[tokio::test]
async fn streaming_request_returns_sealed_chunks() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;
    let provider_key = provider.public_key().to_owned();

    let body = chat_body(true);
    let session = connection
        .send_request(&provider_key, "req-stream", &body)
        .await;
    let response = connection.collect_response("req-stream").await;
    let lines = response.open(&session, &provider_key);

    // Role chunk, 5 token chunks, finish chunk, [DONE].
    assert_eq!(lines.len(), 8, "lines {lines:?}");
    let role = sse_json(&lines[0]);
    assert_eq!(role["object"], "chat.completion.chunk");
    assert_eq!(role["id"], "chatcmpl-req-stream");
    assert_eq!(role["model"], MODEL);
    assert_eq!(
        role["choices"][0]["delta"],
        json!({ "role": "assistant", "content": "" })
    );

    let text: String = lines[1..6]
        .iter()
        .map(|line| {
            sse_json(line)["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(text, simulated_completion_text(5));
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");

    let finish = sse_json(&lines[6]);
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(lines[7], DONE_LINE);

    let prompt_tokens = count_prompt_tokens(&body);
    assert_eq!(prompt_tokens, 4 + 2 + 4 + 3);
    let complete = &response.end;
    assert_eq!(complete["type"], "inference_complete");
    assert_eq!(
        complete["usage"],
        json!({ "prompt_tokens": prompt_tokens, "completion_tokens": 5 })
    );
    assert!(complete.get("se_signature").is_none());
    let hashed_body = lines[..7].concat();
    assert_eq!(
        complete["response_hash"],
        expected_hash("req-stream", 5, &hashed_body)
    );

    let stats = provider.stats();
    assert_eq!(stats.requests_received, 1);
    assert_eq!(stats.completed, 1);
    assert_eq!(stats.tokens_generated, 5);
    wait_for(&provider, |stats| stats.in_flight == 0).await;
}

#[tokio::test]
async fn stream_usage_chunk_on_request() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;
    let provider_key = provider.public_key().to_owned();

    let mut body = chat_body(true);
    body["stream_options"] = json!({ "include_usage": true });
    let session = connection
        .send_request(&provider_key, "req-usage", &body)
        .await;
    let lines = connection
        .collect_response("req-usage")
        .await
        .open(&session, &provider_key);

    assert_eq!(lines.len(), 9, "lines {lines:?}");
    let usage = sse_json(&lines[7]);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(usage["usage"]["prompt_tokens"], count_prompt_tokens(&body));
    assert_eq!(lines[8], DONE_LINE);
}

#[tokio::test]
async fn non_streaming_returns_one_completion() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;
    let provider_key = provider.public_key().to_owned();

    let body = chat_body(false);
    let session = connection
        .send_request(&provider_key, "req-whole", &body)
        .await;
    let response = connection.collect_response("req-whole").await;
    let lines = response.open(&session, &provider_key);

    assert_eq!(lines.len(), 1, "lines {lines:?}");
    let completion = sse_json(&lines[0]);
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["model"], MODEL);
    assert_eq!(completion["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        simulated_completion_text(5)
    );
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");
    let prompt_tokens = count_prompt_tokens(&body);
    let expected_usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
    });
    assert_eq!(completion["usage"], expected_usage);

    assert_eq!(response.end["type"], "inference_complete");
    assert_eq!(response.end["usage"]["completion_tokens"], 5);
    assert_eq!(
        response.end["response_hash"],
        expected_hash("req-whole", 5, &lines[0])
    );
}

#[tokio::test]
async fn max_tokens_caps_completion() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;
    let provider_key = provider.public_key().to_owned();

    let mut body = chat_body(false);
    body["max_tokens"] = json!(2);
    let session = connection
        .send_request(&provider_key, "req-short", &body)
        .await;
    let response = connection.collect_response("req-short").await;
    let lines = response.open(&session, &provider_key);

    let completion = sse_json(&lines[0]);
    assert_eq!(completion["choices"][0]["message"]["content"], "tok0 tok1 ");
    assert_eq!(response.end["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn concurrent_requests_both_complete() {
    let coordinator = FakeCoordinator::bind().await;
    let mut config = config(&coordinator.url);
    config.token_rate = 200.0;
    let provider = SimProvider::spawn(config);
    let (mut connection, _) = coordinator.accept_registered().await;
    let provider_key = provider.public_key().to_owned();

    let first = connection
        .send_request(&provider_key, "req-1", &chat_body(true))
        .await;
    let second = connection
        .send_request(&provider_key, "req-2", &chat_body(true))
        .await;
    wait_for(&provider, |stats| stats.in_flight == 2).await;

    let mut lines: [Vec<String>; 2] = Default::default();
    let mut completed = 0;
    while completed < 2 {
        let message = connection.recv_skipping_heartbeats().await;
        let (index, session) = match message["request_id"].as_str().unwrap() {
            "req-1" => (0, &first),
            "req-2" => (1, &second),
            other => panic!("unexpected request id {other}"),
        };
        match message["type"].as_str().unwrap() {
            "inference_accepted" => {}
            "inference_response_chunk" => {
                lines[index].push(open_chunk(session, &provider_key, &message))
            }
            "inference_complete" => completed += 1,
            other => panic!("unexpected message type {other}"),
        }
    }

    for request_lines in &lines {
        assert_eq!(request_lines.len(), 8);
        assert_eq!(request_lines[7], DONE_LINE);
    }
    assert_eq!(provider.stats().completed, 2);
}

#[tokio::test]
async fn token_rate_paces_chunks() {
    let coordinator = FakeCoordinator::bind().await;
    let mut config = config(&coordinator.url);
    config.token_rate = 50.0;
    let provider = SimProvider::spawn(config);
    let (mut connection, _) = coordinator.accept_registered().await;

    let started = Instant::now();
    connection
        .send_request(provider.public_key(), "req-paced", &chat_body(true))
        .await;
    let response = connection.collect_response("req-paced").await;

    // 5 tokens at 50 per second are due after 100 ms.
    assert_eq!(response.end["type"], "inference_complete");
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn cancel_stops_generation() {
    let coordinator = FakeCoordinator::bind().await;
    let mut config = config(&coordinator.url);
    config.token_rate = 20.0;
    config.completion_tokens = 200;
    let provider = SimProvider::spawn(config);
    let (mut connection, _) = coordinator.accept_registered().await;
    let provider_key = provider.public_key().to_owned();

    connection
        .send_request(&provider_key, "req-cancel", &chat_body(true))
        .await;
    assert_eq!(
        connection.recv_skipping_heartbeats().await["type"],
        "inference_accepted"
    );
    assert_eq!(
        connection.recv_skipping_heartbeats().await["type"],
        "inference_response_chunk"
    );

    let cancel = CoordinatorMessage::Cancel(Cancel {
        request_id: "req-cancel".to_owned(),
    });
    connection.send(&cancel).await;
    timeout(WAIT, provider.wait_for_cancel("req-cancel"))
        .await
        .unwrap();
    wait_for(&provider, |stats| {
        stats.stopped_by_cancel == 1 && stats.in_flight == 0
    })
    .await;

    // At most one chunk was already queued when the cancel arrived.
    let deadline = Instant::now() + Duration::from_millis(300);
    let mut late_chunks = 0;
    while let Ok(frame) = tokio::time::timeout_at(deadline, connection.socket.next()).await {
        let Some(Ok(Message::Text(text))) = frame else {
            panic!("unexpected frame {frame:?}");
        };
        let message: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            message["type"], "inference_response_chunk",
            "message {message}"
        );
        late_chunks += 1;
    }
    assert!(late_chunks <= 1, "{late_chunks} chunks after cancel");

    let stats = provider.stats();
    assert_eq!(stats.cancelled_request_ids, ["req-cancel"]);
    assert_eq!(stats.completed, 0);
}

#[tokio::test]
async fn cancel_for_unknown_request_recorded() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;

    let cancel = CoordinatorMessage::Cancel(Cancel {
        request_id: "never-sent".to_owned(),
    });
    connection.send(&cancel).await;

    timeout(WAIT, provider.wait_for_cancel("never-sent"))
        .await
        .unwrap();
    assert_eq!(provider.stats().stopped_by_cancel, 0);
}

#[tokio::test]
async fn fail_before_first_chunk_sends_error() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;
    let provider_key = provider.public_key().to_owned();

    provider.set_behavior(Behavior::FailBeforeFirstChunk { status_code: 503 });
    connection
        .send_request(&provider_key, "req-fail", &chat_body(true))
        .await;
    let response = connection.collect_response("req-fail").await;

    assert!(response.chunks.is_empty());
    assert_eq!(response.end["type"], "inference_error");
    assert_eq!(response.end["status_code"], 503);
    assert!(!response.end["error"].as_str().unwrap().is_empty());
    assert_eq!(provider.stats().errors_sent, 1);

    // The next request uses the behavior set in between.
    provider.set_behavior(Behavior::Normal);
    connection
        .send_request(&provider_key, "req-after", &chat_body(true))
        .await;
    let response = connection.collect_response("req-after").await;
    assert_eq!(response.end["type"], "inference_complete");
}

#[tokio::test]
async fn unknown_model_returns_not_found() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;

    let mut body = chat_body(true);
    body["model"] = json!("other-vendor/unknown");
    connection
        .send_request(provider.public_key(), "req-404", &body)
        .await;
    let response = connection.collect_response("req-404").await;

    assert!(response.chunks.is_empty());
    assert_eq!(response.end["type"], "inference_error");
    assert_eq!(response.end["status_code"], 404);
}

#[tokio::test]
async fn drop_after_chunks_closes_socket() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;
    let provider_key = provider.public_key().to_owned();

    provider.set_behavior(Behavior::DropAfterChunks(2));
    let session = connection
        .send_request(&provider_key, "req-drop", &chat_body(true))
        .await;
    assert_eq!(
        connection.recv_skipping_heartbeats().await["type"],
        "inference_accepted"
    );

    // The role chunk, then two content chunks.
    let mut lines = Vec::new();
    for _ in 0..3 {
        let chunk = connection.recv_skipping_heartbeats().await;
        assert_eq!(chunk["type"], "inference_response_chunk");
        lines.push(open_chunk(&session, &provider_key, &chunk));
    }
    assert_eq!(
        sse_json(&lines[2])["choices"][0]["delta"]["content"],
        "tok1 "
    );

    match connection.next_frame().await {
        None | Some(Err(_)) => {}
        Some(Ok(frame)) => panic!("expected the connection to drop, got {frame:?}"),
    }
    wait_for(&provider, |stats| {
        stats.connections_dropped == 1 && !stats.connected
    })
    .await;
    assert_eq!(provider.stats().completed, 0);
}

#[tokio::test]
async fn drop_after_whole_response_skips_complete() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;

    provider.set_behavior(Behavior::DropAfterChunks(1));
    connection
        .send_request(provider.public_key(), "req-drop-whole", &chat_body(false))
        .await;
    assert_eq!(
        connection.recv_skipping_heartbeats().await["type"],
        "inference_accepted"
    );
    assert_eq!(
        connection.recv_skipping_heartbeats().await["type"],
        "inference_response_chunk"
    );

    match connection.next_frame().await {
        None | Some(Err(_)) => {}
        Some(Ok(frame)) => panic!("expected the connection to drop, got {frame:?}"),
    }
}

#[tokio::test]
async fn plaintext_chunks_use_data_field() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;

    provider.set_behavior(Behavior::PlaintextChunks);
    connection
        .send_request(provider.public_key(), "req-plain", &chat_body(true))
        .await;
    let response = connection.collect_response("req-plain").await;

    assert_eq!(response.chunks.len(), 8);
    for chunk in &response.chunks {
        assert!(chunk.get("encrypted_data").is_none(), "chunk {chunk}");
        assert!(chunk["data"].as_str().unwrap().starts_with("data: "));
    }
    assert_eq!(response.chunks[7]["data"], DONE_LINE);
    assert_eq!(response.end["type"], "inference_complete");
}

#[tokio::test]
async fn stall_reports_serving_until_cancel() {
    let coordinator = FakeCoordinator::bind().await;
    let mut config = config(&coordinator.url);
    config.heartbeat_interval = Duration::from_millis(50);
    let provider = SimProvider::spawn(config);
    let (mut connection, _) = coordinator.accept_registered().await;

    provider.set_behavior(Behavior::Stall);
    let mut body = chat_body(true);
    body["model"] = json!(OTHER_MODEL);
    connection
        .send_request(provider.public_key(), "req-stall", &body)
        .await;
    assert_eq!(
        connection.recv_skipping_heartbeats().await["type"],
        "inference_accepted"
    );

    let heartbeat = connection.recv().await;
    assert_eq!(heartbeat["type"], "heartbeat");
    assert_eq!(heartbeat["status"], "serving");
    assert_eq!(heartbeat["active_model"], OTHER_MODEL);
    let slots = &heartbeat["backend_capacity"]["slots"];
    assert_eq!(slots[0]["num_running"], 0);
    assert_eq!(slots[1]["num_running"], 1);
    connection
        .expect_only_heartbeats_for(Duration::from_millis(200))
        .await;

    let cancel = CoordinatorMessage::Cancel(Cancel {
        request_id: "req-stall".to_owned(),
    });
    connection.send(&cancel).await;
    wait_for(&provider, |stats| {
        stats.stopped_by_cancel == 1 && stats.in_flight == 0
    })
    .await;

    let heartbeat = connection.recv().await;
    let heartbeat = if heartbeat["status"] == "serving" {
        // Sent before the cancel took effect.
        connection.recv().await
    } else {
        heartbeat
    };
    assert_eq!(heartbeat["status"], "idle");
}

#[tokio::test]
async fn undecryptable_request_gets_no_reply() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;

    // Sealed to a key that is not the provider's.
    let stranger = KeyPair::generate().public_base64();
    connection
        .send_request(&stranger, "req-wrong-key", &chat_body(true))
        .await;

    wait_for(&provider, |stats| stats.requests_undecryptable == 1).await;
    connection
        .expect_only_heartbeats_for(Duration::from_millis(200))
        .await;
    let stats = provider.stats();
    assert_eq!(stats.requests_received, 1);
    assert_eq!(stats.in_flight, 0);
}

#[tokio::test]
async fn reconnects_after_close_frame() {
    let coordinator = FakeCoordinator::bind().await;
    let mut config = config(&coordinator.url);
    config.reconnect = true;
    config.reconnect_initial_delay = Duration::from_millis(20);
    let provider = SimProvider::spawn(config);

    let (mut first, first_register) = coordinator.accept_registered().await;
    first
        .socket
        .close(Some(CloseFrame {
            code: CloseCode::Library(4001),
            reason: "evicted".into(),
        }))
        .await
        .unwrap();

    let (_second, second_register) = coordinator.accept_registered().await;
    assert_eq!(second_register["public_key"], first_register["public_key"]);
    wait_for(&provider, |stats| {
        stats.registrations == 2 && stats.connected
    })
    .await;
    let stats = provider.stats();
    assert_eq!(stats.last_close_code, Some(4001));
    assert_eq!(stats.connections, 2);
}

#[tokio::test]
async fn no_reconnect_when_disabled() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));

    let (mut connection, _) = coordinator.accept_registered().await;
    connection.socket.close(None).await.unwrap();

    timeout(WAIT, async {
        while provider.is_running() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("provider kept running after its connection closed");
    assert_eq!(provider.stats().connections, 1);
}

#[tokio::test]
async fn stop_sends_normal_close() {
    let coordinator = FakeCoordinator::bind().await;
    let provider = SimProvider::spawn(config(&coordinator.url));
    let (mut connection, _) = coordinator.accept_registered().await;

    timeout(WAIT, provider.stop()).await.unwrap();

    match connection.next_frame().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn fleet_registers_each_provider() {
    let coordinator = FakeCoordinator::bind().await;
    let shutdown = CancellationToken::new();
    let fleet = Fleet::spawn(&config(&coordinator.url), 3, &shutdown);

    let mut keys = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..3 {
        let (connection, register) = coordinator.accept_registered().await;
        keys.push(register["public_key"].as_str().unwrap().to_owned());
        connections.push(connection);
    }
    timeout(WAIT, fleet.wait_registered()).await.unwrap();

    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 3, "providers share a key");
    let names: Vec<&str> = fleet.providers().iter().map(SimProvider::name).collect();
    assert_eq!(
        names,
        ["test-provider-0", "test-provider-1", "test-provider-2"]
    );
    let summary = fleet.summary();
    assert_eq!(summary.providers, 3);
    assert_eq!(summary.connected, 3);
    assert_eq!(summary.registrations, 3);

    shutdown.cancel();
    timeout(WAIT, fleet.stop()).await.unwrap();
    for connection in &mut connections {
        match connection.next_frame().await {
            Some(Ok(Message::Close(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}
