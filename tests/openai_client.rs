//! The official OpenAI client library against an in-process cluster: streaming and
//! non-streaming chat completions, their text and usage, and what they cost.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessageArgs,
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions,
    CreateChatCompletionRequestArgs,
};
use futures::StreamExt;
use serde_json::json;
use switchyard_loadtest::sim::{count_prompt_tokens, simulated_completion_text};
use switchyard_shared::money::FeeSplit;

use common::MODEL;

const SYSTEM: &str = "You are a concise assistant.";
const USER: &str = "Name three colors of the rainbow";
const MAX_TOKENS: u32 = 12;

fn client(cluster: &switchyard::dev::DevCluster) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(&cluster.base_url)
            .with_api_key(&cluster.api_key),
    )
}

fn messages() -> Vec<ChatCompletionRequestMessage> {
    vec![
        ChatCompletionRequestSystemMessageArgs::default()
            .content(SYSTEM)
            .build()
            .unwrap()
            .into(),
        ChatCompletionRequestUserMessageArgs::default()
            .content(USER)
            .build()
            .unwrap()
            .into(),
    ]
}

/// Prompt tokens the simulated provider reports for `messages()`.
fn expected_prompt_tokens() -> u64 {
    count_prompt_tokens(&json!({"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USER}
    ]}))
}

/// Checks that the consumer paid exactly `prompt` and `completion` tokens at the
/// model's prices and that the provider earned the cost minus the platform fee.
async fn assert_billed(
    cluster: &switchyard::dev::DevCluster,
    before: switchyard_shared::money::MicroUsd,
    prompt: u64,
    completion: u64,
) {
    let entry = cluster.router.catalog.get(MODEL).unwrap();
    let cost = entry.prices().cost(prompt, completion);
    assert!(cost.get() > 0);
    assert_eq!(
        common::balance(cluster).await,
        before - cost,
        "consumer charged the exact cost"
    );

    let split = FeeSplit::of(cost, cluster.router.catalog.platform_fee_bps());
    assert_eq!(
        common::earnings(cluster).await,
        split.provider_earning,
        "provider credited"
    );
    assert_eq!(common::held(cluster).await.get(), 0, "no hold left open");
}

#[tokio::test]
async fn openai_streaming_completion() {
    let cluster = common::start(common::options(2)).await;
    let before = common::balance(&cluster).await;

    let request = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .max_completion_tokens(MAX_TOKENS)
        .messages(messages())
        .stream(true)
        .stream_options(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        })
        .build()
        .unwrap();
    let mut stream = client(&cluster)
        .chat()
        .create_stream(request)
        .await
        .unwrap();

    let mut text = String::new();
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.model, MODEL);
        for choice in &chunk.choices {
            if let Some(content) = &choice.delta.content {
                text.push_str(content);
            }
        }
        if let Some(chunk_usage) = chunk.usage {
            usage = Some(chunk_usage);
        }
    }

    assert_eq!(text, simulated_completion_text(u64::from(MAX_TOKENS)));
    let usage = usage.expect("a usage chunk when include_usage is true");
    assert_eq!(u64::from(usage.prompt_tokens), expected_prompt_tokens());
    assert_eq!(usage.completion_tokens, MAX_TOKENS);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );

    assert_billed(
        &cluster,
        before,
        expected_prompt_tokens(),
        u64::from(MAX_TOKENS),
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn openai_non_streaming_completion() {
    let cluster = common::start(common::options(2)).await;
    let before = common::balance(&cluster).await;

    let request = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .max_completion_tokens(MAX_TOKENS)
        .messages(messages())
        .build()
        .unwrap();
    let response = client(&cluster).chat().create(request).await.unwrap();

    assert_eq!(response.model, MODEL);
    assert_eq!(response.object, "chat.completion");
    let content = response.choices[0].message.content.clone().unwrap();
    assert_eq!(content, simulated_completion_text(u64::from(MAX_TOKENS)));
    let usage = response.usage.expect("usage in a non-streaming answer");
    assert_eq!(u64::from(usage.prompt_tokens), expected_prompt_tokens());
    assert_eq!(usage.completion_tokens, MAX_TOKENS);

    assert_billed(
        &cluster,
        before,
        expected_prompt_tokens(),
        u64::from(MAX_TOKENS),
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn openai_lists_models() {
    let cluster = common::start(common::options(0)).await;
    let models = client(&cluster).models().list().await.unwrap();
    let ids: Vec<&str> = models.data.iter().map(|model| model.id.as_str()).collect();
    assert!(ids.contains(&MODEL), "{ids:?}");
    assert_eq!(
        ids.len(),
        cluster.router.catalog.snapshot().enabled().count()
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn every_model_served_through_router() {
    // Each dev provider serves every model but lives on the node of its primary
    // model, so most models are served from a node that does not own them.
    let cluster = common::start(common::options(2)).await;
    let models: Vec<String> = cluster
        .router
        .catalog
        .snapshot()
        .enabled()
        .map(|entry| entry.id.to_string())
        .collect();
    for model in models {
        let mut body = common::chat_body(false);
        body["model"] = json!(model);
        let response = common::post_chat(&cluster, &body).await;
        assert_eq!(response.status(), 200, "model {model}");
    }
    cluster.shutdown().await;
}
