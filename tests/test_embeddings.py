"""/v1/embeddings on the real stack: SmolLM2 (a chat model serving embeddings too) through the openai
SDK and LangChain's OpenAIEmbeddings, and the encoder path on a tiny BERT GGUF written here."""

import json
import socket
import threading
from pathlib import Path

import gguf
import httpx
import numpy as np
import openai
import pytest

from conftest import MODEL, SHARED, Server

CAT = "The cat sat on the mat."
PARAPHRASE = "A cat was sitting on the rug."
UNRELATED = "Quarterly revenue grew by ten percent."


def vectors(client, given, **kwargs) -> np.ndarray:
    return np.array([d.embedding for d in client.embeddings.create(model=MODEL, input=given, **kwargs).data])


def test_openai_shape_and_usage(base_url):
    body = httpx.post(f"{base_url}/v1/embeddings", json={"model": MODEL, "input": [CAT, UNRELATED]}, timeout=120).json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0, 1] and {d["object"] for d in body["data"]} == {"embedding"}
    assert all(len(d["embedding"]) == 576 for d in body["data"])  # SmolLM2's hidden size
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    for d in body["data"]:
        assert np.isclose(np.linalg.norm(d["embedding"]), 1, atol=1e-5)  # L2-normalised, as OpenAI's


def test_float_and_base64_agree(client):
    as_float = vectors(client, CAT, encoding_format="float")
    assert np.array_equal(vectors(client, CAT), as_float)  # the SDK asks for base64 and decodes it


def test_same_text_same_vector_batched_or_alone(client):
    texts = [CAT, PARAPHRASE, UNRELATED, "Short.", "A somewhat longer sentence about the weather in spring."]
    batched = vectors(client, texts)
    alone = np.stack([vectors(client, text)[0] for text in texts])
    assert np.array_equal(vectors(client, texts), batched)
    # alone, a text's rows share a batch with no other sequence: the sums may differ in the last bits
    assert np.abs(batched - alone).max() < 1e-4


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(client):
    cat, paraphrase, unrelated = vectors(client, [CAT, PARAPHRASE, UNRELATED])
    assert cat @ paraphrase > cat @ unrelated + 0.1


def test_token_ids_embed_as_their_text_does(client):
    from gguf_serve.model import Model
    from conftest import smollm2_path

    vocab = Model(smollm2_path(), vocab_only=True)
    ids = vocab.tokenize(CAT, add_special=True)
    by_text = vectors(client, CAT)
    assert np.abs(vectors(client, ids) - by_text).max() < 1e-4
    assert np.abs(vectors(client, [ids, ids])[1] - by_text[0]).max() < 1e-4
    assert client.embeddings.create(model=MODEL, input=ids).usage.prompt_tokens == len(ids)


def test_a_long_input_is_computed_in_chunks(client):
    long = " ".join(["The river winds through the valley past old mills and quiet farms."] * 40)  # ~600 tokens
    v = vectors(client, [long, CAT])
    assert np.isclose(np.linalg.norm(v[0]), 1, atol=1e-5) and v[0] @ v[1] < 0.999


@pytest.mark.parametrize("body,param,code", [
    ({"input": ""}, "input", None),
    ({"input": ["fine", ""]}, "input[1]", None),
    ({"input": []}, "input", None),
    ({"input": [[1, 2], []]}, "input[1]", None),
    ({"input": ["a", [1]]}, "input[1]", None),
    ({"input": [[9906, 100_000]]}, "input[0]", None),  # tiktoken's ids, as LangChain sends them by default
    ({"input": "word " * 2100}, "input", "context_length_exceeded"),
    ({"input": ["ok", "word " * 2100]}, "input[1]", "context_length_exceeded"),
    ({"input": [" a" * 1000] * 8}, "input", "max_tokens_per_request"),  # 8,000 tokens in all: EMBEDDINGS_MAX_TOKENS
    ({"input": "a", "dimensions": 64}, "dimensions", "unsupported_parameter"),  # SmolLM2 was not trained for it
    ({"input": "a", "dimensions": 577}, "dimensions", None),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format", None),
    ({"input": 5}, "input", None),
])
def test_bad_requests_are_openai_shaped_400s(base_url, body, param, code):
    r = httpx.post(f"{base_url}/v1/embeddings", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert code is None or error["code"] == code


def test_dimensions_of_the_full_size_and_wrong_model(client):
    assert len(client.embeddings.create(model=MODEL, input="a", dimensions=576).data[0].embedding) == 576
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="a")
    assert e.value.body["code"] == "model_not_found"


def test_langchain_openai_embeddings(base_url, client):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: send the texts; by default LangChain tokenizes them with
    # OpenAI's tiktoken and sends those ids, which mean nothing to another model.
    embedder = OpenAIEmbeddings(base_url=f"{base_url}/v1", api_key="unused", model=MODEL, check_embedding_ctx_length=False)
    docs = embedder.embed_documents([CAT, UNRELATED])
    query = embedder.embed_query(PARAPHRASE)
    assert np.allclose(docs, vectors(client, [CAT, UNRELATED]), atol=1e-6)
    assert np.dot(query, docs[0]) > np.dot(query, docs[1])


def embedding_requests(server) -> float:
    return server.metric("gguf_requests_total", endpoint="/v1/embeddings", status="200")


def test_counted_in_the_metrics(server, client):
    before, requests = server.metric("gguf_prompt_tokens_total"), embedding_requests(server)
    usage = client.embeddings.create(model=MODEL, input=[CAT, UNRELATED]).usage
    assert server.metric("gguf_prompt_tokens_total") == before + usage.prompt_tokens
    assert embedding_requests(server) == requests + 1


