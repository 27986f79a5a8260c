"""End to end: the official openai SDK through the relay under real gunicorn."""

import openai
import pytest
from fake_upstream import FAKE_COMPLETION_TOKENS, FAKE_PROMPT_TOKENS
from test_streaming import wait_for_row


@pytest.fixture
def sdk(relay_server):
    """An openai client pointed at a running relay, with a fresh key."""
    server = relay_server()
    key = server.create_key("sdk-user", "--quota", "100000")
    client = openai.OpenAI(api_key=key, base_url=server.base_url + "/v1", max_retries=0)
    yield server, client
    client.close()


def test_sdk_chat_non_stream(sdk, fake):
    server, client = sdk
    reply = client.chat.completions.create(
        model="gpt-3.5", messages=[{"role": "user", "content": "Say hi"}], user="end-user-7"
    )
    assert reply.choices[0].message.content == fake.reply_text
    assert reply.model == "gpt-3.5-turbo"
    assert reply.usage.total_tokens == FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS
    row = wait_for_row(server)
    assert (row["model_requested"], row["model_served"], row["end_user"]) == (
        "gpt-3.5",
        "gpt-3.5-turbo",
        "end-user-7",
    )
    assert row["total_tokens"] == FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS


def test_sdk_chat_stream(sdk, fake):
    server, client = sdk
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say hi"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == fake.reply_text
    row = wait_for_row(server)
    assert (row["stream"], row["usage_source"], row["total_tokens"]) == (1, "upstream", 18)


def test_sdk_stream_with_usage_and_embeddings(sdk, fake):
    _, client = sdk
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.total_tokens == 18
    vectors = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(vectors.data) == 2


def test_sdk_sees_openai_errors(sdk):
    server, _ = sdk
    bad = openai.OpenAI(api_key="sk-wrong-key-000", base_url=server.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.code == "invalid_api_key"
    bad.close()
