"""KV_CACHE_TYPE, KV_CACHE_TYPE_K and KV_CACHE_TYPE_V: what the KV cache stores, checked at start."""

import pytest

from gguf_serve.config import ConfigError, load_config
from conftest import smollm2_path


def kv(**env) -> tuple[str, str]:
    return load_config({"MODEL": str(smollm2_path()), **env}).kv_cache


def test_f16_unless_told_and_one_setting_for_both_or_each_its_own():
    assert kv() == ("f16", "f16")
    assert kv(KV_CACHE_TYPE="q8_0") == ("q8_0", "q8_0")
    assert kv(KV_CACHE_TYPE="q8_0", KV_CACHE_TYPE_V="q4_0") == ("q8_0", "q4_0")
    assert kv(KV_CACHE_TYPE_K="q4_0") == ("q4_0", "f16")


def test_unknown_types_and_quantized_values_without_flash_attention_stop_the_start():
    with pytest.raises(ConfigError, match="KV_CACHE_TYPE_K='q3'.*f16, bf16, q8_0, q4_0"):
        kv(KV_CACHE_TYPE_K="q3")
    with pytest.raises(ConfigError, match="KV_CACHE_TYPE='int8'"):
        kv(KV_CACHE_TYPE="int8")
    with pytest.raises(ConfigError, match="needs flash attention"):
        kv(KV_CACHE_TYPE="q8_0", FLASH_ATTN="off")
    assert kv(KV_CACHE_TYPE_K="q8_0", FLASH_ATTN="off") == ("q8_0", "f16")  # keys may be quantized without it
