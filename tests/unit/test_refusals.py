"""Starts that the configuration or the model file refuse: `create_app` decides them before
anything loads (load_config, then check_model_file), in one line that says what to do. The server
prints that line as `gguf-serve: ...` and exits non-zero; tests/test_service.py starts one such
process, to keep that path covered."""

import pytest

from gguf_serve.config import ConfigError
from gguf_serve.model import Model, ModelFileError
from gguf_serve.service import create_app
from conftest import smollm2_path


def refusal(env: dict[str, str]) -> str:
    with pytest.raises((ConfigError, ModelFileError)) as e:
        create_app(env)
    [line] = str(e.value).splitlines()
    return line


def test_a_model_that_is_neither_a_catalogue_key_nor_a_path_lists_the_keys():
    assert "qwen-7b-chat" in refusal({"MODEL": "no-such-model"})


def test_a_model_file_that_cant_be_served_is_named_with_what_to_do(tmp_path):
    missing = tmp_path / "missing.gguf"
    assert str(missing) in refusal({"MODEL": str(missing)})
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    assert "not a GGUF file" in refusal({"MODEL": str(text)})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"{}")
    assert "convert_hf_to_gguf.py" in refusal({"MODEL": str(weights)})


def test_a_truncated_gguf_is_refused_by_its_load(tmp_path):
    """Past the magic check only llama.cpp's read finds it: the Model that loading.start_loading
    makes raises the line (the server exits with it), in milliseconds, before any weight is read."""
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_path().read_bytes()[:1_000_000])
    with pytest.raises(ModelFileError) as e:
        Model(truncated)
    [line] = str(e.value).splitlines()
    assert str(truncated) in line and "truncated" in line


def test_settings_out_of_their_range_list_the_valid_values():
    assert "chatml" in refusal({"CHAT_FORMAT": "vicuna"})
    assert "auto, on, off" in refusal({"FLASH_ATTN": "yes"})
    assert "RESPONSES_STORE_MAX" in refusal({"RESPONSES_STORE_MAX": "lots"})
