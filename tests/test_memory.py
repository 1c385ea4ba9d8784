"""The memory table against numbers computed by hand for the tiny Llama config of the unit tests."""

from __future__ import annotations

from conftest import _tiny_config

from dipreg.memory import memory_table, shipped_config


def test_memory_table_of_the_tiny_llama_matches_the_hand_count():
    # vocab 64, width 32, 4 heads of 8, 2 kv heads, MLP 64, 8 layers, untied head.
    # parameters: embed 64·32 = 2048; per layer q 32·32 + k 32·16 + v 32·16 + o 32·32 = 3072, MLP 3·32·64 = 6144,
    # two norms 64 -> 9280, × 8 = 74240; final norm 32; lm_head 2048. Total 78368, × 2 bytes (bf16) = 156736.
    # residual capture: 8 layers × 16 contexts × 32 × 2 = 8192.
    # causal rows: 512 rows × (32 + 8 layers × 2 × 2 kv heads × 8 × 13 tokens) × 2 = 512 × 3360 × 2 = 3440640.
    # LoRA r=16: q 16·64 + k 16·48 + v 16·48 + o 16·64 + gate/up/down 3 × 16·96 = 8192 per layer, × 8 = 65536
    # parameters × 16 bytes = 1048576.
    rows = {row.name: row.bytes for row in memory_table(_tiny_config("llama"), dtype="bfloat16")}
    assert rows == {
        "parameters": 156736,
        "residual capture": 8192,
        "causal-lens rows": 3440640,
        "LoRA optimizer state": 1048576,
    }


def test_shipped_configs_have_the_published_parameter_counts():
    params = {name: memory_table(shipped_config(name), dtype="float32")[0].bytes // 4 for name in ("Qwen2.5-1.5B",)}
    assert params["Qwen2.5-1.5B"] == 1_543_714_304  # Qwen2.5-1.5B: 1.54B parameters (tied embeddings)