def test_a_chat_goes_on_while_a_long_embedding_runs(server, client):
    """Embedding inputs are computed a batch a step, between generation steps: a short chat
    started after a long embedding request ends before it."""
    done = {}
    inputs = [" ".join([f"Paragraph {i} tells of ships, harbours and the open sea."] * 16) for i in range(8)]  # ~1600 tokens

    def embed():  # minutes on a loaded machine
        done["embeddings"] = len(client.embeddings.create(model=MODEL, input=inputs, timeout=600).data)

    thread = threading.Thread(target=embed)
    thread.start()
    server.wait_metric("gguf_running", 1)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0)
    assert reply.choices[0].message.content and "embeddings" not in done
    thread.join()
    assert done["embeddings"] == 8


def test_a_client_that_leaves_cancels_its_embeddings(server, client):
    """The client leaves once its embeddings are being computed (gguf_running says so), not after a
    time, which a fast host finishes ~3,600 tokens within: the server sees it go (499) and stops."""
    inputs = [" ".join([f"Line {i} of a long document about mountains."] * 40) for i in range(9)]  # ~3,600 tokens
    body = json.dumps({"model": MODEL, "input": inputs}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"X-Request-Id: embeddings-left\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        server.wait_metric("gguf_running", 1)
    assert server.log_line("embeddings-left")["status"] == 499
    server.wait_metric("gguf_running", 0)  # cancelled, not computed on for minutes
    server.wait_metric("gguf_queue_depth", 0)
    assert len(vectors(client, CAT)[0]) == 576


# --- The encoder path: an embedding model ------------------------------------------------


def tiny_bert(path: Path, pooling: gguf.PoolingType, n_embd=32, n_layer=2, n_head=2, n_ff=64, n_ctx=128) -> Path:
    """A BERT-architecture GGUF with random weights and a real vocabulary (Llama 2's SentencePiece
    one, from ../shared/vocab): llama.cpp loads and runs it like bge or MiniLM."""
    src = gguf.GGUFReader(SHARED / "vocab" / "ggml-vocab-llama-spm.gguf")

    def values(key):
        field = src.fields[key]
        return [field.parts[i] for i in field.data]

    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name("tiny-bert-test")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(pooling)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    tokens = [bytes(p).decode() for p in values("tokenizer.ggml.tokens")]
    w.add_token_list(tokens)
    w.add_token_scores([float(p[0]) for p in values("tokenizer.ggml.scores")])
    w.add_token_types([int(p[0]) for p in values("tokenizer.ggml.token_type")])
    w.add_token_type_count(2)
    for key, add in [("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unknown", w.add_unk_token_id)]:
        add(int(values(f"tokenizer.ggml.{key}_token_id")[0][0]))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    rng = np.random.default_rng(0)
    weight = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", weight(len(tokens), n_embd))
    w.add_tensor("token_types.weight", weight(2, n_embd))
    w.add_tensor("position_embd.weight", weight(n_ctx, n_embd))
    norms = ["token_embd_norm"] + [f"blk.{i}.{n}" for i in range(n_layer) for n in ("attn_output_norm", "layer_output_norm")]
    for name in norms:
        w.add_tensor(f"{name}.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"{name}.bias", np.zeros(n_embd, np.float32))
    for i in range(n_layer):
        for name, rows, cols in [("attn_q", n_embd, n_embd), ("attn_k", n_embd, n_embd), ("attn_v", n_embd, n_embd),
                                 ("attn_output", n_embd, n_embd), ("ffn_up", n_ff, n_embd), ("ffn_down", n_embd, n_ff)]:
            w.add_tensor(f"blk.{i}.{name}.weight", weight(rows, cols))
            w.add_tensor(f"blk.{i}.{name}.bias", np.zeros(rows, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """The tiny BERT with CLS pooling, in a catalogue that says it was trained for shortening."""
    root = tmp_path_factory.mktemp("bert")
    tiny_bert(root / "tiny-bert.gguf", gguf.PoolingType.CLS)
    (root / "models.toml").write_text('[tiny-bert]\nfile = "tiny-bert.gguf"\nn_ctx = 128\nmatryoshka = true\n')
    s = Server({"MODELS_TOML": str(root / "models.toml"), "MODEL": "tiny-bert", "N_THREADS": "2"}).wait_ready()
    yield s
    s.stop()


def test_an_encoder_model_serves_embeddings(bert):
    client = openai.OpenAI(base_url=f"{bert.url}/v1", api_key="unused", max_retries=0, timeout=60)
    texts = [f"Sentence {i} about a topic." for i in range(70)]  # more inputs than one batch's sequences (64)
    batched = np.array([d.embedding for d in client.embeddings.create(model="tiny-bert", input=texts).data])
    assert batched.shape == (70, 32) and np.allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    alone = np.array(client.embeddings.create(model="tiny-bert", input=texts[69]).data[0].embedding)
    assert batched[69] @ alone > 0.9999  # 64 sequences in one attention or one alone: the sums differ in the last bits
    assert len(set(map(tuple, batched.round(4)))) == 70  # each text its own vector
    short = client.embeddings.create(model="tiny-bert", input=texts[69], dimensions=8).data[0].embedding
    assert np.allclose(short, alone[:8] / np.linalg.norm(alone[:8]), atol=1e-6)  # the first 8, normalised again
    r = httpx.post(f"{bert.url}/v1/embeddings", json={"model": "tiny-bert", "input": "word " * 200}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/completions", {"prompt": "Hi"}),
    ("/v1/responses", {"input": "Hi"}),
])
def test_an_encoder_model_refuses_generation_with_a_clear_400(bert, path, body):
    r = httpx.post(f"{bert.url}{path}", json={"model": "tiny-bert", **body}, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "model_not_supported" and "embedding model" in error["message"] and error["param"] == "model"
